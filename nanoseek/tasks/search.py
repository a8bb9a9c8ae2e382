"""Countdown search: a task where thinking longer pays (issue 28, the R1-Zero "aha" in miniature).

R1-Zero (arXiv 2501.12948 sec. 2.2.4) and TinyZero's Countdown runs grow their response length under RL because
the base already searches and verifies, rarely, and longer searches are right more often. This task builds
those conditions on purpose, each one measurable (nanoseek.tasks.search_diagnostic):

1. cheap, token-local verification: every attempt writes its value next to the target,
   `(3+7)*2=10*2=20, target 33: no.`;
2. attempts in a fixed order the model can learn: the operators of `(a op1 b) op2 c` enumerated as
   ++, +-, +*, -+, --, -*, *+, *-, ** (op1 outer), so attempt n+1 is a real new candidate;
3. the answer copies the accepted attempt's expression;
4. a settable give-up prior: after each `no.` the corpus trace stops with probability `give_up` and answers
   its last (wrong) attempt, so the base gives up early by habit;
5. the target is the value of one of the 9 candidates (uniformly chosen operators), so one attempt rarely
   succeeds (~1/9 plus value collisions) while the whole enumeration always does (first hit ~5 attempts).

Prompt: `Reach 33 using 3, 7, 2.` (the numbers in the order they are used). A completion:
`<think>(3+7)+2=10+2=12, target 33: no. (3+7)-2=10-2=8, target 33: no. (3+7)*2=...</think>`
`<answer>(3+7)*3</answer>`. The checker is Countdown's (nanoseek.tasks.countdown: safe_expr value equals the
target, only given numbers, each at most once), so any correct expression counts, not only the enumerated one.

Simplifications: three numbers, no division (every candidate is an integer; negatives are allowed in
intermediates and targets), the numbers' order is fixed by the prompt.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

from nanoseek.tasks.base import Problem, Task, format_completion
from nanoseek.tasks.countdown import CountdownTask

OPS = "+-*"
ORDER: tuple[tuple[str, str], ...] = tuple((o1, o2) for o1 in OPS for o2 in OPS)  # the enumeration order
MAX_NUMBER = {1: 9, 2: 15, 3: 25, 4: 50, 5: 100}  # difficulty -> largest number

# one attempt: `(a op b) op c=m op c=v, target t: yes|no.`
_NUM = r"-?\d{1,6}"
ATTEMPT = re.compile(rf"\((\d{{1,6}})([-+*])(\d{{1,6}})\)([-+*])(\d{{1,6}})=({_NUM})([-+*])(\d{{1,6}})=({_NUM}), "
                     rf"target ({_NUM}): (yes|no)\.")


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def expression(numbers: list[int], ops: tuple[str, str]) -> str:
    a, b, c = numbers
    return f"({a}{ops[0]}{b}){ops[1]}{c}"


def candidate_value(numbers: list[int], ops: tuple[str, str]) -> tuple[int, int]:
    """(intermediate, value) of `(a op1 b) op2 c`."""
    a, b, c = numbers
    m = _apply(a, ops[0], b)
    return m, _apply(m, ops[1], c)


def attempt_line(numbers: list[int], ops: tuple[str, str], target: int) -> str:
    m, v = candidate_value(numbers, ops)
    verdict = "yes" if v == target else "no"
    return f"{expression(numbers, ops)}={m}{ops[1]}{numbers[2]}={v}, target {target}: {verdict}."


def hit_position(numbers: list[int], target: int) -> int:
    """1-based position of the first candidate in ORDER whose value is the target (0: none)."""
    for i, ops in enumerate(ORDER):
        if candidate_value(numbers, ops)[1] == target:
            return i + 1
    return 0


@dataclass(frozen=True)
class Attempt:
    expr: str  # `(a op1 b) op2 c` as written
    ops: tuple[str, str]
    numbers: tuple[int, int, int]
    mid: int  # the written intermediate
    value: int  # the written value
    target: int  # the written target
    verdict: bool  # `yes` (True) or `no`

    def true_value(self) -> int:
        return candidate_value(list(self.numbers), self.ops)[1]


def parse_attempts(text: str) -> list[Attempt]:
    """Every well-formed attempt in a completion's text, in order."""
    out = []
    for m in ATTEMPT.finditer(text):
        a, o1, b, o2, c, mid, _o, _c, v, t, verdict = m.groups()
        out.append(Attempt(f"({a}{o1}{b}){o2}{c}", (o1, o2), (int(a), int(b), int(c)), int(mid), int(v), int(t),
                           verdict == "yes"))
    return out


def search_stats(texts: list[str]) -> dict:
    """Per-rollout-batch search statistics (logged every GRPO step): mean attempts per completion and the
    share of completions whose search accepted an attempt (`yes.`)."""
    n = max(len(texts), 1)
    atts = [parse_attempts(t) for t in texts]
    return {"attempts_mean": sum(len(a) for a in atts) / n,
            "accept_rate": sum(any(x.verdict for x in a) for a in atts) / n}


class SearchTask(Task):
    """Countdown over `(a op1 b) op2 c` with search traces (module docstring)."""

    name = "countdown_search"
    default_difficulty = 1
    min_difficulty = 1
    max_difficulty = max(MAX_NUMBER)
    search_corpus = True  # nanoseek.corpus passes the give-up prior to `solution`

    def sample(self, rng: random.Random, difficulty: int | None = None) -> Problem:
        d = self.check_difficulty(difficulty)
        numbers = [rng.randint(1, MAX_NUMBER[d]) for _ in range(3)]
        ops = ORDER[rng.randrange(len(ORDER))]
        target = candidate_value(numbers, ops)[1]
        prompt = f"Reach {target} using {', '.join(map(str, numbers))}."
        first = ORDER[hit_position(numbers, target) - 1]
        return Problem(prompt=prompt, answer=expression(numbers, first),
                       meta={"task": self.name, "numbers": numbers, "target": target, "difficulty": d,
                             "hit": hit_position(numbers, target)})

    def canonical(self, problem: Problem) -> str:
        return f"{problem.meta['target']}:{problem.meta['numbers']}"

    def check(self, problem: Problem, answer: str) -> bool:
        return CountdownTask.check(self, problem, answer)  # type: ignore[arg-type]

    def solution(self, problem: Problem, rng: random.Random, flawed: bool = False, give_up: float = 0.0) -> str:
        """The search trace: candidates in ORDER until the target is hit; after each `no.` the trace stops
        with probability `give_up` and answers its last attempt. `flawed` (the Task contract: a well-formed,
        wrong solution; the search corpus uses `give_up` instead) stops after a uniformly chosen `no.` before
        the hit, or, when the first candidate hits, answers the first other candidate without searching."""
        numbers, target = problem.meta["numbers"], problem.meta["target"]
        if flawed:
            hit = hit_position(numbers, target)
            if hit == 1:
                miss = next(o for o in ORDER if candidate_value(numbers, o)[1] != target)
                return format_completion("", expression(numbers, miss))
            stop = rng.randint(1, hit - 1)
            lines = [attempt_line(numbers, o, target) for o in ORDER[:stop]]
            return format_completion(" ".join(lines), expression(numbers, ORDER[stop - 1]))
        lines = []
        for ops in ORDER:
            lines.append(attempt_line(numbers, ops, target))
            if candidate_value(numbers, ops)[1] == target or rng.random() < give_up:
                return format_completion(" ".join(lines), expression(numbers, ops))
        raise RuntimeError(f"no candidate reaches {target} with {numbers}")  # impossible by construction
