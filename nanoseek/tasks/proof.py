"""Coq-checked proofs: procedurally generated theorem statements, proof scripts checked by warm Coq workers.

A proof-assistant reward (the source notes' Lean-checked math; here Coq 8.16, Debian `coq`) is the strictest
rule-based reward: the kernel accepts the proof or not. The completion's answer is the proof script only:

    Prove in Coq: forall a b : nat, 3 * (a + b) + 2 * a = 5 * a + 3 * b.
    <think>linear arithmetic over nat: lia decides it.</think><answer>intros. lia.</answer>

Statements, by difficulty (each level adds one family to the mix; parameters are random):

    1  linear identities over nat (2 variables)              intros. lia.
    2  + linear inequalities under a hypothesis (nat)        intros. lia.
    3  + propositional chains / and-or commutation           intros. tauto.  (or explicit intros/apply)
    4  + polynomial identities over Z (squares, products)    intros. ring.
    5  + list lemmas (length/app/rev/map)                    intros. rewrite ... / induction ...

A flawed solution uses a plausible wrong tactic for its family (reflexivity, ring on an inequality, lia on a
list goal, assumption on a chain), which Coq rejects.

Verification (`CoqPool`): the script is accepted only if (1) it is tactics only: ASCII, no comments or
strings, every sentence starts with an allowed tactic (or a bullet/brace), and no vernacular keyword appears
anywhere (Admitted, admit, Abort, Axiom, Qed, Drop, Load, Redirect, Extraction, Theorem, Require, Set, ...);
(2) placed after the fixed statement (`Theorem nsk_<nonce> : <statement>. Proof.`), our own `Qed.` succeeds;
(3) `Print Assumptions` says "Closed under the global context". The statement is ours, so it cannot change.
Workers are `coqtop` processes in the sandbox with Arith/Lia/List/ZArith loaded once and `Set Default
Timeout 5`; each job gets a fresh random theorem name, markers with a random nonce delimit its output, and
`Reset` returns the worker to the loaded state after each batch. A job that misses its wall deadline, overflows
the output cap or crashes coqtop kills the worker, which restarts; one bad proof never fails the others of its
batch: the proofs lost with the worker are proved again, and the job that ended it is re-checked alone on a
fresh worker (if it shared one) before it scores wrong.
Print Assumptions walks every opaque library proof a term uses (~0.5-1.5 s for one lia proof), so it runs once
per worker batch on a tuple of that batch's proved theorems; a batch that is not closed, or whose check ends the
worker, is re-checked theorem by theorem (each alone on a fresh worker if the worker died).
"""
from __future__ import annotations

import os
import random
import re
import secrets
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

from nanoseek import sandbox
from nanoseek.config import ConfigError
from nanoseek.tasks.base import BatchCheckedTask, Problem, format_completion

LIBRARIES = "Require Import Arith Lia List ZArith."
TACTIC_TIMEOUT_S = 5
JOB_WALL_S = 15.0
MAX_SCRIPT_CHARS = 2000
MAX_SENTENCES = 60
COQ_LIMITS = sandbox.Limits(wall_s=JOB_WALL_S, cpu_s=3600, memory_mb=2048, nproc=64, fsize_mb=1,
                            output_bytes=4 << 20)

TACTICS = frozenset("""
intros intro induction destruct simpl reflexivity lia nia ring ring_simplify field auto eauto tauto
intuition firstorder rewrite apply eapply exact split left right assumption unfold inversion subst f_equal
trivial exists eexists constructor econstructor discriminate congruence easy now try repeat symmetry
transitivity assert specialize generalize revert clear cbn cbv compute lazy red hnf pose set remember
case elim exfalso contradiction injection replace change idtac fail do progress solve first abstract
induction destruct case_eq contradict exact absurd apply_in erewrite all by in as at with using
""".split())
FORBIDDEN = frozenset("""
Admitted admit give_up Abort Axiom Axioms Parameter Parameters Hypothesis Hypotheses Variable Variables
Conjecture Qed Defined Save Proof Drop Load Redirect Extraction Extract Theorem Lemma Fact Remark Corollary
Proposition Example Definition Fixpoint CoFixpoint Inductive Record Structure Require Import Export Set
Unset Reset Back BackTo Declare Module Section End Local Global Add Remove Timeout Time Fail Succeed Ltac
Ltac2 Tactic Notation Print Locate Check Eval Compute Search Obligation Program Instance Existing Hint
Opaque Transparent exact_no_check vm_cast_no_check native_cast_no_check native_compute Undo Restart Focus
Unfocus Show Guarded Optimize Infix Arguments Coercion Canonical Goal Let Context Universe Constraint
Primitive Register Debug Info Drop Quit Cd Pwd Include Abort Instructions Unshelve shelve
""".split())
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_']*")
_SENTENCE_END = re.compile(r"\.(?=\s|$)")
_ALLOWED_CHARS = re.compile(r"[A-Za-z0-9_'\s.,;:()\[\]{}<>=+\-*/|&~!?@%^\\]*")


def validate_script(script: str) -> str | None:
    """None if the proof script is tactics only, else the reason it is rejected."""
    if not isinstance(script, str) or not script.strip():
        return "empty script"
    if len(script) > MAX_SCRIPT_CHARS:
        return f"script longer than {MAX_SCRIPT_CHARS} characters"
    if not _ALLOWED_CHARS.fullmatch(script):
        return "characters outside the tactic alphabet (no strings, quotes or non-ASCII)"
    if "(*" in script or "*)" in script:
        return "comments are not allowed"
    depth = 0
    for c in script:
        depth += {"(": 1, ")": -1, "[": 1, "]": -1}.get(c, 0)
        if depth < 0:
            return "unbalanced brackets"
    if depth:
        return "unbalanced brackets"
    for w in _WORD.findall(script):
        if w in FORBIDDEN:
            return f"{w!r} is not a tactic"
    body = script.strip()
    if not (body.endswith(".") or body.endswith("}")):
        return "the script must end with '.' or '}'"
    sentences = [s for s in _SENTENCE_END.split(body)]
    if len(sentences) > MAX_SENTENCES:
        return f"more than {MAX_SENTENCES} sentences"
    for s in sentences:
        rest = s.lstrip(" \t\r\n-+*{}")
        if not rest:
            continue
        m = _WORD.match(rest)
        if m is None or m.group(0) not in TACTICS:
            return f"sentence {s.strip()[:40]!r} does not start with an allowed tactic"
    return None


# ---- warm Coq workers ---------------------------------------------------------------------------
_PROMPT = re.compile(r"^(?:[A-Za-z0-9_']+ < )+")  # coqtop's prompts arrive on stderr, merged into stdout


def _marker(name: str) -> str:
    return f"No object of basename {name}"


class CoqWorker:
    """One warm `coqtop` in the sandbox: libraries loaded, reset between batches, restarted on trouble."""

    def __init__(self, libraries: str = LIBRARIES, timeout_s: int = TACTIC_TIMEOUT_S, job_wall_s: float = JOB_WALL_S):
        self.job_wall_s, self.timeout_s = job_wall_s, timeout_s
        ready = "nsk_ready_" + secrets.token_hex(6)
        startup = (f"{libraries}\nSet Default Timeout {timeout_s}.\nDefinition nanoseek_base := tt.\n"
                   f"Locate {ready}.\n")
        self.worker = sandbox.Worker(["coqtop", "-q"], COQ_LIMITS, startup=startup,
                                     startup_marker=_marker(ready).encode(), startup_wall_s=120.0,
                                     merge_stderr=True)

    def _send(self, text: str, end: str, wall_s: float) -> str | None:
        out = self.worker.request(text, _marker(end).encode(), wall_s)
        return None if out is None else out.decode("utf-8", "replace")

    def prove(self, statement: str, script: str) -> str | None:
        """The theorem's name if `script` proves `statement` (Qed passed); None if not or on trouble."""
        n = secrets.token_hex(8)
        name, a, z = f"nsk_{n}", f"nsk_a_{n}", f"nsk_z_{n}"
        text = (f"Theorem {name} : {statement}\nProof.\n{script}\nQed.\nLocate {a}.\nLocate {name}.\n"
                f"Abort All.\nLocate {z}.\n")
        out = self._send(text, z, self.job_wall_s)
        if out is None or _marker(a) not in out:
            return None
        before, seg = out.split(_marker(a), 1)
        if re.search(r"^(?:[A-Za-z0-9_']+ < )*\s*Error:", before, re.MULTILINE):  # coqc semantics: any failing sentence fails the proof
            return None
        return name if re.search(rf"Constant \S*\b{name}\b", seg) else None

    def closed(self, names: list[str]) -> bool | None:
        """Print Assumptions on the tuple of `names`: True iff closed; None on trouble."""
        n = secrets.token_hex(8)
        b, y = f"nsk_b_{n}", f"nsk_y_{n}"
        text = (f"Definition nsk_batch_{n} := ({', '.join(names)}).\nLocate {b}.\n"
                f"Unset Default Timeout.\nPrint Assumptions nsk_batch_{n}.\nSet Default Timeout {self.timeout_s}.\n"
                f"Locate {y}.\n")
        out = self._send(text, y, 60.0)
        if out is None or _marker(b) not in out:
            return None
        seg = out.split(_marker(b), 1)[1].split(_marker(y), 1)[0]
        lines = [_PROMPT.sub("", ln).strip() for ln in seg.splitlines()]
        lines = [ln for ln in lines if ln]
        # Coq logs each library whose opaque proofs it loads; anything else means an assumption was listed
        rest = [ln for ln in lines if not ln.startswith("Fetching opaque proofs from disk for ")]
        return rest == ["Closed under the global context"]

    def reset(self) -> None:
        n = secrets.token_hex(8)
        self._send(f"Reset nanoseek_base.\nLocate nsk_r_{n}.\n", f"nsk_r_{n}", 30.0)

    @property
    def starts(self) -> int:
        return self.worker.starts

    def close(self) -> None:
        self.worker.close()


class CoqPool:
    """`n` warm Coq workers; `check(jobs)` splits a batch of (statement, script) jobs into one chunk per worker
    and checks the chunks in parallel."""

    def __init__(self, n: int | None = None, timeout_s: int = TACTIC_TIMEOUT_S, job_wall_s: float = JOB_WALL_S):
        self.n = max(1, n or (os.cpu_count() or 1))
        self.workers = [CoqWorker(timeout_s=timeout_s, job_wall_s=job_wall_s) for _ in range(self.n)]
        self.lock = threading.Lock()
        # long-lived threads: bwrap's --die-with-parent fires when the *thread* that started a worker exits
        self.executor = ThreadPoolExecutor(self.n, thread_name_prefix="nanoseek-verify")

    def check(self, jobs: list[tuple[str, str]]) -> list[bool]:
        ok = [False] * len(jobs)
        todo = []
        for i, (stmt, script) in enumerate(jobs):
            if validate_script(script) is None:
                todo.append(i)
        chunks = [todo[k::self.n] for k in range(self.n)]
        with self.lock:
            results = list(self.executor.map(lambda wc: self._chunk(wc[0], [jobs[i] for i in wc[1]]),
                                  zip(self.workers, chunks)))
        for chunk, res in zip(chunks, results):
            for i, v in zip(chunk, res):
                ok[i] = v
        return ok

    @staticmethod
    def _chunk(worker: CoqWorker, jobs: list[tuple[str, str]]) -> list[bool]:
        """Check a chunk on one warm worker. One bad job must not fail the others: a job that ends the worker
        (deadline, output cap, crash) while other proofs were loaded is re-checked alone on a fresh worker before
        it scores wrong, and every proof lost with the worker is proved again; when the batched Print Assumptions
        fails or says "not closed", each theorem is judged alone (`_alone` if the worker died meanwhile)."""
        if not jobs:
            return []
        out = [False] * len(jobs)
        names: dict[int, str] = {}  # job -> theorem proved in the worker's current life
        shared = worker.worker.proc is not None  # whether the worker's current life has checked any job yet
        isolated: set[int] = set()  # jobs that already killed a worker they shared
        queue = list(range(len(jobs)))
        while queue:
            i = queue.pop(0)
            starts = worker.starts
            name = worker.prove(*jobs[i])
            lost: list[int] = []
            if worker.starts != starts:  # the worker was (re)started for this job: the old life's proofs are gone
                lost, names, shared = list(names), {}, False
            if worker.worker.proc is None:  # this job ended the worker
                lost += list(names)
                if shared and i not in isolated:  # it shared the worker with other proofs: once more, alone
                    isolated.add(i)
                    lost = [i] + lost
                names, shared = {}, False
                queue = lost + queue
                continue
            queue = lost + queue
            shared = True
            if name is not None:
                names[i] = name
        if names:
            life = worker.starts
            verdict = worker.closed(list(names.values()))
            if verdict is True:
                for i in names:
                    out[i] = True
            else:  # an axiom somewhere, or the batched check ended the worker: theorem by theorem
                for i, name in names.items():
                    alive = worker.starts == life and worker.worker.proc is not None
                    v = worker.closed([name]) if alive else None
                    out[i] = v if v is not None else CoqPool._alone(worker, jobs[i])  # None: worker gone or trouble
        worker.reset()
        return out

    @staticmethod
    def _alone(worker: CoqWorker, job: tuple[str, str]) -> bool:
        """Prove and check one job on a fresh worker (nothing else loaded)."""
        worker.close()
        name = worker.prove(*job)
        return name is not None and worker.worker.proc is not None and worker.closed([name]) is True

    def close(self) -> None:
        for w in self.workers:
            w.close()


_pool: CoqPool | None = None
_pool_lock = threading.Lock()


def default_pool() -> CoqPool:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = CoqPool()
        return _pool


def coq_missing() -> str | None:
    return None if shutil.which("coqtop") else "Coq not found (apt-get install coq)"


# ---- statements ----------------------------------------------------------------------------------
def _lin(rng: random.Random, vars_: list[str], max_c: int) -> tuple[str, str]:
    """A random nat expression over vars_ and its normal form `c1 * a + c2 * b + k`."""
    coef = {v: 0 for v in vars_}
    terms = []
    for _ in range(rng.randint(2, 3)):
        sub = rng.sample(vars_, rng.randint(1, len(vars_)))
        c = rng.randint(1, max_c)
        for v in sub:
            coef[v] += c
        inner = " + ".join(sub)
        terms.append(f"{c} * ({inner})" if len(sub) > 1 else f"{c} * {inner}")
    k = rng.randint(0, 9)
    lhs = " + ".join(terms) + (f" + {k}" if k else "")
    rhs = " + ".join(f"{coef[v]} * {v}" for v in vars_ if coef[v]) + (f" + {k}" if k else "")
    if lhs == rhs or "(" not in lhs:  # a grouped sum makes the sides differ beyond conversion
        return _lin(rng, vars_, max_c)
    return lhs, rhs


def family_linear(rng, level):
    vars_ = ["a", "b"] if level <= 2 else ["a", "b", "c"]
    lhs, rhs = _lin(rng, vars_, 5)
    return (f"forall {' '.join(vars_)} : nat, {lhs} = {rhs}.", "linear arithmetic over nat: lia decides it.",
            "intros. lia.", rng.choice(["intros. reflexivity.", "intros. simpl. reflexivity.", "intros. auto."]))


def family_inequality(rng, level):
    c, k, m = rng.randint(2, 6), rng.randint(1, 9), rng.randint(0, 9)
    return (f"forall a b : nat, a <= b -> {c} * a + {k} <= {c} * b + {k + m}.",
            "a linear inequality under a hypothesis: lia.", "intros. lia.",
            rng.choice(["intros. ring.", "intros. reflexivity.", "intros. assumption."]))


def family_prop(rng, level):
    kind = rng.randrange(3)
    if kind == 0:
        n = rng.randint(2, 4)
        ps = [f"P{i}" for i in range(n + 1)]
        hyps = " -> ".join(f"({ps[i]} -> {ps[i + 1]})" for i in range(n))
        stmt = f"forall {' '.join(ps)} : Prop, {hyps} -> {ps[0]} -> {ps[-1]}."
        return stmt, "a chain of implications: tauto.", "intros. tauto.", "intros. assumption."
    if kind == 1:
        return ("forall P Q R : Prop, P /\\ Q /\\ R -> R /\\ Q /\\ P.", "commute a conjunction: split it up.",
                "intros P Q R [HP [HQ HR]]. split. exact HR. split. exact HQ. exact HP.",
                "intros P Q R H. exact H.")
    return ("forall P Q : Prop, P \\/ Q -> Q \\/ P.", "commute a disjunction: case on it.",
            "intros P Q [HP | HQ]. right. exact HP. left. exact HQ.", "intros P Q H. left. exact H.")


def family_ring(rng, level):
    c, d = rng.randint(1, 5), rng.randint(1, 5)
    op = rng.choice(["+", "-"])
    sq = f"(x {op} {c} * y) * (x {op} {c} * y)"
    rhs = f"x * x {op} {2 * c} * x * y + {c * c} * y * y"
    if rng.random() < 0.5:
        return (f"forall x y : Z, ({sq} = {rhs})%Z.", "a polynomial identity over Z: ring normalizes both sides.",
                "intros. ring.", rng.choice(["intros. reflexivity.", "intros. auto.", "intros. simpl. reflexivity."]))
    return (f"forall x y : Z, ((x + {d}) * (y + {c}) = x * y + {c} * x + {d} * y + {c * d})%Z.",
            "a polynomial identity over Z: ring.", "intros. ring.",
            rng.choice(["intros. reflexivity.", "intros. auto."]))


def family_list(rng, level):
    k = rng.randint(1, 9)
    options = [
        ("forall l1 l2 : list nat, length (l1 ++ l2) = length l1 + length l2.", "length distributes over app.",
         "intros. apply app_length.", "intros. lia."),
        ("forall l1 l2 : list nat, length (l1 ++ l2) = length (l2 ++ l1).", "rewrite both lengths, then lia.",
         "intros. rewrite !app_length. lia.", "intros. reflexivity."),
        ("forall l : list nat, rev (rev l) = l.", "rev is an involution.", "intros. apply rev_involutive.",
         "intros. reflexivity."),
        (f"forall l : list nat, length (map (fun x => x * {k}) l) = length l.", "map keeps the length.",
         "intros. apply map_length.", "intros. lia."),
        (f"forall l : list nat, length (map (fun x => x + {k}) l) = length l.",
         "induction on the list: each cons adds one on both sides.",
         "induction l as [| h t IH]. reflexivity. simpl. rewrite IH. reflexivity.", "intros. reflexivity."),
    ]
    return rng.choice(options)


FAMILIES = [(1, family_linear), (2, family_inequality), (3, family_prop), (4, family_ring), (5, family_list)]


class ProofTask(BatchCheckedTask):
    name = "proof"
    sandboxed = True
    max_answer_chars = MAX_SCRIPT_CHARS

    def __init__(self, weights=None, pool: CoqPool | None = None):
        super().__init__(weights)
        self._pool = pool

    @property
    def pool(self) -> CoqPool:
        if self._pool is None and coq_missing():
            raise ConfigError(f"the proof task needs Coq: {coq_missing()}")
        return self._pool or default_pool()

    def sample(self, rng: random.Random, difficulty: int | None = None) -> Problem:
        d = self.check_difficulty(difficulty)
        fams = [f for lv, f in FAMILIES if lv <= d]
        stmt, think, proof, wrong = rng.choice(fams)(rng, d)
        return Problem(prompt=f"Prove in Coq: {stmt}", answer=proof,
                       meta={"task": self.name, "statement": stmt, "think": think, "wrong": wrong,
                             "difficulty": d})

    def canonical(self, problem: Problem) -> str:
        return problem.meta["statement"]

    def check_batch(self, problems: list[Problem], answers: list[str]) -> list[bool]:
        return self.pool.check([(p.meta["statement"], a) for p, a in zip(problems, answers)])

    def solution(self, problem: Problem, rng: random.Random, flawed: bool = False) -> str:
        return format_completion(problem.meta["think"], problem.meta["wrong"] if flawed else problem.answer)
