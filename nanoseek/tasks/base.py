"""Verifiable tasks: the problem/score types, the completion format, the reward, the train/test split.

A task generates problems procedurally and checks answers with a program (the rule-based rewards of
DeepSeek-R1, arXiv 2501.12948 section 2.2.2; SPEC section 3.3). A completion must look like

    <think>...reasoning...</think><answer>...final answer...</answer>

Reward = `accuracy` (1.0) if the answer is right + `format` (0.1) if the completion is well formed.
Decisions, all deliberate:
- Well formed (format_ok): after stripping whitespace and any trailing `<|eos|>`/`<|pad|>`, the text is
  exactly one `<think>` block followed by exactly one `<answer>` block, with no other think/answer/chat
  tag anywhere and nothing outside the two blocks except whitespace.
- The answer is extracted iff the text holds exactly one `<answer>` and one `</answer>`, in that order;
  the think block is NOT required for accuracy (accuracy and format are separate rewards, as in R1).
  Repeated answer tags give no answer, hence 0 accuracy: a model cannot hedge with several answers.
- `truncated=True` (the generation hit its token budget) earns no accuracy reward: `correct` is False
  even if the text happens to contain a right answer. The format reward is still judged on the text.
- Train/test split: a stable SHA-256 of the task name and the problem's canonical text puts ~10% of all
  problems in "test"; generators resample until they hit the requested split, so the splits are disjoint
  by construction and independent of the seed.
"""
from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
import random
import re
from dataclasses import dataclass, field

from nanoseek.config import ConfigError

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)
CHAT_TAGS = ("<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>")
TEST_PERMILLE = 100  # ~10% of problems are test problems
SPLITS = ("train", "test")
MAX_ANSWER_CHARS = 200

_WELL_FORMED = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)
_TRAILING_SPECIALS = re.compile(r"(?:\s|<\|eos\|>|<\|pad\|>)*\Z")


@dataclass
class Problem:
    prompt: str
    answer: str
    meta: dict = field(default_factory=dict)


@dataclass
class Score:
    correct: bool
    format_ok: bool
    reward: float
    parsed: str | None  # the text inside the single <answer> block, stripped; None if there is none


@dataclass
class RewardWeights:
    """Weights of the two rule-based rewards (R1: accuracy + format)."""
    accuracy: float = 1.0
    format: float = 0.1


def extract_answer(completion: str) -> str | None:
    """The stripped contents of the one `<answer>` block, or None if there is not exactly one."""
    if not isinstance(completion, str):
        return None
    if completion.count(ANSWER_OPEN) != 1 or completion.count(ANSWER_CLOSE) != 1:
        return None
    start = completion.index(ANSWER_OPEN) + len(ANSWER_OPEN)
    end = completion.index(ANSWER_CLOSE)
    if end < start:
        return None
    return completion[start:end].strip()


def is_well_formed(completion: str) -> bool:
    """Exactly `<think>..</think><answer>..</answer>`, no other tags, only whitespace/eos outside."""
    if not isinstance(completion, str):
        return False
    if any(completion.count(tag) != 1 for tag in TAGS):
        return False
    body = completion[: _TRAILING_SPECIALS.search(completion).start()]
    if any(tag in body for tag in CHAT_TAGS):
        return False
    return _WELL_FORMED.fullmatch(body) is not None


def format_completion(think: str, answer: str) -> str:
    """The canonical completion text a model should produce."""
    return f"{THINK_OPEN}{think}{THINK_CLOSE}{ANSWER_OPEN}{answer}{ANSWER_CLOSE}"


def stable_hash(text: str) -> int:
    """Process-independent hash (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


class Task(ABC):
    """A procedurally generated, program-checked task. Subclasses implement the four hooks below."""

    name: str = "task"
    sandboxed: bool = False  # checks run untrusted output in nanoseek.sandbox (slow: score in batches)
    max_answer_chars: int = MAX_ANSWER_CHARS
    default_difficulty: int = 2
    min_difficulty: int = 1
    max_difficulty: int = 5

    def __init__(self, weights: RewardWeights | None = None):
        self.weights = weights or RewardWeights()

    # ---- hooks ---------------------------------------------------------------------------
    @abstractmethod
    def sample(self, rng: random.Random, difficulty: int | None = None) -> Problem:
        """A fresh problem of the given difficulty (None = the task's default)."""

    @abstractmethod
    def check(self, problem: Problem, answer: str) -> bool:
        """Is the extracted answer text right? Must never raise on any string."""

    @abstractmethod
    def solution(self, problem: Problem, rng: random.Random, flawed: bool = False) -> str:
        """A worked completion; with flawed=True exactly one arithmetic slip carried to the answer."""

    def canonical(self, problem: Problem) -> str:
        """Text identifying the problem up to presentation; decides the split."""
        return problem.prompt

    # ---- shared --------------------------------------------------------------------------
    def check_difficulty(self, difficulty: int | None) -> int:
        if difficulty is None:
            return self.default_difficulty
        if not isinstance(difficulty, int) or not self.min_difficulty <= difficulty <= self.max_difficulty:
            raise ConfigError(f"{self.name} difficulty must be an integer in "
                              f"[{self.min_difficulty}, {self.max_difficulty}], got {difficulty!r}")
        return difficulty

    def score(self, problem: Problem, completion: str, truncated: bool = False) -> Score:
        format_ok = is_well_formed(completion)
        parsed = extract_answer(completion)
        correct = False
        if parsed is not None and not truncated and len(parsed) <= self.max_answer_chars:
            try:
                correct = bool(self.check(problem, parsed))
            except Exception:  # noqa: BLE001 -- a checker bug must not crash an RL run; count it wrong
                correct = False
        reward = self.weights.accuracy * correct + self.weights.format * format_ok
        return Score(correct=correct, format_ok=format_ok, reward=float(reward), parsed=parsed)

    def score_batch(self, problems: list[Problem], completions: list[str],
                    truncated: list[bool] | None = None) -> list[Score]:
        """Scores of many completions at once; tasks with expensive checks override this to check in parallel
        (the default loops over `score`). Never raises: a checker crash or timeout scores wrong."""
        truncated = truncated if truncated is not None else [False] * len(completions)
        return [self.score(p, c, t) for p, c, t in zip(problems, completions, truncated)]

    def split(self, problem: Problem) -> str:
        key = f"{self.name}|{self.canonical(problem)}"
        return "test" if stable_hash(key) % 1000 < TEST_PERMILLE else "train"

    def sample_split(self, rng: random.Random, difficulty: int | None = None, split: str = "train") -> Problem:
        if split not in SPLITS:
            raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        for _ in range(100_000):
            problem = self.sample(rng, difficulty)
            if self.split(problem) == split:
                return problem
        raise RuntimeError(f"{self.name}: no {split} problem found in 100000 draws")


class BatchCheckedTask(Task):
    """A task whose checker is expensive (a sandboxed run, a proof assistant, a worker process): `check_batch`
    checks many (problem, answer) pairs at once, in parallel; `score`/`check` are batches of one."""

    @abstractmethod
    def check_batch(self, problems: list[Problem], answers: list[str]) -> list[bool]:
        """Is each extracted answer right? Must never raise; a crash or timeout is False."""

    def check(self, problem: Problem, answer: str) -> bool:
        return self.check_batch([problem], [answer])[0]

    def score(self, problem: Problem, completion: str, truncated: bool = False) -> Score:
        return self.score_batch([problem], [completion], [truncated])[0]

    def score_batch(self, problems: list[Problem], completions: list[str],
                    truncated: list[bool] | None = None) -> list[Score]:
        truncated = truncated if truncated is not None else [False] * len(completions)
        if not len(problems) == len(completions) == len(truncated):
            raise ValueError("score_batch needs as many problems, completions and truncated flags")
        fmt = [is_well_formed(c) for c in completions]
        parsed = [extract_answer(c) for c in completions]
        todo = [i for i, (a, t) in enumerate(zip(parsed, truncated))
                if a is not None and not t and len(a) <= self.max_answer_chars]
        correct = [False] * len(completions)
        if todo:
            try:
                ok = self.check_batch([problems[i] for i in todo], [parsed[i] for i in todo])
            except ConfigError:
                raise  # a missing dependency is the user's to fix, not a wrong answer
            except Exception:  # noqa: BLE001 -- a checker bug must not crash an RL run; count it wrong
                ok = [False] * len(todo)
            for i, v in zip(todo, ok):
                correct[i] = bool(v)
        w = self.weights
        return [Score(correct=c, format_ok=f, reward=float(w.accuracy * c + w.format * f), parsed=a)
                for c, f, a in zip(correct, fmt, parsed)]
