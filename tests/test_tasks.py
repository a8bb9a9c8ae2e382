"""Tasks: safe parsing, format/reward rules, hostile completions, determinism, splits, worked solutions."""
from __future__ import annotations

import random
import re
from fractions import Fraction

import pytest

from nanoseek.config import ConfigError
from nanoseek.tasks import TASKS, get_task
from nanoseek.tasks.base import Problem, RewardWeights, extract_answer, is_well_formed
from nanoseek.tasks.countdown import render, value
from nanoseek.tasks.safe_expr import MAX_DEPTH, ExprError, evaluate, try_evaluate

# sandboxed tasks (math, code, proof, humaneval) check in worker processes: tests/test_tasks_*.py covers them
CHEAP = sorted(n for n, t in TASKS.items() if not t.sandboxed)

# ---- safe expression parser -------------------------------------------------------------------


@pytest.mark.parametrize("text, expected, numbers", [
    ("1+2*3", 7, [1, 2, 3]),
    ("(1+2)*3", 9, [1, 2, 3]),
    ("10-4-3", 3, [10, 4, 3]),          # left associative
    ("100/8/5", Fraction(5, 2), [100, 8, 5]),
    ("7/(3-1)", Fraction(7, 2), [7, 3, 1]),
    (" 12 * ( 3 - 1 ) ", 24, [12, 3, 1]),
])
def test_safe_expr_values(text, expected, numbers):
    result = evaluate(text)
    assert result.value == expected and result.numbers == numbers


@pytest.mark.parametrize("text", [
    "", "   ", "1+", "(1+2", "1+2)", "()", "-3+5", "2**3", "2^3", "1e3", "1.5+1", "3 4",
    "__import__('os').system('ls')", "os.system('rm -rf /')", "1+2;3", "abs(-1)", "x",
    "1/0", "5/(3-3)", "9" * 13, "1+" * 150 + "1", "(" * (MAX_DEPTH + 1) + "1" + ")" * (MAX_DEPTH + 1),
    "１+２", "٣+4", "2²", "1\n+2", "\x00",
])
def test_safe_expr_rejects(text):
    with pytest.raises(ExprError):
        evaluate(text)
    assert try_evaluate(text) is None


def test_safe_expr_bounds_are_exact():
    assert evaluate("9" * 12).value == int("9" * 12)
    deep = "(" * MAX_DEPTH + "1" + ")" * MAX_DEPTH
    assert evaluate(deep).value == 1
    assert try_evaluate("(" * 5000 + "1" + ")" * 5000) is None  # length bound, no RecursionError


# ---- format and reward ------------------------------------------------------------------------


def test_format_rules():
    good = "<think>a</think><answer>5</answer>"
    assert is_well_formed(good) and is_well_formed(f"  {good}\n<|eos|>") and is_well_formed(good + "<|eos|><|pad|>")
    for bad in ["<answer>5</answer>", "<think>a</think>", "<answer>5</answer><think>a</think>",
                good + "trailing words", "preamble " + good, good + good,
                "<think>a<think>b</think><answer>5</answer>", "<think>a</think><answer>5</answer></answer>",
                "<think>a</think><|user|><answer>5</answer>", "", "<think></think>"]:
        assert not is_well_formed(bad), bad
    assert extract_answer(good) == "5"
    assert extract_answer("<answer> 7 </answer> tail") == "7"  # extracted even without a think block
    assert extract_answer("<answer>1</answer><answer>2</answer>") is None
    assert extract_answer("</answer>5<answer>") is None
    assert extract_answer("no tags") is None


def test_reward_weights_and_truncation():
    task = get_task("arithmetic", RewardWeights(accuracy=2.0, format=0.5))
    p = task.sample(random.Random(0))
    sol = task.solution(p, random.Random(0))
    assert task.score(p, sol).reward == 2.5
    truncated = task.score(p, sol, truncated=True)
    assert not truncated.correct and truncated.format_ok and truncated.reward == 0.5
    bare = task.score(p, f"<answer>{p.answer}</answer>")
    assert bare.correct and not bare.format_ok and bare.reward == 2.0
    default = get_task("arithmetic")
    assert default.score(p, sol).reward == pytest.approx(1.1)


ADVERSARIAL = [
    "", " ", "<answer></answer>", "<think></think><answer></answer>",
    "<think>x</think><answer>__import__('os').system('echo pwned')</answer>",
    "<think>x</think><answer>eval('1+1')</answer>",
    "<answer>" + "9" * 5000 + "</answer>",
    "<answer>" + "(" * 500 + "1" + ")" * 500 + "</answer>",
    "<answer>1/0</answer>", "<answer>7/(3-3)</answer>",
    "<answer>\x00\ufffd\u202e𝟙𝟚</answer>", "<answer>２８</answer>", "\ud800",
    "<think>x</think><answer>NaN</answer>", "<answer>inf</answer>", "<answer>1e309</answer>",
    "<answer>{a}</answer><answer>{a}</answer>", "<think>x</think><answer>{a}<answer>{a}</answer>",
    "<think>x</think><answer>{a}</answer></answer>",
]


@pytest.mark.parametrize("name", CHEAP)
def test_hostile_completions_score_zero_and_never_raise(name):
    task = get_task(name)
    rng = random.Random(1)
    for _ in range(20):
        p = task.sample(rng)
        for text in ADVERSARIAL:
            s = task.score(p, text.replace("{a}", p.answer))
            assert not s.correct, (p.prompt, text)
            assert s.reward <= task.weights.format
        assert task.score(p, None).reward == 0.0  # not even a string


def test_arithmetic_answer_is_a_strict_integer():
    task = get_task("arithmetic")
    p = task.sample(random.Random(5))
    for text in (p.answer, f" {p.answer} "):
        assert task.score(p, f"<think>x</think><answer>{text}</answer>").correct
    a = int(p.answer)
    for text in (f"{a}.0", f"+{a}", f"{a} + 0", f"0{a}0", str(a + 1), f"{a}{a}", f"x{a}"):
        assert not task.score(p, f"<think>x</think><answer>{text}</answer>").correct, text


def test_countdown_checker_rules():
    task = get_task("countdown")
    p = Problem("Reach 24 using 4, 6, 1, 1.", "4*6", {"numbers": [4, 6, 1, 1], "target": 24})
    for expr in ["4*6", "4*6*1", "(4*6)/1*1", "4 * (6 * (1 * 1))", "6*4+1-1"]:
        assert task.check(p, expr), expr
    for expr in ["4*6*1*1*1", "6*4+6-6", "(1+1)*6*4/2", "4*6+0", "24", "4*7", "(4+6)", "-4*-6", "4*6=24", "1/0*4*6"]:
        assert not task.check(p, expr), expr


# ---- determinism, splits, worked solutions ----------------------------------------------------


@pytest.mark.parametrize("name", CHEAP)
def test_same_seed_same_problems(name):
    task = get_task(name)
    a = [task.sample(random.Random(7), d) for d in range(1, 6)]
    b = [task.sample(random.Random(7), d) for d in range(1, 6)]
    assert a == b
    assert [p.prompt for p in a] != [task.sample(random.Random(8), d).prompt for d in range(1, 6)]


@pytest.mark.parametrize("name", CHEAP)
def test_train_test_disjoint(name):
    task = get_task(name)
    rng = random.Random(0)
    train = {task.canonical(task.sample_split(rng, 1, "train")) for _ in range(2000)}
    test = {task.canonical(task.sample_split(rng, 1, "test")) for _ in range(500)}
    assert len(test) > 50 and not (train & test)
    drawn = [task.split(task.sample(rng, 2)) for _ in range(2000)]
    assert 0.06 < drawn.count("test") / len(drawn) < 0.14  # ~10% test


@pytest.mark.parametrize("name", CHEAP)
def test_worked_solutions(name):
    task = get_task(name)
    rng = random.Random(0)
    for d in range(1, 6):
        for _ in range(150):
            p = task.sample(rng, d)
            good = task.score(p, task.solution(p, rng))
            assert good.correct and good.format_ok and good.reward == pytest.approx(1.1), p
            bad = task.score(p, task.solution(p, rng, flawed=True))
            assert not bad.correct and bad.format_ok, p


def test_arithmetic_flawed_has_exactly_one_slip():
    task = get_task("arithmetic")
    rng = random.Random(3)
    step_re = re.compile(r"(-?[0-9]+)([-+*/])([0-9]+)=(-?[0-9]+)")
    exact = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
             "/": lambda a, b: Fraction(a, b)}
    for _ in range(300):
        p = task.sample(rng, rng.randint(1, 5))
        text = task.solution(p, rng, flawed=True)
        think = text.split("<think>")[1].split("</think>")[0]
        steps = [step_re.fullmatch(s).groups() for s in think.rstrip(".").split(". ")]
        wrong = sum(exact[op](int(a), int(b)) != int(r) for a, op, b, r in steps)
        assert wrong == 1, think
        assert extract_answer(text) == steps[-1][3] != p.answer


def test_countdown_flawed_trace_claims_target_but_answer_misses():
    task = get_task("countdown")
    rng = random.Random(4)
    for _ in range(200):
        p = task.sample(rng)
        text = task.solution(p, rng, flawed=True)
        last_step = text.split("</think>")[0].rstrip(".").split(". ")[-1]
        assert int(last_step.split("=")[1]) == p.meta["target"]
        assert evaluate(extract_answer(text)).value != p.meta["target"]


def test_generated_problems_are_valid():
    ar, cd = get_task("arithmetic"), get_task("countdown")
    rng = random.Random(2)
    for _ in range(300):
        p = ar.sample(rng)  # default: 2-3 operations, operands <= 20, no division
        ops = p.meta["expr"].split(" ")[1::2]
        assert 2 <= len(ops) <= 3 and "/" not in ops
        assert all(1 <= int(n) <= 20 for n in p.meta["expr"].split(" ")[0::2])
        assert evaluate(p.meta["expr"]).value == int(p.answer)
        q = cd.sample(rng)  # default: 3-4 numbers <= 20, solvable, target not a given number
        assert 3 <= len(q.meta["numbers"]) <= 4 and q.meta["target"] not in q.meta["numbers"]
        assert value(q.meta["tree"]) == q.meta["target"] and render(q.meta["tree"]) == q.answer
        assert str(q.meta["target"]) in q.prompt


def test_registry_and_difficulty_errors():
    with pytest.raises(ConfigError, match="known tasks: arithmetic, countdown"):
        get_task("sudoku")
    for name in TASKS:
        with pytest.raises(ConfigError, match="difficulty"):
            get_task(name).sample(random.Random(0), 6)
        with pytest.raises(ConfigError, match="split"):
            get_task(name).sample_split(random.Random(0), 2, "dev")
