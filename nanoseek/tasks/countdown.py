"""Countdown: combine the given numbers with + - * / and parentheses to hit a target exactly.

Prompt: `Reach 33 using 3, 7, 12 (+ - * /, each at most once).` The answer is an expression such as
`12*3-7`; the checker (`safe_expr`, never `eval`) accepts it iff it parses within the bounds, uses only
given numbers, each at most as often as given, and equals the target exactly (rational arithmetic).
Using a subset of the numbers is allowed; unary minus is not (see safe_expr).

Generation guarantees solvability: a random binary expression tree over ALL the drawn numbers is built
and its value becomes the target; trees with a non-positive or non-integer intermediate, a target above
the level's cap, or a target equal to one of the numbers (a trivial answer) are redrawn.

    level  numbers  range    target cap
      1       3     1..10      100
      2      3-4    1..20      200
      3       4     1..25      500
      4      4-5    1..50     1000
      5      5-6    1..100    1000

Worked solution: one step per operation in post-order, then the expression:
`<think>12*3=36. 36-7=29.</think><answer>12*3-7</answer>`. A flawed solution writes the steps of a
nearby WRONG expression (one operator changed) with exactly one slip chosen so that, carried on
correctly, the trace ends at the target: it looks like success, but its answer misses the target.
"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction

from nanoseek.tasks.base import Problem, Task, format_completion
from nanoseek.tasks.safe_expr import try_evaluate

OPS = "+-*/"
_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}

# A tree is an int leaf or a list [op, left, right] (a list, so it survives JSON in Problem.meta).
Tree = int | list


@dataclass(frozen=True)
class Level:
    min_numbers: int
    max_numbers: int
    max_number: int
    max_target: int


LEVELS = {
    1: Level(3, 3, 10, 100),
    2: Level(3, 4, 20, 200),
    3: Level(4, 4, 25, 500),
    4: Level(4, 5, 50, 1000),
    5: Level(5, 6, 100, 1000),
}


def _apply(a: int, op: str, b: int) -> int | None:
    """Integer result, or None where Countdown forbids it (inexact or zero division)."""
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    return a // b if b != 0 and a % b == 0 else None


def value(tree: Tree) -> int | None:
    """Value, or None if some intermediate is not a positive integer (the Countdown rule).
    Plain ints, not Fractions: every allowed intermediate is an integer, and this is the hot loop."""
    if isinstance(tree, int):
        return tree
    a, b = value(tree[1]), value(tree[2])
    if a is None or b is None:
        return None
    r = _apply(a, tree[0], b)
    if r is None or r <= 0:
        return None
    return r


def render(tree: Tree) -> str:
    """Infix text with only the parentheses the precedence needs (right operands of equal
    precedence keep theirs, so `a-(b-c)` and `a/(b*c)` stay correct)."""
    if isinstance(tree, int):
        return str(tree)
    op, left, right = tree
    lt, rt = render(left), render(right)
    if isinstance(left, list) and _PREC[left[0]] < _PREC[op]:
        lt = f"({lt})"
    if isinstance(right, list) and _PREC[right[0]] <= _PREC[op]:
        rt = f"({rt})"
    return f"{lt}{op}{rt}"


def random_tree(numbers: list[int], rng: random.Random) -> Tree:
    """A uniformly-split random binary tree over `numbers` in the given order, random operators."""
    if len(numbers) == 1:
        return numbers[0]
    k = rng.randint(1, len(numbers) - 1)
    return [rng.choice(OPS), random_tree(numbers[:k], rng), random_tree(numbers[k:], rng)]


def _internal_paths(tree: Tree, path: tuple = ()) -> list[tuple]:
    if isinstance(tree, int):
        return []
    return _internal_paths(tree[1], path + (1,)) + _internal_paths(tree[2], path + (2,)) + [path]


def _desired_values(tree: Tree, want: int, path: tuple = ()) -> dict[tuple, int]:
    """For each internal node, the integer it would have to equal for the root to equal `want` when
    everything above it is computed correctly (absent where no such integer exists)."""
    if isinstance(tree, int):
        return {}
    out = {path: want}
    op, left, right = tree
    lv, rv = value(left), value(right)
    for side, (s, mine_left) in ((1, (rv, True)), (2, (lv, False))):
        if op == "+":
            c = want - s
        elif op == "-":
            c = want + s if mine_left else s - want
        elif op == "*":
            c = Fraction(want) / s
        else:
            c = Fraction(want * s) if mine_left else (Fraction(s, want) if want != 0 else None)
        if c is not None and c.denominator == 1 and c >= 0:
            out.update(_desired_values(tree[side], int(c), path + (side,)))
    return out


def steps(tree: Tree, override: dict[tuple, int] | None = None) -> list[str]:
    """`a op b=r.` per operation in post-order; `override` replaces the result at a node (a slip)."""
    override = override or {}
    out: list[str] = []

    def walk(t: Tree, path: tuple) -> int:
        if isinstance(t, int):
            return t
        a, b = walk(t[1], path + (1,)), walk(t[2], path + (2,))
        r = override.get(path)
        if r is None:
            r = _apply(a, t[0], b)
        out.append(f"{a}{t[0]}{b}={r}.")
        return r

    walk(tree, ())
    return out


class CountdownTask(Task):
    name = "countdown"

    def sample(self, rng: random.Random, difficulty: int | None = None) -> Problem:
        d = self.check_difficulty(difficulty)
        lv = LEVELS[d]
        while True:
            numbers = [rng.randint(1, lv.max_number) for _ in range(rng.randint(lv.min_numbers, lv.max_numbers))]
            tree = random_tree(numbers, rng)
            v = value(tree)
            if v is not None and v <= lv.max_target and v not in numbers:
                break
        prompt = f"Reach {v} using {', '.join(map(str, numbers))} (+ - * /, each at most once)."
        return Problem(prompt=prompt, answer=render(tree),
                       meta={"task": self.name, "numbers": numbers, "target": v, "tree": tree,
                             "difficulty": d})

    def canonical(self, problem: Problem) -> str:
        return f"{problem.meta['target']}:{sorted(problem.meta['numbers'])}"

    def check(self, problem: Problem, answer: str) -> bool:
        result = try_evaluate(answer)
        if result is None or result.value != problem.meta["target"]:
            return False
        return not (Counter(result.numbers) - Counter(problem.meta["numbers"]))

    def solution(self, problem: Problem, rng: random.Random, flawed: bool = False) -> str:
        tree = problem.meta["tree"]
        if not flawed:
            return format_completion(" ".join(steps(tree)), render(tree))
        target = problem.meta["target"]
        wrong = self._wrong_tree(tree, problem.meta["numbers"], target, rng)
        true_values = {p: value(_at(wrong, p)) for p in _internal_paths(wrong)}
        slips = [(p, v) for p, v in sorted(_desired_values(wrong, target).items()) if v != true_values[p]]
        path, claimed = rng.choice(slips)  # never empty: the root itself must equal target, and does not
        return format_completion(" ".join(steps(wrong, {path: claimed})), render(wrong))

    @staticmethod
    def _wrong_tree(tree: Tree, numbers: list[int], target: int, rng: random.Random) -> Tree:
        """A valid expression over the numbers that misses the target: one operator changed if
        possible, else a fresh random tree."""
        candidates = []
        for path in _internal_paths(tree):
            for op in OPS:
                if op != _at(tree, path)[0]:
                    t = _replace_op(tree, path, op)
                    v = value(t)
                    if v is not None and v != target:
                        candidates.append(t)
        if candidates:
            return rng.choice(candidates)
        for _ in range(10_000):
            order = numbers[:]
            rng.shuffle(order)
            t = random_tree(order, rng)
            v = value(t)
            if v is not None and v != target:
                return t
        raise RuntimeError(f"no wrong expression found for {numbers} -> {target}")


def _at(tree: Tree, path: tuple) -> Tree:
    for side in path:
        tree = tree[side]
    return tree


def _replace_op(tree: Tree, path: tuple, op: str) -> Tree:
    if not path:
        return [op, tree[1], tree[2]]
    out = list(tree)
    out[path[0]] = _replace_op(tree[path[0]], path[1:], op)
    return out
