"""`nanoseek aha` (issue 28): the Countdown search task and corpus, the pre-RL diagnostic on hand-made
completions, and the recipe on a micro config (--until, resume, refused settings change).

The references are independent of the code under test: attempt values are re-evaluated with the safe
expression parser (not candidate_value), verdicts re-derived from the prompt's target, and the diagnostic's
figures counted by hand."""
from pathlib import Path
import json
import math
import random
import re

import pytest

from nanoseek.cli import main
from nanoseek.config import ConfigError
from nanoseek.corpus import build_corpus
from nanoseek.tasks import get_task
from nanoseek.tasks.base import extract_answer
from nanoseek.tasks.safe_expr import evaluate
from nanoseek.tasks.search import ORDER, parse_attempts, search_stats
from nanoseek.tasks.search_diagnostic import diagnose, longer_pays

LINE = re.compile(r"(\([^)]*\)[-+*]\d+)=(-?\d+)([-+*])(\d+)=(-?\d+), target (-?\d+): (yes|no)\.")


def _target(prompt: str) -> int:
    return int(re.match(r"Reach (-?\d+) using", prompt).group(1))


def test_traces_verify_right_enumerate_in_order_and_answer_the_accepted_attempt():
    task = get_task("countdown_search")
    rng = random.Random(0)
    for _ in range(300):
        p = task.sample_split(rng, 1, "train")
        text = task.solution(p, rng, give_up=0.0)
        lines = LINE.findall(text)
        assert lines and len(lines) == len(parse_attempts(text))
        target = _target(p.prompt)
        for expr, mid, op2, c, value, written_target, verdict in lines:
            assert int(evaluate(expr).value) == int(value)  # the written value is the expression's value
            inner = expr[1:expr.index(")")]
            assert int(evaluate(inner).value) == int(mid) and f"{op2}{c}" == expr[expr.index(")") + 1:]
            assert int(written_target) == target
            assert (verdict == "yes") == (int(value) == target)
        verdicts = [v for *_, v in lines]
        assert verdicts[-1] == "yes" and verdicts.count("yes") == 1  # give_up 0: the search runs to its hit
        assert [a.ops for a in parse_attempts(text)] == list(ORDER[:len(lines)])  # the fixed order, no repeats
        assert extract_answer(text) == lines[-1][0]  # the answer copies the accepted attempt
        assert task.score(p, text).correct and task.score(p, text).format_ok


def test_give_up_prior_holds_statistically_and_reaches_the_corpus():
    task = get_task("countdown_search")
    rng = random.Random(1)
    for p_give_up in (0.2, 0.5):
        stops = continues = 0
        for _ in range(3000):
            prob = task.sample(rng, 1)
            verdicts = [v for *_, v in LINE.findall(task.solution(prob, rng, give_up=p_give_up))]
            for i, v in enumerate(verdicts):
                if v == "no":
                    stops += i == len(verdicts) - 1
                    continues += i < len(verdicts) - 1
        n = stops + continues
        sd = math.sqrt(p_give_up * (1 - p_give_up) / n)
        assert abs(stops / n - p_give_up) < 4 * sd, (p_give_up, stops / n)
    # the corpus passes flawed_share as the give-up prior: at 0 every trace is right, at 0.6 most stop early
    for share, lo, hi in ((0.0, 1.0, 1.0), (0.6, 0.05, 0.4)):
        docs = build_corpus("countdown_search", 400, seed=2, flawed_share=share, fact_share=0.0)
        right = sum(_is_right(p, c) for p, c in docs) / len(docs)
        assert lo <= right <= hi


def test_persist_share_traces_never_give_up_and_zero_changes_nothing():
    """persist_share: that share of the search traces runs to its hit (right, all `no.` lines continue); the
    rest keep the give-up prior; at 0 the corpus is the one built without the option (its own RNG stream)."""
    base = build_corpus("countdown_mod", 600, seed=3, flawed_share=0.9, fact_share=0.0)
    assert build_corpus("countdown_mod", 600, seed=3, flawed_share=0.9, fact_share=0.0, persist_share=0.0) == base
    docs = build_corpus("countdown_mod", 600, seed=3, flawed_share=0.9, fact_share=0.0, persist_share=0.5)
    task = get_task("countdown_mod")
    full = [p for p, c in docs if (a := parse_attempts(c, 10)) and a[-1].verdict]
    full_base = [p for p, c in base if (a := parse_attempts(c, 10)) and a[-1].verdict]
    # at give-up 0.9 a lazy trace reaches its hit only when it is the first attempt or the prior lets it on;
    # half the traces persist, so the share of traces ending on a hit rises by about half of the misses
    lazy_hit = len(full_base) / len(base)
    assert abs(len(full) / len(docs) - (0.5 + 0.5 * lazy_hit)) < 0.08
    for p, c in docs:
        atts = parse_attempts(c, 10)
        assert all(a.value == a.true_value() for a in atts)
    with pytest.raises(ConfigError):
        build_corpus("arithmetic", 10, seed=0, persist_share=0.5)
    assert task.name == "countdown_mod"


def _is_right(prompt: str, completion: str) -> bool:
    ans = extract_answer(completion)
    return ans is not None and evaluate(ans).value == _target(prompt)


def test_one_attempt_rarely_succeeds_and_the_whole_search_always_does():
    task = get_task("countdown_search")
    rng = random.Random(3)
    probs = [task.sample(rng, 1) for _ in range(2000)]
    first = sum(p.meta["hit"] == 1 for p in probs) / len(probs)
    assert 0.05 < first < 0.25  # ~1/9 plus value collisions
    assert all(1 <= p.meta["hit"] <= 9 for p in probs)
    assert 4 < sum(p.meta["hit"] for p in probs) / len(probs) < 6
    with pytest.raises(ConfigError):
        task.sample(rng, 7)
    for p in probs[:200]:  # the Task contract: a flawed solution is well formed and wrong
        bad = task.score(p, task.solution(p, rng, flawed=True))
        assert bad.format_ok and not bad.correct


def _att(expr: str, target: int, verdict: str, value: int | None = None) -> str:
    """A hand-written attempt line; `value` overrides the true value (a wrong computation)."""
    v = int(evaluate(expr).value) if value is None else value
    inner = expr[1:expr.index(")")]
    return f"{expr}={int(evaluate(inner).value)}{expr[expr.index(')') + 1:]}={v}, target {target}: {verdict}."


def test_diagnostic_on_hand_made_completions():
    from nanoseek.tasks.base import Problem

    p = Problem("Reach 12 using 3, 4, 1.", "(3*4)*1", {"numbers": [3, 4, 1], "target": 12})
    a1, a2, a3 = _att("(3+4)+1", 12, "no"), _att("(3+4)-1", 12, "no"), _att("(3*4)*1", 12, "yes")
    liar = _att("(3+4)*1", 12, "yes", value=12)  # claims 12, is 7: a wrong yes
    texts = [f"<think>{a1} {a2} {a3}</think><answer>(3*4)*1</answer>",  # right, 3 attempts
             f"<think>{a1}</think><answer>(3+4)+1</answer>",  # gives up, wrong
             f"<think>{liar}</think><answer>(3+4)*1</answer>",  # wrong yes
             f"<think>{a1} {a2} {a3}</think><answer>(3+4)+1</answer>"]  # accepts but does not copy: wrong
    lens = [30, 10, 10, 30]
    ok = [True, False, False, False]
    d = diagnose([p] * 4, texts, lens, ok, group=[0, 0, 1, 1])
    assert d["pass1"] == 0.25 and d["attempts_mean"] == pytest.approx(8 / 4)
    assert d["yes_count"] == 3 and d["verify_yes_precision"] == pytest.approx(2 / 3)
    assert d["no_count"] == 5 and d["verify_no_precision"] == 1.0
    assert d["value_right"] == pytest.approx(7 / 8)
    # the liar's yes is consistent with what it wrote (value 12, target 12): a miscomputed value, not a bad compare;
    # its second step `7*1=12` is the one wrong step of 16
    assert d["verdict_consistent"] == 1.0 and d["yes_consistent"] == 1.0
    assert d["step_right"] == pytest.approx(15 / 16)
    stop_hazard = diagnose([p], [f"<think>{a3.replace('yes', 'no')} {a1.replace('no', 'yes')}</think>"
                                 "<answer>(3+4)+1</answer>"], [20], [False])
    assert stop_hazard["verdict_consistent"] == 0.0 and stop_hazard["yes_consistent"] == 0.0
    assert d["answer_copies_accepted"] == pytest.approx(2 / 3)
    assert d["gave_up_rate"] == 0.25
    assert d["accuracy_by_attempts"] == {"1": {"n": 2, "pass1": 0.0}, "3": {"n": 2, "pass1": 0.5}}
    assert (d["len_correct"], d["len_wrong"]) == (30, pytest.approx(50 / 3))
    assert (d["attempts_correct"], d["attempts_wrong"]) == (3, pytest.approx(5 / 3))
    # cov over all: x - 20 = [10, -10, -10, 10], y - 0.25 = [.75, -.25, -.25, -.25]: (7.5 + 2.5 + 2.5 - 2.5) / 4
    assert d["cov_len_reward"] == pytest.approx(10 / 4)
    # group 0 ([30, 10], [1, 0]): cov 5; group 1 has no mixed rewards and does not count
    assert d["cov_len_reward_within_group"] == pytest.approx(5.0) and d["mixed_groups"] == 1
    assert longer_pays(d)
    flipped = diagnose([p] * 2, texts[:2], [10, 30], [True, False], group=[0, 0])
    assert flipped["cov_len_reward_within_group"] < 0 and not longer_pays(flipped)
    with pytest.raises(ValueError):
        diagnose([p], texts, lens, ok)
    assert search_stats(texts) == {"attempts_mean": 2.0, "accept_rate": 0.75}


def test_micro_recipe_until_resume_and_settings_guard(tmp_path, monkeypatch):
    """--until stops after a stage; a rerun skips the finished stages (their results read back) and goes on; a
    rerun with other settings is refused with one line (exit 2)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "aha"
    assert main(["aha", "--smoke", "--out", str(out), "--until", "pretrain_base"]) == 0
    first = json.loads((out / "stages.json").read_text())
    assert list(first["done"]) == ["pretrain_base"] and not (out / "summary.json").exists()
    ckpts = sorted(p.name for p in (out / "base" / "checkpoints").iterdir())
    assert main(["aha", "--smoke", "--out", str(out), "--until", "diagnostic"]) == 0
    second = json.loads((out / "stages.json").read_text())
    assert list(second["done"]) == ["pretrain_base", "pretrain_habit", "diagnostic"]
    assert second["done"]["pretrain_habit"]["result"]["step"] == 2  # the smoke habit: 2 steps from the base
    assert (out / "habit" / "tokenizer.json").read_bytes() == (out / "base" / "tokenizer.json").read_bytes()
    assert second["done"]["pretrain_base"] == first["done"]["pretrain_base"]  # not rerun
    assert sorted(p.name for p in (out / "base" / "checkpoints").iterdir()) == ckpts
    d = second["done"]["diagnostic"]["result"]
    assert d["samples"] == 3 * 2 and "longer_pays" in d
    assert 0 <= d["forced"]["forced_share"] <= 1 and 0 <= d["forced"]["pass1"] <= 1  # the budget-forcing probe ran
    assert main(["aha", "--smoke", "--out", str(out), "--give-up", "0.5", "--until", "eval_base"]) == 2
    take3 = tmp_path / "take3"  # --habit-steps 0: no habit stage, RL's start is the base itself
    assert main(["aha", "--smoke", "--out", str(take3), "--habit-steps", "0", "--until", "diagnostic"]) == 0
    done = json.loads((take3 / "stages.json").read_text())["done"]
    assert done["pretrain_habit"]["result"] is None and not (take3 / "habit").exists()
    assert main(["aha", "--smoke", "--out", str(out), "--until", "nope"]) == 2
    assert main(["aha", "--out", str(tmp_path / "x"), "--give-up", "1.0"]) == 2


def test_habit_stage_trains_on_lazy_traces_from_the_base(tmp_path, monkeypatch):
    """The habit stage starts from the base's latest checkpoint and pretrains habit_steps at habit_lr on a corpus
    where no trace persists and each `no.` ends the search with probability habit_give_up; the base and the
    control use the main corpus (persist / give_up) and the control starts from the habit base; the lazy
    control uses the habit corpus."""
    import nanoseek.train.pretrain as pretrain_mod
    from nanoseek.recipes import aha

    seen, ran = [], [None]

    class Stop(Exception):
        pass

    def spy(run, pcfg, resume, device, init_from=None):
        seen.append((run.name, pcfg, init_from))
        raise Stop

    monkeypatch.setattr(pretrain_mod, "pretrain", spy)
    monkeypatch.setattr("nanoseek.train.checkpoint.latest_checkpoint",
                        lambda d: None if Path(d).parent.name in ("habit", "control") and Path(d).parent == ran[-1] else Path(d) / "step_9")
    cfg = aha.AhaConfig(habit_steps=7, habit_give_up=0.95, habit_lr=3e-4, persist=0.4, give_up=0.8)
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "tokenizer.json").write_text("{}")
    ran.append(tmp_path / "habit")  # the run being trained has no checkpoint yet; its init has one
    with pytest.raises(Stop):
        aha._pretrain(tmp_path / "habit", cfg, init_from=tmp_path / "base", habit=True)
    name, pcfg, start = seen[-1]
    assert (name, pcfg.train.steps, pcfg.train.lr) == ("habit", 7, 3e-4)
    assert (pcfg.data.persist_share, pcfg.data.flawed_share, pcfg.data.packing) == (0.0, 0.95, "aligned-fresh")
    assert not pcfg.time_schedule
    assert start == tmp_path / "base" / "checkpoints" / "step_9"
    (tmp_path / "habit").mkdir(exist_ok=True)
    (tmp_path / "habit" / "tokenizer.json").write_text("{}")
    ran.append(tmp_path / "control")
    with pytest.raises(Stop):
        aha._pretrain(tmp_path / "control", cfg, init_from=tmp_path / "habit", seconds=30.0)
    name, pcfg, start = seen[-1]
    assert (pcfg.data.persist_share, pcfg.data.flawed_share) == (0.4, 0.8) and pcfg.time_schedule
    assert start == tmp_path / "habit" / "checkpoints" / "step_9"
    with pytest.raises(Stop):  # the habit-corpus control: the habit stage's data, the control's lr and time budget
        aha._pretrain(tmp_path / "control", cfg, init_from=tmp_path / "habit", seconds=30.0, lazy=True)
    name, pcfg, start = seen[-1]
    assert (pcfg.data.persist_share, pcfg.data.flawed_share) == (0.0, 0.95) and pcfg.time_schedule
    assert pcfg.train.lr == cfg.base_lr * cfg.control_lr_scale and pcfg.train.minutes == 0.5


@pytest.mark.slow
def test_aha_smoke_end_to_end(tmp_path):
    out = tmp_path / "aha"
    assert main(["aha", "--smoke", "--out", str(out), "--until", "eval_rl"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["control_pass1"] is None and s["long2short"]["l2s_dpo"] is None
    assert main(["aha", "--smoke", "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    for key in ("base_len", "rl_len", "base_pass1", "rl_pass1", "long_tokens_per_correct", "long2short",
                "seconds_total", "diagnostic", "control_pass1", "partial", "skill_pass1", "habit_steps"):
        assert key in s
    assert set(s["long2short"]) == {"l2s_length", "l2s_shortest", "l2s_dpo", "l2s_merge"}
    rows = [json.loads(x) for x in (out / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert rows and all("attempts_mean" in r and "accept_rate" in r for r in rows)
    assert (out / "report.md").read_text().startswith("# nanoseek aha: Countdown search")


def test_mod_task_values_verdicts_and_checker():
    """countdown_mod: every step mod 10 (Python's %, so 0-1 = 9), the planted candidate hits, any expression whose
    value mod 10 is the target counts, and the diagnostic reads true values mod 10."""
    from nanoseek.tasks.base import Problem
    from nanoseek.tasks.search import SearchModTask, candidate_value

    task = get_task("countdown_mod")
    assert isinstance(task, SearchModTask)
    assert candidate_value([7, 7, 1], ("-", "-"), 10) == (0, 9) and candidate_value([9, 8, 7], ("*", "*"), 10) == (2, 4)
    rng = random.Random(0)
    probs = [task.sample(rng) for _ in range(2000)]
    assert all(p.prompt.startswith(f"Reach {p.meta['target']} mod 10 using ") for p in probs)
    assert all(0 <= p.meta["target"] <= 9 and all(1 <= n <= 9 for n in p.meta["numbers"]) for p in probs)
    assert all(task.check(p, p.answer) for p in probs)
    assert 3 < sum(p.meta["hit"] for p in probs) / len(probs) < 4.5  # collisions: ~3.8, not ~5 as without mod
    for p in probs[:300]:
        full = task.solution(p, rng, give_up=0.0)
        atts = parse_attempts(full, 10)
        assert len(atts) == p.meta["hit"] and atts[-1].verdict and not any(a.verdict for a in atts[:-1])
        assert all(a.value == a.true_value() and len(a.steps_right()) == 4 and all(a.steps_right()) for a in atts)
        assert [a.check[1] == 0 for a in atts] == [a.verdict for a in atts]  # the verdict reads the difference
        assert task.score(p, full).correct
        bad = task.score(p, task.solution(p, rng, flawed=True))
        assert bad.format_ok and not bad.correct
    p = Problem("Reach 3 mod 10 using 9, 4, 7.", "", {"numbers": [9, 4, 7], "target": 3, "modulus": 10})
    assert task.check(p, "(9+4)*1") is False  # 1 is not given
    assert task.check(p, "9*7") and task.check(p, "(9+4)+7*0") is False  # 63 = 3 mod 10; 0 not given
    assert task.check(p, "(9-4)-7") is False  # -2 = 8 mod 10
    liar = "(9+4)+7=3+7=0, target 3: yes."  # true 13 mod 10 = 3, 3+7 = 0: value right, verdict inconsistent
    d = diagnose([p], [f"<think>{liar}</think><answer>(9+4)+7</answer>"], [10], [False])
    assert d["value_right"] == 1.0 and d["verify_yes_precision"] == 0.0 and d["verdict_consistent"] == 0.0
    # difference format: a wrong difference (3-3=1) makes a consistent `no.` on a hit - the check's fault, not the verdict's
    miss = "(9+4)+7=3+7=0, 0-3=7: no. (9+4)-7=3-7=6, 6-3=3: no. (9+4)*7=3*7=1, 1-3=8: no. (9-4)+7=5+7=2, 2-3=9: no."
    hit_missed = "(9*4)+7=6+7=3, 3-3=1: no."  # 43 = 3 mod 10: a hit, its difference written 1
    d = diagnose([p], [f"<think>{miss} {hit_missed}</think><answer>(9*4)+7</answer>"], [30], [False])
    assert d["verdict_reads_check"] == 1.0 and d["verdict_consistent"] == pytest.approx(4 / 5)
    assert d["value_right"] == 1.0 and d["verify_no_precision"] == pytest.approx(4 / 5)
    assert d["step_right"] == pytest.approx(19 / 20)
    assert d["by_position"]["5"] == {"n": 1, "steps_right": 0.75, "verdict_right": 0.0}
    assert d["by_position"]["1"] == {"n": 1, "steps_right": 1.0, "verdict_right": 1.0}


def test_force_point_resumes_only_give_ups():
    """Budget forcing resumes a search that closed its think block right after a `no.`, cut after that `no.` with
    the next attempt's ` (`; an accepted search, an unfinished one, or a think block closed after anything else
    is left alone."""
    from nanoseek.recipes.aha import force_point

    gave_up = "<think>(9+4)+7=3+7=0, 0-3=7: no. (9+4)-7=3-7=6, 6-3=3: no.</think><answer>(9+4)-7</answer>"
    assert force_point(gave_up) == "<think>(9+4)+7=3+7=0, 0-3=7: no. (9+4)-7=3-7=6, 6-3=3: no. ("
    assert force_point("<think>(9*4)+7=6+7=3, 3-3=0: yes.</think><answer>(9*4)+7</answer>") is None
    assert force_point("<think>(9+4)+7=3+7=0, 0-3=7: no. (9+4)-7=3-") is None  # budget ran out mid-attempt
    assert force_point("<think>(9+4)+7=3+7=0, 0-3=7: no. (9+4)</think><answer>1</answer>") is None
    assert force_point("<answer>(9+4)+7</answer>") is None
    assert force_point("<think>a: no. </think>") == "<think>a: no. ("


def test_forced_search_resumes_each_give_up_with_the_next_attempt(monkeypatch, tmp_path):
    """forced_search on a scripted model: a give-up is fed back as prompt + its text up to the last `no.` + ` (`,
    the continuation appended; an accepted search is left as sampled; the budget shrinks by the text so far;
    after `rounds` resumptions a give-up stands."""
    import types

    import nanoseek.engine
    import nanoseek.tokenizer
    import nanoseek.train.checkpoint
    from nanoseek.recipes.aha import forced_search
    from nanoseek.tasks import get_task

    class Tok:
        def encode(self, text):
            return [ord(c) for c in text]

        def prompt_ids(self, text):
            return [1, 2]

    calls = []

    class FakeEngine:
        def __init__(self, model, tok):
            pass

        def generate(self, prompts, max_new_tokens, temperature, seed):
            outs = []
            for p in prompts:  # a resumed search: one more wrong attempt, and a give-up again
                calls.append(("".join(map(chr, p[2:])), max_new_tokens))
                outs.append(types.SimpleNamespace(text="B: no.</think><answer>2</answer>"))
            return outs

    monkeypatch.setattr(nanoseek.engine, "Engine", FakeEngine)
    monkeypatch.setattr(nanoseek.train.checkpoint, "load_run_model", lambda run: (None, None, None))
    monkeypatch.setattr(nanoseek.tokenizer.Tokenizer, "load", staticmethod(lambda path: Tok()))
    problems = [get_task("countdown_mod").sample_split(random.Random(0), 1, "train")]
    script = iter(["<think>A: no.</think><answer>1</answer>", "<think>Y: yes.</think><answer>1</answer>"])
    real_generate = FakeEngine.generate

    def first_round(self, prompts, max_new_tokens, temperature, seed):
        if all(len(p) == 2 for p in prompts):  # round 0: one give-up and one accepted search
            calls.append(("", max_new_tokens))
            return [types.SimpleNamespace(text=next(script)) for _ in prompts]
        return real_generate(self, prompts, max_new_tokens, temperature, seed)

    monkeypatch.setattr(FakeEngine, "generate", first_round)
    jobs, texts, lens, ok, share = forced_search(tmp_path, problems, 2, 0.6, 200, 0, rounds=2)
    give_up, accepted = texts
    assert accepted == "<think>Y: yes.</think><answer>1</answer>"
    # resumed twice (rounds=2), each time after its last `no.`; the last give-up stands
    assert give_up == "<think>A: no. (B: no. (B: no.</think><answer>2</answer>"
    assert share == 0.5 and lens == [len(give_up), len(accepted)]
    assert calls[1] == ("<think>A: no. (", 200 - len("<think>A: no. ("))
