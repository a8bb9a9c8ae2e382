"""Multi-step integer arithmetic with the usual precedence, e.g. `Compute 12 + 7 * 3 - 5.` -> 28.

The worked solution does one binary operation per step, products and quotients first (left to right),
then sums and differences left to right:

    <think>7*3=21. 12+21=33. 33-5=28.</think><answer>28</answer>

Difficulty (1..5) sets the number of operations, the operand range and the operators; the default (2) is
small on purpose so that a ~2M-parameter model can learn it in minutes on a CPU:

    level  operations  operands  operators  max '*'/'/' per problem
      1       1-2       1..10     + - *          1
      2       2-3       1..20     + - *          1
      3       3-4       1..50     + - *          2
      4       3-5       1..100    + - * /        2
      5       4-6       1..999    + - * /        3

Division appears only where it is exact (the divisor is drawn from the running product's divisors), so
every intermediate and the answer are integers. Operands are >= 1, so a slip in a flawed solution
always reaches the final answer. The answer must be a plain ASCII integer (`-?[0-9]{1,12}`).
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

from nanoseek.tasks.base import Problem, Task, format_completion

_INT = re.compile(r"-?[0-9]{1,12}")
SLIP_DELTAS = (-10, -2, -1, 1, 2, 10)  # off-by-one and carry-style mistakes


@dataclass(frozen=True)
class Level:
    min_ops: int
    max_ops: int
    max_operand: int
    operators: str
    max_mul: int


LEVELS = {
    1: Level(1, 2, 10, "+-*", 1),
    2: Level(2, 3, 20, "+-*", 1),
    3: Level(3, 4, 50, "+-*", 2),
    4: Level(3, 5, 100, "+-*/", 2),
    5: Level(4, 6, 999, "+-*/", 3),
}


@dataclass(frozen=True)
class Step:
    a: int
    op: str
    b: int
    result: int

    def text(self) -> str:
        return f"{self.a}{self.op}{self.b}={self.result}."


def _apply(a: int, op: str, b: int) -> int | None:
    """Integer result, or None for an inexact or zero division."""
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if b == 0 or a % b:
        return None
    return a // b


def evaluate_steps(tokens: list, slip: tuple[int, int] | None = None) -> list[Step] | None:
    """One Step per operation in precedence order. `slip=(i, delta)` adds delta to step i's result and
    carries the wrong value on; returns None if that makes a later division inexact."""
    steps: list[Step] = []

    def do(a: int, op: str, b: int) -> int | None:
        r = _apply(a, op, b)
        if r is None:
            return None
        if slip is not None and slip[0] == len(steps):
            r += slip[1]
        steps.append(Step(a, op, b, r))
        return r

    # pass 1: reduce each multiplicative term, left to right
    terms: list[int] = [tokens[0]]
    add_ops: list[str] = []
    for i in range(1, len(tokens), 2):
        op, n = tokens[i], tokens[i + 1]
        if op in "*/":
            r = do(terms[-1], op, n)
            if r is None:
                return None
            terms[-1] = r
        else:
            add_ops.append(op)
            terms.append(n)
    # pass 2: sums and differences, left to right
    value = terms[0]
    for op, t in zip(add_ops, terms[1:]):
        value = do(value, op, t)
    return steps


class ArithmeticTask(Task):
    name = "arithmetic"

    def sample(self, rng: random.Random, difficulty: int | None = None) -> Problem:
        d = self.check_difficulty(difficulty)
        lv = LEVELS[d]
        n_ops = rng.randint(lv.min_ops, lv.max_ops)
        tokens: list = [rng.randint(1, lv.max_operand)]
        term = tokens[0]  # value of the multiplicative term being built, to keep divisions exact
        n_mul = 0
        for _ in range(n_ops):
            ops = lv.operators if n_mul < lv.max_mul else "+-"
            op = rng.choice(ops)
            if op == "/":
                divisors = [k for k in range(2, min(term - 1, lv.max_operand) + 1) if term % k == 0]
                if divisors:
                    n = rng.choice(divisors)
                else:
                    op, n = "*", rng.randint(1, lv.max_operand)
            else:
                n = rng.randint(1, lv.max_operand)
            if op in "*/":
                n_mul += 1
                term = term * n if op == "*" else term // n
            else:
                term = n
            tokens += [op, n]
        return self.from_tokens(tokens, d)

    def from_tokens(self, tokens: list, difficulty: int) -> Problem:
        expr = " ".join(str(t) for t in tokens)
        answer = evaluate_steps(tokens)[-1].result
        return Problem(prompt=f"Compute {expr}.", answer=str(answer),
                       meta={"task": self.name, "expr": expr, "difficulty": difficulty})

    @staticmethod
    def tokens_of(problem: Problem) -> list:
        parts = problem.meta["expr"].split(" ")
        return [p if p in "+-*/" else int(p) for p in parts]

    def canonical(self, problem: Problem) -> str:
        return problem.meta["expr"]

    def check(self, problem: Problem, answer: str) -> bool:
        return _INT.fullmatch(answer) is not None and int(answer) == int(problem.answer)

    def solution(self, problem: Problem, rng: random.Random, flawed: bool = False,
                 reflect_rng: random.Random | None = None) -> str:
        """The worked solution; with `reflect_rng` it carries one check line (nanoseek.tasks.reflection): a
        flawed one then fixes its slip and reaches the right answer. The slip is drawn from `rng` either way."""
        tokens = self.tokens_of(problem)
        steps = evaluate_steps(tokens)
        correct = steps
        if flawed:
            steps = self._flawed_steps(tokens, len(steps), int(problem.answer), rng)
        if reflect_rng is not None:
            from nanoseek.tasks.reflection import reflected_think

            return format_completion(reflected_think(correct, steps if flawed else None, reflect_rng),
                                     str(correct[-1].result))
        think = " ".join(s.text() for s in steps)
        return format_completion(think, str(steps[-1].result))

    @staticmethod
    def _flawed_steps(tokens: list, n_steps: int, answer: int, rng: random.Random) -> list[Step]:
        """Exactly one wrong step, carried on correctly, ending at a wrong answer."""
        for _ in range(20):
            slip = (rng.randrange(n_steps), rng.choice(SLIP_DELTAS))
            steps = evaluate_steps(tokens, slip)
            if steps is not None and steps[-1].result != answer:
                return steps
        return evaluate_steps(tokens, (n_steps - 1, rng.choice(SLIP_DELTAS)))  # last step: always wrong
