"""Corpus: determinism, shares, split hygiene, and that every document is a well-formed worked solution."""
from __future__ import annotations

import random

import pytest

from nanoseek.config import ConfigError
from nanoseek.corpus import build_corpus, corpus_texts
from nanoseek.tasks import get_task
from nanoseek.tasks.arithmetic import ArithmeticTask
from nanoseek.tasks.base import Problem, is_well_formed
from nanoseek.tokenizer import render_document


def _problem_of(prompt: str) -> Problem:
    """Rebuild an arithmetic problem from its prompt `Compute <expr>.`."""
    expr = prompt.removeprefix("Compute ").removesuffix(".")
    tokens = [p if p in "+-*/" else int(p) for p in expr.split(" ")]
    return ArithmeticTask().from_tokens(tokens, 5)


def test_deterministic_under_seed():
    assert build_corpus("arithmetic", 200, seed=3) == build_corpus("arithmetic", 200, seed=3)
    assert build_corpus("arithmetic", 200, seed=3) != build_corpus("arithmetic", 200, seed=4)


def test_shares_and_correctness():
    task = get_task("arithmetic")
    docs = build_corpus("arithmetic", 500, seed=0, flawed_share=0.5, fact_share=0.2)
    assert len(docs) == 500
    facts = [d for d in docs if len(_problem_of(d[0]).meta["expr"].split(" ")) == 3]
    scores = [task.score(_problem_of(p), c) for p, c in docs]
    assert all(s.format_ok for s in scores)
    n_wrong = sum(not s.correct for s in scores)
    assert n_wrong == 200  # round(0.5 * 400) flawed solutions, and facts are never flawed
    assert len(facts) == 100  # round(0.2 * 500); default-difficulty problems have 2-3 operations
    assert all(task.score(_problem_of(p), c).correct for p, c in facts)


def test_all_correct_when_no_flaws():
    task = get_task("arithmetic")
    docs = build_corpus("arithmetic", 300, seed=1, flawed_share=0.0, difficulty=4)
    assert all(task.score(_problem_of(p), c).correct for p, c in docs)


def test_corpus_holds_no_test_problems():
    task = get_task("arithmetic")
    rng = random.Random(0)
    test_exprs = {task.sample_split(rng, 1, "test").meta["expr"] for _ in range(300)}
    docs = build_corpus("arithmetic", 3000, seed=0, difficulty=1)
    train_exprs = {_problem_of(p).meta["expr"] for p, _ in docs}
    assert test_exprs and not (train_exprs & test_exprs)
    assert all(task.split(_problem_of(p)) == "train" for p, _ in docs)


def test_texts_are_chat_documents():
    docs = build_corpus("arithmetic", 50, seed=2)
    texts = corpus_texts("arithmetic", 50, seed=2)
    assert texts == [render_document(p, c) for p, c in docs]
    assert all(is_well_formed(c) for _, c in docs)


def test_bad_arguments_raise_config_error():
    with pytest.raises(ConfigError, match="unknown task"):
        build_corpus("chess", 10, seed=0)
    with pytest.raises(ConfigError, match="flawed_share"):
        build_corpus("arithmetic", 10, seed=0, flawed_share=1.5)
    with pytest.raises(ConfigError, match="difficulty"):
        build_corpus("arithmetic", 10, seed=0, difficulty=9)
    with pytest.raises(ConfigError, match="split"):
        build_corpus("arithmetic", 10, seed=0, split="val")
