"""Held-out evaluation of a policy on a verifiable task.

pass@1 is the mean accuracy over K samples per problem (R1's metric), at temperature 0.6 / top-p 0.95
(R1's evaluation setting) and at temperature 1.0 (the policy's own distribution, where RL's gain over
imitation shows most), plus greedy accuracy. Problems come from the task's test split, drawn with a
fixed seed, so every model is scored on the same problems.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from nanoseek.engine import Engine
from nanoseek.tasks import get_task
from nanoseek.tasks.base import Problem

SETTINGS = {"pass1": (0.6, 0.95), "pass1_t1": (1.0, None)}


def test_problems(task_name: str, n: int, seed: int = 1234, difficulty: int | None = None) -> list[Problem]:
    task = get_task(task_name)
    if hasattr(task, "test_set"):  # a fixed public set (HumanEval): its first n problems, in order
        return task.test_set()[:n]
    rng = random.Random(seed)
    return [task.sample_split(rng, difficulty, "test") for _ in range(n)]


@dataclass
class EvalResult:
    task: str
    n: int
    samples: int
    greedy: float
    pass1: float
    pass1_t1: float
    format_rate: float
    mean_len: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def score_batch(engine: Engine, task, problems: list[Problem], repeats: int, max_new_tokens: int,
                temperature: float, top_p: float | None, seed: int, chunk: int = 512):
    """(accuracies, format flags, lengths) over problems x repeats, generating in chunks."""
    tok = engine.tokenizer
    jobs = [p for p in problems for _ in range(repeats)]
    acc, fmt, lens = [], [], []
    for i in range(0, len(jobs), chunk):
        part = jobs[i:i + chunk]
        prompts = [tok.prompt_ids(p.prompt) for p in part]
        outs = engine.generate(prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                               seed=seed + i)
        scores = task.score_batch(part, [tok.completion_text(q, o.text) for q, o in zip(prompts, outs)],  # an open
                                  [o.finish_reason == "length" for o in outs])  # <think> of the prompt included
        for s, o in zip(scores, outs):
            acc.append(float(s.correct))
            fmt.append(float(s.format_ok))
            lens.append(len(o.tokens))
    return acc, fmt, lens


def evaluate(model, tokenizer, task_name: str, n: int = 200, samples: int = 4, max_new_tokens: int = 64,
             seed: int = 1234, difficulty: int | None = None) -> EvalResult:
    task = get_task(task_name)
    problems = test_problems(task_name, n, seed, difficulty)
    engine = Engine(model, tokenizer)
    torch.manual_seed(seed)
    greedy, fmt, lens = score_batch(engine, task, problems, 1, max_new_tokens, 0.0, None, seed)
    res = {}
    for key, (t, p) in SETTINGS.items():
        acc, _, _ = score_batch(engine, task, problems, samples, max_new_tokens, t, p, seed + 1)
        res[key] = sum(acc) / len(acc)
    n = len(problems)  # a fixed set may hold fewer than asked
    return EvalResult(task_name, n, samples, sum(greedy) / n, res["pass1"], res["pass1_t1"],
                      sum(fmt) / n, sum(lens) / n)
