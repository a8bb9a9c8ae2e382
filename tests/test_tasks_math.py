"""The `math` task: word problems with worked solutions, answers checked by math-verify in sandboxed workers."""
from __future__ import annotations

import random
import time
from fractions import Fraction

import pytest

from nanoseek.tasks import get_task
from nanoseek.tasks.base import format_completion
from nanoseek.tasks.math_word import MathPool, MathWordTask, run_steps
from sandbox_util import leftovers, need


@pytest.fixture(scope="module")
def task():
    pytest.importorskip("math_verify", reason="pip install math-verify")
    need("bwrap", "the math-verify workers' sandbox")
    pool = MathPool(2)
    yield MathWordTask(pool=pool)
    pool.close()


def test_worked_solutions_and_slips(task):
    rng = random.Random(0)
    problems = [task.sample(rng, d) for d in range(1, 6) for _ in range(12)]
    good = task.score_batch(problems, [task.solution(p, rng) for p in problems])
    bad = task.score_batch(problems, [task.solution(p, rng, flawed=True) for p in problems])
    assert all(s.correct and s.format_ok for s in good)
    assert not any(s.correct for s in bad) and all(s.format_ok for s in bad)
    for p in problems:  # the gold answer is the exact value of the plan (an independent Fraction reference)
        assert Fraction(p.answer) == run_steps(p.meta["plan"])[-1].result


def test_equivalent_forms_are_accepted_and_order_matters(task):
    p = next(q for q in (task.sample(random.Random(i), 1) for i in range(200)) if "/" in q.answer)
    n, d = (int(x) for x in p.answer.split("/"))
    for ok in (p.answer, f"\\frac{{{n}}}{{{d}}}", f"\\boxed{{{p.answer}}}", f"${p.answer}$", repr(n / d)):
        assert task.check(p, ok), ok
    for wrong in (f"{n}/{d + 1}", f"{n + 1}/{d}", str(n), "", "x"):
        assert not task.check(p, wrong), wrong
    q = next(q for q in (task.sample(random.Random(i), 2) for i in range(200)) if "/" not in q.answer)
    a = int(q.answer)
    for ok in (str(a), f"{a}.0", f"\\boxed{{{a}}}"):
        assert task.check(q, ok), ok
    assert not task.check(q, str(a + 1))


def test_hostile_answers_score_wrong_in_time(task):
    p = task.sample(random.Random(5), 2)
    hostile = ["__import__('os').system('touch /tmp/pwned')", "9^9^9^9^9^9", "10**10**10",
               "\\boxed{" * 40 + "1" + "}" * 40, "(" * 150 + "1" + ")" * 150, "\u0663", "1e309", "nan",
               "exec(chr(49))", p.answer + "; import os"]
    before = set(leftovers())
    t0 = time.monotonic()
    scores = task.score_batch([p] * len(hostile), [format_completion("x", h) for h in hostile])
    assert not any(s.correct for s in scores), [h for h, s in zip(hostile, scores) if s.correct]
    assert time.monotonic() - t0 < len(hostile) * 5.0 / 2 + 5
    assert task.check(p, p.answer)  # workers alive (or restarted) and right
    task._pool.close()
    assert set(leftovers()) - before == set()


def test_registry_determinism_and_split():
    task = get_task("math")
    assert [task.sample(random.Random(7), d) for d in range(1, 6)] == [task.sample(random.Random(7), d)
                                                                         for d in range(1, 6)]
    rng = random.Random(0)
    train = {task.canonical(task.sample_split(rng, 2, "train")) for _ in range(500)}
    test = {task.canonical(task.sample_split(rng, 2, "test")) for _ in range(100)}
    assert len(test) > 50 and not (train & test)
