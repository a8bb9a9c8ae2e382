"""Partial rollouts (Kimi k1.5): with a budget no response reaches, GRPO is unchanged exactly; with a small one,
carried trajectories are continued by the newer policy and every token keeps its own sampler's log-prob."""

import pytest
import torch

from nanoseek.config import ConfigError
from nanoseek.corpus import corpus_texts
from nanoseek.engine import Engine
from nanoseek.model import Transformer
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.checkpoint import load_run_model
from nanoseek.train.grpo import GRPOConfig, ProblemSampler, token_logprobs, train_grpo
from nanoseek.train.metrics import read_metrics
from nanoseek.train.partial_rollouts import PartialRollouts
from tiny_runs import write_tiny_run


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_tiny_run(tmp_path_factory.mktemp("pr_base"), corpus_texts("arithmetic", 300, seed=0))


def test_budget_above_every_response_equals_grpo(base, tmp_path):
    kw = dict(steps=3, group_size=4, prompts_per_step=2, max_new_tokens=12, ckpt_every=3, bias_update=False)
    train_grpo(base, tmp_path / "plain", GRPOConfig(**kw), device="cpu", quiet=True)
    train_grpo(base, tmp_path / "partial", GRPOConfig(**kw, partial_rollout_tokens=12), device="cpu", quiet=True)
    a, b = read_metrics(tmp_path / "plain" / "metrics.jsonl"), read_metrics(tmp_path / "partial" / "metrics.jsonl")
    for ra, rb in zip(a, b):
        for k in ("reward", "accuracy", "response_len_mean", "loss", "grad_norm", "check_rate"):
            assert ra[k] == rb[k], k
        assert rb["carried"] == 0
    ma, mb = load_run_model(tmp_path / "plain")[0], load_run_model(tmp_path / "partial")[0]
    for (k, va), vb in zip(ma.state_dict().items(), mb.state_dict().values()):
        assert torch.equal(va, vb), k


def test_carried_tokens_keep_their_own_policys_logprobs(base):
    model, _, _ = load_run_model(base)
    tok = Tokenizer.load(base / "tokenizer.json")
    cfg = GRPOConfig(group_size=2, prompts_per_step=2, max_new_tokens=8, temperature=1.0)
    engine = Engine(model, tok)
    sampler = ProblemSampler(cfg)
    pr = PartialRollouts(budget=4)
    done1, st1 = pr.step(engine, sampler, cfg, 2, 1, seed=1)
    old = {id(t): list(t.logprobs) for t in pr.carried}
    assert st1["carried"] > 0 and all(len(t.tokens) <= 4 for t in pr.carried)
    policy_1 = Transformer(model.cfg)
    policy_1.load_state_dict(model.state_dict())
    with torch.no_grad():  # a different policy for the second segment
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    done2, _ = pr.step(engine, sampler, cfg, 2, 2, seed=2)
    mixed = [r for r in done2 if len(r.tokens) > 4]
    assert mixed, "some step-1 trajectory must have been continued in step 2"
    for r in mixed:
        ids = torch.tensor([r.prompt + r.tokens])
        with torch.no_grad():
            lp1, _ = token_logprobs(policy_1.eval(), ids, ids[:, 1:], cfg.sampling())
            lp2, _ = token_logprobs(model.eval(), ids, ids[:, 1:], cfg.sampling())
        a = len(r.prompt) - 1
        got = torch.tensor(r.logprobs)
        torch.testing.assert_close(got[:4], lp1[0, a:a + 4], atol=1e-4, rtol=0)  # segment 1: the old policy
        torch.testing.assert_close(got[4:], lp2[0, a + 4:a + len(r.tokens)], atol=1e-4, rtol=0)  # segment 2: new
        assert (got[:4] - lp2[0, a:a + 4]).abs().max() > 1e-3  # the policies really differ there
    assert any(list(r.logprobs[:4]) in old.values() for r in mixed)


def test_partial_with_dynamic_sampling_is_refused():
    with pytest.raises(ConfigError):
        GRPOConfig(partial_rollout_tokens=8, dynamic_sampling=True).validate()


def test_resume_and_torchrun_are_refused_before_any_work(base, tmp_path, monkeypatch, capsys):
    """The carried trajectories are neither checkpointed nor shared between processes: resuming a run with
    partial rollouts, or starting one under torchrun, is one clear line before anything is written."""
    from nanoseek import cli
    from nanoseek.train import grpo
    from nanoseek.train.common import Dist

    kw = dict(steps=1, group_size=2, prompts_per_step=1, max_new_tokens=8, ckpt_every=1,
              partial_rollout_tokens=4)
    out = tmp_path / "partial"
    train_grpo(base, out, GRPOConfig(**kw), device="cpu", quiet=True)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match="cannot be resumed"):
        train_grpo(base, out, GRPOConfig(**{**kw, "steps": 2}), resume=True, device="cpu", quiet=True)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing written or dropped
    assert cli.main(["rl", "--init", str(base), "--out", str(out), "--resume", "--steps", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "partial-rollout-tokens" in err and len(err.splitlines()) == 1
    # two processes (torchrun): refused before the model loads or the run directory exists
    monkeypatch.setattr(grpo, "setup_distributed", lambda device: Dist(rank=0, world=2))
    with pytest.raises(ConfigError, match="one process"):
        train_grpo(base, tmp_path / "two", GRPOConfig(**kw), device="cpu", quiet=True)
    assert not (tmp_path / "two").exists()
