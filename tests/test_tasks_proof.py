"""The `proof` task: generated statements, reference proofs accepted and flawed ones rejected by warm Coq
workers; hostile scripts (Admitted/admit, Axiom after Qed, Abort, tactic loops, Redirect/Load/Drop...) score
wrong within their deadline, leave no process behind, and the pool keeps working."""
from __future__ import annotations

import random
import time

import pytest

from nanoseek import sandbox, sandbox_probe
from nanoseek.config import ConfigError
from nanoseek.tasks import get_task
from nanoseek.tasks.base import format_completion
from nanoseek.tasks.proof import CoqPool, CoqWorker, ProofTask, validate_script
from sandbox_util import leftovers, need, path_without

TIMEOUT_S = 2  # Coq's per-sentence Default Timeout in these tests (5 in production)
JOB_WALL_S = 6.0

HOSTILE = {
    "Admitted": "Admitted.",
    "admit": "intros. admit.",
    "give_up": "intros. give_up.",
    "Axiom after Qed": "intros. lia. Qed. Axiom cheat : False.",
    "Axiom then use": "Axiom cheat : False. exact (False_rect _ cheat).",
    "Abort": "Abort.",
    "Abort All then a new goal": "Abort All. Goal True. exact I.",
    "infinite tactic loop": "intros. do 1000000000 idtac. lia.",
    "repeat that never ends": "intros. repeat (assert True by exact I). lia.",
    "Redirect": "Redirect \"/tmp/nsk_pwn\" Print nat. lia.",
    "Load": "Load \"/etc/passwd\".",
    "Drop": "Drop.",
    "Extraction": "Extraction nat.",
    "new Theorem": "intros. lia. Qed. Theorem x : True. exact I.",
    "Set option": "Set Nested Proofs Allowed. lia.",
    "a failing sentence in the middle": "intros. reflexivity. lia.",
    "goals left open": "intros.",
    "exact_no_check": "exact_no_check I.",
    "comment smuggling": "intros. (* Qed. *) lia.",
    "spoofed marker": "idtac \"Closed under the global context\". lia.",
    "unicode": "intros. lia\u3002",
    "unterminated": "intros. lia",
    "unbalanced": "intros ( . lia.",
    "empty": "",
}


@pytest.fixture(scope="module")
def pool():
    need("coqtop", "the proof task's verifier (apt-get install coq)")
    need("bwrap", "the Coq workers' sandbox")
    p = CoqPool(2, timeout_s=TIMEOUT_S, job_wall_s=JOB_WALL_S)
    yield p
    p.close()


@pytest.fixture(scope="module")
def task(pool):
    return ProofTask(pool=pool)


def test_reference_proofs_pass_flawed_fail(task):
    rng = random.Random(0)
    problems = [task.sample(rng, d) for d in range(1, 6) for _ in range(4)]
    good = task.score_batch(problems, [task.solution(p, rng) for p in problems])
    bad = task.score_batch(problems, [task.solution(p, rng, flawed=True) for p in problems])
    assert all(s.correct and s.format_ok for s in good), [p.prompt for p, s in zip(problems, good) if not s.correct]
    assert not any(s.correct for s in bad) and all(s.format_ok for s in bad)


def test_hostile_proofs_score_wrong_in_time(task, pool):
    p = task.sample(random.Random(3), 1)  # a linear identity: `lia` alone would prove it
    assert task.check(p, "intros. lia.")
    pool.close()  # the warm workers are meant to stay alive: compare with none of them running
    before = set(leftovers())
    t0 = time.monotonic()
    scores = task.score_batch([p] * len(HOSTILE), [format_completion("x", s) for s in HOSTILE.values()])
    elapsed = time.monotonic() - t0
    for name, s in zip(HOSTILE, scores):
        assert not s.correct, name
    assert elapsed < 3 * JOB_WALL_S, elapsed
    pool.close()
    assert set(leftovers()) - before == set()
    assert task.check(p, "intros. lia.")  # the pool restarts and still works


def test_coq_itself_rejects_cheats_the_filter_would_stop(pool):
    """Defense in depth: with the tactic filter bypassed, Qed + Print Assumptions still reject the cheats."""
    w = pool.workers[0]
    stmt = "forall a b : nat, a + b = b + a."
    assert w.prove(stmt, "intros. lia.") is not None
    for script in ("intros. admit.", "give_up."):
        assert w.prove(stmt, script) is None, script  # Qed refuses given-up goals
    name = w.prove(stmt, "Admitted.")  # the theorem exists, as an axiom (and our Qed errors)
    assert name is None or w.closed([name]) is False
    ok = w.prove(stmt, "intros. lia.")
    assert w.closed([ok]) is True
    # Print Assumptions itself: a proof that uses an axiom (declared here, behind the filter's back) is not closed,
    # alone or in a batch with a closed one
    w._send("Axiom nsk_test_ax : False.\nTheorem nsk_test_t : 1 = 2.\nProof. destruct nsk_test_ax. Qed.\n"
            "Locate nsk_test_m.\n", "nsk_test_m", 30.0)
    assert w.closed(["nsk_test_t"]) is False and w.closed([ok, "nsk_test_t"]) is False
    w.reset()


def test_endless_tactics_end_by_coq_timeout_or_by_the_wall_deadline(pool):
    w = pool.workers[1]
    stmt = "forall a b : nat, a + b = b + a."
    w.prove(stmt, "intros. lia.")
    starts = w.starts
    t0 = time.monotonic()
    # Coq's own timeout interrupts the sentence; the job still fails (coqc semantics) and the worker stays warm
    assert w.prove(stmt, "intros. do 1000000000 idtac. lia.") is None
    assert time.monotonic() - t0 < JOB_WALL_S + 1
    assert w.prove(stmt, "intros. lia.") is not None and w.starts == starts
    # with Coq's timeout out of reach, the wall deadline kills the worker, which restarts for the next job
    slow = CoqWorker(timeout_s=60, job_wall_s=2.0)
    try:
        assert slow.prove(stmt, "intros. lia.") is not None
        t0 = time.monotonic()
        assert slow.prove(stmt, "intros. do 1000000000 idtac. lia.") is None
        assert time.monotonic() - t0 < 3.5 and slow.worker.proc is None
        assert slow.prove(stmt, "intros. lia.") is not None and slow.starts == 2
    finally:
        slow.close()


def test_validator_accepts_tactic_scripts():
    for s in ["intros. lia.", "intros P Q [HP | HQ]. right. exact HP. left. exact HQ.",
              "induction l as [| h t IH]. - reflexivity. - simpl. rewrite IH. reflexivity.",
              "split; [ lia | lia ].", "intros. rewrite Nat.add_comm. reflexivity.", "{ intros. lia. }"]:
        assert validate_script(s) is None, s
    for name, s in HOSTILE.items():
        if name not in ("infinite tactic loop", "repeat that never ends", "a failing sentence in the middle",
                        "goals left open"):
            assert validate_script(s) is not None, name


def test_generator_is_deterministic_and_split():
    task = get_task("proof")
    a = [task.sample(random.Random(7), d) for d in range(1, 6)]
    assert a == [task.sample(random.Random(7), d) for d in range(1, 6)]
    rng = random.Random(0)
    train = {task.canonical(task.sample_split(rng, 2, "train")) for _ in range(400)}
    test = {task.canonical(task.sample_split(rng, 2, "test")) for _ in range(100)}
    assert len(test) > 20 and not (train & test)
    assert isinstance(task, ProofTask) and task.sandboxed


# ---- one bad proof must not fail the others of its batch ---------------------------------------------------
GOOD = ("forall a b : nat, a + b = b + a.", "intros. lia.")
GOOD2 = ("forall a b : nat, 2 * (a + b) = 2 * a + 2 * b.", "intros. lia.")
WORKER_KILLERS = {  # each ends the worker: the wall deadline, the output cap, coqtop exiting
    "looping tactic past Coq's timeout": "intros. do 1000000000 idtac. lia.",
    "huge output": "intros. do 10000000 idtac 1234567890. lia.",
}


@pytest.fixture(scope="module")
def wall_pool():
    """A one-worker pool whose Coq timeout is out of reach, so a loop runs into the wall deadline (3 s)."""
    need("coqtop", "the proof task's verifier (apt-get install coq)")
    need("bwrap", "the Coq workers' sandbox")
    p = CoqPool(1, timeout_s=60, job_wall_s=3.0)
    yield p
    p.close()


@pytest.mark.slow  # ~15-25 s each: four kills and restarts; `Quit` below covers the same path in the default suite
@pytest.mark.parametrize("kind", list(WORKER_KILLERS))
def test_a_worker_killer_fails_alone(wall_pool, kind):
    """Two killers between correct proofs in one chunk: the correct ones still score right. Before the fix the
    first correct proof, lost twice with the worker, was re-checked only once and scored wrong."""
    w = wall_pool.workers[0]
    bad = (GOOD[0], WORKER_KILLERS[kind])
    starts = w.starts
    t0 = time.monotonic()
    assert CoqPool._chunk(w, [GOOD, bad, bad, GOOD2]) == [True, False, False, True], kind
    assert w.starts > starts  # the hostile jobs did end the worker (the test is not vacuous)
    assert time.monotonic() - t0 < 4 * (3.0 + 3.0) + 10


def test_checker_tricks_fail_alone(pool):
    """Scripts the filter would stop, sent to Coq anyway (defense in depth), between correct proofs of one chunk:
    Admitted and Abort are refused by our Qed, `Quit` makes coqtop exit (a crash), an axiom is not closed."""
    w = pool.workers[0]
    for name, script in {"Admitted": "Admitted.", "Abort": "Abort.", "Quit (coqtop exits)": "intros. Quit.",
                         "Axiom": "intros. lia. Qed. Axiom nsk_cheat : False.",
                         "a failing sentence": "intros. reflexivity. lia."}.items():
        bad = (GOOD[0], script)
        assert CoqPool._chunk(w, [GOOD, bad, bad, GOOD2]) == [True, False, False, True], name


def test_a_batched_print_assumptions_that_dies_is_redone_per_theorem(pool, monkeypatch):
    """When the batched Print Assumptions ends the worker (deadline, output cap), each theorem is judged alone."""
    w = pool.workers[1]
    real = CoqWorker.closed

    def dying(self, names):
        if len(names) > 1:
            self.worker.close()  # as after a deadline or an output overflow
            return None
        return real(self, names)

    monkeypatch.setattr(CoqWorker, "closed", dying)
    assert CoqPool._chunk(w, [GOOD, (GOOD[0], "intros. reflexivity."), GOOD2]) == [True, False, True]


def test_proofs_refuse_without_bubblewrap_and_run_unsafe_only_when_allowed(monkeypatch, tmp_path):
    need("coqtop", "the proof task's verifier (apt-get install coq)")
    monkeypatch.setenv("PATH", path_without("bwrap", tmp_path / "bin"))
    monkeypatch.setattr(sandbox_probe, "_unsafe_cli", False)
    monkeypatch.delenv(sandbox.UNSAFE_ENV, raising=False)
    pool = CoqPool(1, timeout_s=TIMEOUT_S, job_wall_s=JOB_WALL_S)
    task = ProofTask(pool=pool)
    p = task.sample(random.Random(3), 1)
    try:
        with pytest.raises(ConfigError, match="apt-get install bubblewrap"):
            task.score_batch([p], [task.solution(p, random.Random(0))])
        monkeypatch.setenv(sandbox.UNSAFE_ENV, "1")
        assert sandbox.sandbox_mode() == "unsafe"
        assert task.check(p, "intros. lia.") and not task.check(p, "intros. reflexivity.")
    finally:
        pool.close()
