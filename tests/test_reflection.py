"""Reflection corpus option and check-line detection (issue 14)."""
import pytest

from nanoseek.config import ConfigError
from nanoseek.corpus import build_corpus
from nanoseek.tasks.base import extract_answer
from nanoseek.tasks.reflection import check_changed, find_checks, has_check, reflection_stats, reflection_traces


def test_detection_on_hand_written_completions():
    fixed = "<think>7+8=16. check: 7+8=15. 15*2=30.</think><answer>30</answer>"
    rechecked = "<think>7+8=15. check: 7+8=15. 15*2=30.</think><answer>30</answer>"
    plain = "<think>7+8=15. 15*2=30.</think><answer>30</answer>"
    other = "<think>7+8=15. check: 3*2=6. 15*2=30.</think><answer>30</answer>"  # checks another step
    negative = "<think>3-10=-6. check: 3-10=-7. -7+2=-5.</think><answer>-5</answer>"
    malformed = "<think>7+8=15. check: 7+</think><answer>15</answer>"
    assert [has_check(t) for t in (fixed, rechecked, plain, other, negative, malformed)] == \
        [True, True, False, True, True, True]
    assert [check_changed(t) for t in (fixed, rechecked, plain, other, negative, malformed)] == \
        [True, False, False, False, True, False]
    (c,) = find_checks(fixed)
    assert (c.step, c.check, c.same_step, c.changed) == ("7+8=16", "7+8=15", True, True)
    assert not find_checks(other)[0].same_step
    assert reflection_stats([fixed, rechecked, plain, other]) == {"check_rate": 0.75, "check_changed_rate": 0.25,
                                                                  "attempts_mean": 0.0, "accept_rate": 0.0}
    assert reflection_stats([]) == {"check_rate": 0.0, "check_changed_rate": 0.0, "attempts_mean": 0.0,
                                    "accept_rate": 0.0}


def test_zero_share_is_byte_identical_and_default():
    a = build_corpus("arithmetic", 300, 3, flawed_share=0.6, fact_share=0.1)
    b = build_corpus("arithmetic", 300, 3, flawed_share=0.6, fact_share=0.1, reflect_share=0.0)
    assert a == b
    assert not any(has_check(c) for _, c in a)


def test_reflected_corpus_shares_problems_and_fixes_slips():
    plain = build_corpus("arithmetic", 400, 5, flawed_share=0.5, fact_share=0.0)
    refl = build_corpus("arithmetic", 400, 5, flawed_share=0.5, fact_share=0.0, reflect_share=0.25)
    assert [p for p, _ in plain] == [p for p, _ in refl]  # same problems, same order
    with_check = [(p, c) for p, c in refl if has_check(c)]
    assert len(with_check) == 100  # round(0.25 * 400)
    problems = {}
    for p, c in plain + refl:  # answers from an independent evaluation of the expression
        problems[p] = str(eval(p[len("Compute "):-1].replace("/", "//")))
    n_fixed = 0
    for (p, c), (p0, c0) in zip(refl, plain):
        if not has_check(c):
            assert c == c0  # untouched solutions, byte for byte
            continue
        assert extract_answer(c) == problems[p]  # a check always leads to the right answer in the corpus
        checks = find_checks(c)
        assert len(checks) == 1 and checks[0].same_step
        n_fixed += checks[0].changed
        if checks[0].changed:
            assert extract_answer(c0) != problems[p]  # it fixed a slip that the plain version carried on
    assert 25 <= n_fixed <= 75  # about half of the reflected solutions were flawed ones


def test_reflect_share_validation():
    with pytest.raises(ConfigError):
        build_corpus("arithmetic", 10, 0, reflect_share=1.5)
    with pytest.raises(ConfigError):
        build_corpus("countdown", 10, 0, reflect_share=0.2)


def test_cold_start_traces_are_verified_distinct_train_problems_with_a_check():
    from nanoseek.tasks import get_task

    task = get_task("arithmetic")
    rows = reflection_traces(300, seed=4, difficulty=1, flawed_share=0.5)
    assert len(rows) == 300 and len({r["prompt"] for r in rows}) == 300
    for r in rows:
        # the answer from an independent evaluation of the expression, not from the generator
        assert r["answer"] == str(eval(r["prompt"][len("Compute "):-1].replace("/", "//")))
        assert extract_answer(r["completion"]) == r["answer"] and has_check(r["completion"])
        (c,) = find_checks(r["completion"])
        assert c.same_step and c.changed == r["fixed_slip"]
        expr = r["prompt"][len("Compute "):-1]
        problem = task.from_tokens([t if t in "+-*/" else int(t) for t in expr.split(" ")], 1)
        assert task.split(problem) == "train"  # never a test-split problem in SFT data
    assert 0.35 <= sum(r["fixed_slip"] for r in rows) / 300 <= 0.65  # about flawed_share of them fix a slip
    assert reflection_traces(300, seed=4, difficulty=1, flawed_share=0.5) == rows  # seeded
    assert not any(r["fixed_slip"] for r in reflection_traces(50, seed=4, difficulty=1, flawed_share=0.0))
