"""Verifiable tasks (procedural problems + program-checked answers) and the task registry."""
from __future__ import annotations

from nanoseek.config import ConfigError
from nanoseek.tasks.arithmetic import ArithmeticTask
from nanoseek.tasks.base import Problem, RewardWeights, Score, Task, extract_answer, is_well_formed
from nanoseek.tasks.code import CodeTask
from nanoseek.tasks.countdown import CountdownTask
from nanoseek.tasks.humaneval import HumanEvalTask
from nanoseek.tasks.math_word import MathWordTask
from nanoseek.tasks.proof import ProofTask
from nanoseek.tasks.search import SearchModTask, SearchTask

# Tasks with `sandboxed = True` check answers in nanoseek.sandbox (score them with `score_batch`).
TASKS: dict[str, type[Task]] = {
    "arithmetic": ArithmeticTask,
    "countdown": CountdownTask,
    "countdown_search": SearchTask,  # search traces with a give-up prior (issue 28)
    "countdown_mod": SearchModTask,  # the same mod 10: one-digit values, one-token verdicts (issue 28)
    "math": MathWordTask,
    "code": CodeTask,
    "proof": ProofTask,
    "humaneval": HumanEvalTask,  # eval only (no train split)
}


def get_task(name: str, weights: RewardWeights | None = None) -> Task:
    """A fresh task instance by name; unknown names raise one ConfigError line listing the known ones."""
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name](weights)


__all__ = ["TASKS", "Problem", "RewardWeights", "Score", "Task", "extract_answer", "get_task", "is_well_formed"]
