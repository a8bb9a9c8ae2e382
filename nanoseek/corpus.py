"""Pretraining corpus: worked solutions of a task's train split, some with one deliberate slip, plus facts.

Why flawed solutions: the base model should learn the *format* and the *procedure* but stay imperfect,
so that RL with a verifiable reward has something to improve (the R1-Zero setting on a laptop budget).
A flawed solution makes exactly one arithmetic slip and carries it on to a wrong answer.

Why facts: a share (`fact_share`, default 20%) of the documents are one-operation arithmetic problems
(`Compute 3 * 7.` -> `<think>3*7=21.</think><answer>21</answer>`), always correct. They are ordinary
(prompt, completion) pairs in the same chat format as everything else, so every document teaches the
format, and the `a*b=c.` fact is written exactly as a step inside a longer think block. Facts come from the
arithmetic task's train split too, so no corpus document is ever a test problem of either task.

Why reflection (`reflect_share`, default 0, arithmetic only): that share of the worked solutions carries one
check line (nanoseek.tasks.reflection): a flawed one re-checks its slipped step and fixes it, a correct one
re-checks a correct step. The base thus knows the move but rarely makes it; RL may learn to use it (issue 14,
the R1-Zero "aha moment"). Reflection draws from its own RNG, so the problems and slips are the same as at
reflect_share 0, and at 0 the corpus is byte-identical to one built without the option.

Search traces (`countdown_search`, nanoseek.tasks.search): the task has no slips; `flawed_share` is its give-up
prior instead, the probability that a trace stops after a `no.` (issue 28). `persist_share` of them (drawn from
their own RNG, so at 0 the corpus is byte-identical to one built without the option) never give up: the base
then sees every position of a long search (a per-`no.` prior alone makes attempt 4+ rare: the late candidates'
arithmetic stayed unlearned, docs/long_reasoning.md) while its habit stays to give up early.

Everything is deterministic in `seed`. The document order is shuffled.
"""
from __future__ import annotations

import random

from nanoseek.config import ConfigError
from nanoseek.tasks import get_task
from nanoseek.tasks.arithmetic import LEVELS, ArithmeticTask
from nanoseek.tasks.base import SPLITS
from nanoseek.tokenizer import render_document


def sample_fact(rng: random.Random, difficulty: int, split: str = "train") -> tuple[str, str]:
    """One single-operation arithmetic problem with its (correct) worked solution."""
    task = ArithmeticTask()
    lv = LEVELS[difficulty]
    while True:
        a, b = rng.randint(1, lv.max_operand), rng.randint(1, lv.max_operand)
        op = rng.choice(lv.operators)
        if op == "/":
            a = a * b  # exact by construction; the dividend may exceed the operand range
        problem = task.from_tokens([a, op, b], difficulty)
        if task.split(problem) == split:
            return problem.prompt, task.solution(problem, rng)


def build_corpus(task_name: str, n_docs: int, seed: int, flawed_share: float = 0.5,
                 difficulty: int | None = None, split: str = "train",
                 fact_share: float = 0.2, reflect_share: float = 0.0,
                 persist_share: float = 0.0) -> list[tuple[str, str]]:
    """`n_docs` (prompt, completion) pairs: round(fact_share*n) facts, the rest worked solutions of
    `task_name` of which round(flawed_share*rest) carry one slip and round(reflect_share*rest) (drawn
    independently) one check line; search tasks: flawed_share is the give-up prior and round(persist_share*rest)
    traces never give up."""
    task = get_task(task_name)
    d = task.check_difficulty(difficulty)
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if n_docs < 0:
        raise ConfigError(f"n_docs must be >= 0, got {n_docs}")
    for name, share in (("flawed_share", flawed_share), ("fact_share", fact_share), ("reflect_share", reflect_share),
                        ("persist_share", persist_share)):
        if not 0.0 <= share <= 1.0:
            raise ConfigError(f"{name} must be in [0, 1], got {share}")
    if reflect_share > 0 and not isinstance(task, ArithmeticTask):
        raise ConfigError(f"reflect_share needs the arithmetic task (check lines re-compute a step), got {task_name!r}")
    if persist_share > 0 and not getattr(task, "search_corpus", False):
        raise ConfigError(f"persist_share needs a search task (countdown_mod, countdown_search), got {task_name!r}")
    rng = random.Random(seed)
    n_facts = round(fact_share * n_docs)
    n_solutions = n_docs - n_facts
    n_flawed = round(flawed_share * n_solutions)
    flawed_flags = [True] * n_flawed + [False] * (n_solutions - n_flawed)
    rng.shuffle(flawed_flags)
    fact_difficulty = min(d, max(LEVELS))
    docs: list[tuple[str, str]] = []
    reflect_flags = [False] * n_solutions
    rrng = None
    if reflect_share > 0:  # its own stream: the problems and slips stay those of reflect_share 0
        rrng = random.Random(f"reflect-{seed}")
        n_reflect = round(reflect_share * n_solutions)
        reflect_flags = [True] * n_reflect + [False] * (n_solutions - n_reflect)
        rrng.shuffle(reflect_flags)
    persist_flags = [False] * n_solutions
    if persist_share > 0:  # its own stream, like reflection
        n_persist = round(persist_share * n_solutions)
        persist_flags = [True] * n_persist + [False] * (n_solutions - n_persist)
        random.Random(f"persist-{seed}").shuffle(persist_flags)
    for flawed, reflect, persist in zip(flawed_flags, reflect_flags, persist_flags):
        problem = task.sample_split(rng, d, split)
        if getattr(task, "search_corpus", False):  # search traces: flawed_share is the give-up prior (tasks/search.py)
            docs.append((problem.prompt, task.solution(problem, rng, give_up=0.0 if persist else flawed_share)))
        elif reflect:
            docs.append((problem.prompt, task.solution(problem, rng, flawed=flawed, reflect_rng=rrng)))
        else:
            docs.append((problem.prompt, task.solution(problem, rng, flawed=flawed)))
    for _ in range(n_facts):
        docs.append(sample_fact(rng, fact_difficulty, split))
    rng.shuffle(docs)
    return docs


def corpus_texts(task_name: str, n_docs: int, seed: int, flawed_share: float = 0.5,
                 difficulty: int | None = None, split: str = "train", fact_share: float = 0.2,
                 reflect_share: float = 0.0, persist_share: float = 0.0) -> list[str]:
    """The same documents as full chat-template strings (what the tokenizer is trained on)."""
    return [render_document(p, c) for p, c in
            build_corpus(task_name, n_docs, seed, flawed_share, difficulty, split, fact_share, reflect_share,
                         persist_share)]
