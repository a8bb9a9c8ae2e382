"""Reflection in worked arithmetic: check lines that re-compute a step (R1-Zero's "aha moment" in miniature).

DeepSeek-R1 (arXiv 2501.12948 sec. 2.2.4, fig. 3) reports that during RL the model starts to re-examine its
own steps. Here re-examination has one fixed, program-detectable form: right after a step `a op b = r.` the
solution writes `check: a op b = r'.` and carries on with r'. When the step was a slip (r wrong), the check
fixes it in place; when it was right, the check repeats it (it costs tokens and pays only sometimes):

    7+8=16. check: 7+8=15. 15*2=30.     (a slip fixed: the check changed the answer)
    7+8=15. check: 7+8=15. 15*2=30.     (a correct step re-checked)

Simplifications: one check per pretraining solution, and the check itself is always right in the corpus
(what the model writes after RL may of course be wrong; the detector only reads the text).
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

from nanoseek.tasks.arithmetic import Step

CHECK_MARK = "check:"
_STEP = r"(-?\d{1,12})([+\-*/])(-?\d{1,12})=(-?\d{1,12})"
# a step, then its check line (the same operands and operator are required to count as a check of that step)
_CHECK = re.compile(_STEP + r"\.\s*" + re.escape(CHECK_MARK) + r"\s*" + _STEP + r"\.?")


@dataclass(frozen=True)
class Check:
    step: str  # the checked step, e.g. "7+8=16"
    check: str  # the check line's step, e.g. "7+8=15"
    same_step: bool  # the check re-computes the same a op b (a well-formed check)
    changed: bool  # ... and gives another result than the step did


def find_checks(text: str) -> list[Check]:
    """Every `step. check: step.` pair in a completion, in order."""
    out = []
    for m in _CHECK.finditer(text):
        a, op, b, r, a2, op2, b2, r2 = m.groups()
        same = (a, op, b) == (a2, op2, b2)
        out.append(Check(f"{a}{op}{b}={r}", f"{a2}{op2}{b2}={r2}", same, same and r != r2))
    return out


def has_check(text: str) -> bool:
    """The completion re-checks something (any `check:` mark, well formed or not)."""
    return CHECK_MARK in text


def check_changed(text: str) -> bool:
    """A well-formed check of a step gave another result, so the solution continued from a changed value."""
    return any(c.changed for c in find_checks(text))


def reflection_stats(texts: list[str]) -> dict:
    """Share of completions with a check, and with a check that changed a step's result; plus the search
    statistics of nanoseek.tasks.search (attempts per completion, share that accepted an attempt), which GRPO
    logs every step next to these (0 on tasks without search traces)."""
    from nanoseek.tasks.search import search_stats

    n = max(len(texts), 1)
    return {"check_rate": sum(has_check(t) for t in texts) / n,
            "check_changed_rate": sum(check_changed(t) for t in texts) / n, **search_stats(texts)}


def reflected_think(correct: list[Step], flawed: list[Step] | None, rng: random.Random) -> str:
    """The think text of a solution with one check line. With `flawed` (one slip, carried on), the slipped
    step is written, then its check fixes it and the rest follows the correct chain (the answer is right).
    Without it, one step drawn by `rng` is re-checked."""
    if flawed is not None:
        i = next((k for k, (c, f) in enumerate(zip(correct, flawed)) if c.result != f.result), None)
        if i is not None:
            parts = [s.text() for s in correct]
            parts[i] = f"{flawed[i].text()} {CHECK_MARK} {correct[i].text()}"
            return " ".join(parts)
    j = rng.randrange(len(correct))
    parts = [s.text() for s in correct]
    parts[j] = f"{correct[j].text()} {CHECK_MARK} {correct[j].text()}"
    return " ".join(parts)


def reflection_traces(n: int, seed: int, difficulty: int | None = None, flawed_share: float = 0.6) -> list[dict]:
    """Readable, verified SFT traces with a check line (the cold start of R1 arXiv 2501.12948 sec. 2.3.1):
    up to `n` rows of distinct train-split arithmetic problems, each solved by the corpus's generator with one
    check line (a share `flawed_share` slips and fixes the slip in place, the rest re-check a correct step). A
    row is kept only if the task's checker verifies it (well formed, correct answer) and it carries a check; a
    problem drawn twice is kept once; at most 20 n draws (a level has a few thousand distinct problems). Rows have the fields `nanoseek traces` writes (prompt, completion, answer, provenance)."""
    from nanoseek.tasks import get_task

    if n < 0 or not 0 <= flawed_share <= 1:
        raise ValueError(f"need n >= 0 and flawed_share in [0, 1], got {n}, {flawed_share}")
    task = get_task("arithmetic")
    d = task.check_difficulty(difficulty)
    rng, rrng = random.Random(seed), random.Random(f"reflection-traces-{seed}")
    rows, seen = [], set()
    for i in range(20 * n):
        if len(rows) >= n:
            break
        problem = task.sample_split(rng, d, "train")
        text = task.solution(problem, rng, flawed=rng.random() < flawed_share, reflect_rng=rrng)
        score = task.score(problem, text)
        if problem.prompt in seen or not (score.correct and score.format_ok and has_check(text)):
            continue
        if task.split(problem) != "train":  # never a test-split problem in SFT data
            raise RuntimeError(f"test-split problem reached the traces: {problem.prompt!r}")
        seen.add(problem.prompt)
        rows.append({"prompt": problem.prompt, "completion": text, "answer": problem.answer, "problem_id": i,
                     "reward": score.reward, "fixed_slip": check_changed(text), "source": "reflection corpus",
                     "task": "arithmetic", "difficulty": d, "split": "train"})
    return rows
