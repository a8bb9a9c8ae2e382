"""GRPO-family math against closed forms, and the RL loop end to end on a tiny model."""
import json
import math

import pytest
import torch

from nanoseek.train.rl_math import (aggregate, clipped_surrogate, group_advantages, k3_kl, length_rewards,
                                    overlong_penalty)


def test_group_advantages_normalize_within_each_group():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    adv = group_advantages(r, 4, scale=True, eps=0.0)
    std = math.sqrt(sum((x - 0.5) ** 2 for x in [1, 0, 0, 1]) / 3)
    assert adv[:4].tolist() == pytest.approx([0.5 / std, -0.5 / std, -0.5 / std, 0.5 / std])
    assert group_advantages(r, 4)[4:].abs().max() == 0  # equal rewards carry no signal (eps avoids 0/0)
    assert group_advantages(r, 4, scale=False)[:4].tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5])
    for v in (0.1, 0.6, 1.1):  # values whose float mean rounds: still exactly zero
        assert group_advantages(torch.full((8,), v), 8).abs().max() == 0


def test_clipped_surrogate_matches_ppo_cases():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1, 0.7]]))
    loss_pos, clip_pos = clipped_surrogate(logp, old, torch.tensor([1.0]), 0.2, 0.28)
    # A > 0: ratio capped at 1 + eps_high, not floored below
    assert loss_pos.tolist()[0] == pytest.approx([-1.28, -0.5, -1.1, -0.7])
    assert clip_pos.tolist()[0] == [1.0, 0.0, 0.0, 0.0]
    loss_neg, clip_neg = clipped_surrogate(logp, old, torch.tensor([-1.0]), 0.2, 0.28)
    # A < 0: ratio floored at 1 - eps_low
    assert loss_neg.tolist()[0] == pytest.approx([1.5, 0.8, 1.1, 0.8])
    assert clip_neg.tolist()[0] == [0.0, 1.0, 0.0, 1.0]


def test_ratio_one_gives_the_policy_gradient():
    logp = torch.log(torch.tensor([[0.3, 0.6]])).requires_grad_()
    loss, _ = clipped_surrogate(logp, logp.detach(), torch.tensor([2.0]), 0.2, 0.2)
    loss.sum().backward()
    assert logp.grad.tolist()[0] == pytest.approx([-2.0, -2.0])  # d(-rho A)/dlogp = -A at rho = 1


def test_k3_is_nonnegative_and_zero_at_equality():
    a = torch.randn(100)
    b = torch.randn(100)
    assert (k3_kl(a, b) >= -1e-7).all()
    assert k3_kl(a, a).abs().max() < 1e-7
    # k3 is unbiased for KL(pi||ref): E_pi[k3] = KL
    p = torch.tensor([0.7, 0.2, 0.1])
    q = torch.tensor([0.5, 0.3, 0.2])
    expect = float((p * (p / q).log()).sum())
    got = float((p * k3_kl(p.log(), q.log())).sum())
    assert got == pytest.approx(expect, abs=1e-6)


def test_aggregations():
    per_tok = torch.tensor([[1.0, 1.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    assert aggregate(per_tok, mask, "grpo", 4).item() == pytest.approx((1.0 + 2.0) / 2)
    assert aggregate(per_tok, mask, "dapo", 4).item() == pytest.approx((2 + 8) / 6)
    assert aggregate(per_tok, mask, "dr_grpo", 8).item() == pytest.approx((2 + 8) / (2 * 8))
    with pytest.raises(ValueError):
        aggregate(per_tok, mask, "nope", 4)


def test_overlong_and_length_rewards():
    assert overlong_penalty(10, 64, 16) == 0.0
    assert overlong_penalty(48, 64, 16) == 0.0
    assert overlong_penalty(56, 64, 16) == pytest.approx(-0.5)
    assert overlong_penalty(65, 64, 16) == -1.0
    lr = length_rewards([10, 20, 30], [True, True, False])
    assert lr == pytest.approx([0.5, 0.0, -0.5])
    assert length_rewards([5, 5], [True, False]) == [0.0, 0.0]
    assert length_rewards([10, 30], [False, True]) == pytest.approx([0.0, -0.5])


# ---- the loop on a tiny model ---------------------------------------------------------------------
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from nanoseek.config import ModelConfig  # noqa: E402
from nanoseek.corpus import corpus_texts  # noqa: E402
from nanoseek.model import Transformer  # noqa: E402
from nanoseek.tokenizer import Tokenizer  # noqa: E402
from nanoseek.train.checkpoint import save_checkpoint  # noqa: E402
from nanoseek.train.grpo import GRPOConfig, Rollout, policy_update, train_grpo  # noqa: E402
from nanoseek.train.common import Dist  # noqa: E402
from nanoseek.train.metrics import read_metrics  # noqa: E402


def tiny_cfg(vocab: int) -> ModelConfig:
    return ModelConfig(vocab_size=vocab, dim=32, inter_dim=64, moe_inter_dim=32, n_layers=2, n_dense_layers=1,
                       n_heads=2, n_routed_experts=4, n_activated_experts=2, kv_lora_rank=16, qk_nope_head_dim=8,
                       qk_rope_head_dim=8, v_head_dim=8, max_seq_len=128, original_seq_len=128)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("base")
    tok = Tokenizer.train(corpus_texts("arithmetic", 300, seed=0), vocab_size=300)
    tok.save(run / "tokenizer.json")
    torch.manual_seed(0)
    model = Transformer(tiny_cfg(tok.vocab_size))
    (run / "config.json").write_text(json.dumps({"model": model.cfg.to_dict()}))
    save_checkpoint(run / "checkpoints", 1, model, None, {})
    return run


def small_rl(**kw) -> GRPOConfig:
    return GRPOConfig(**{"steps": 3, "group_size": 4, "prompts_per_step": 2, "max_new_tokens": 12, "ckpt_every": 1, **kw})


def test_grpo_runs_logs_and_resumes_exactly(base_run, tmp_path):
    full = tmp_path / "full"
    train_grpo(base_run, full, small_rl(), quiet=True, device="cpu")
    rows = read_metrics(full / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("reward", "accuracy", "format_rate", "response_len_mean", "response_len_max", "clip_frac",
                "kl", "entropy", "zero_spread_groups", "tokens_per_s", "gen_s", "train_s", "logp_diff_max"):
        assert key in rows[-1], key
    assert max(r["logp_diff_max"] for r in rows) < 1e-3  # engine log-probs == trainer recompute
    part = tmp_path / "part"
    train_grpo(base_run, part, small_rl(steps=2), quiet=True, device="cpu")
    train_grpo(base_run, part, small_rl(steps=3), resume=True, quiet=True, device="cpu")
    resumed = read_metrics(part / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [1, 2, 3]
    for a, b in zip(rows, resumed):
        assert a["reward"] == b["reward"] and a["response_len_mean"] == b["response_len_mean"]
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)


def test_policy_update_raises_probability_of_advantaged_samples(base_run):
    torch.manual_seed(0)
    model = Transformer(tiny_cfg(Tokenizer.load(base_run / "tokenizer.json").vocab_size))
    prompt = [0, 4, 30, 31, 5]
    good, bad = [40, 41, 42, 1], [50, 51, 1]

    def seq_logp(tokens):
        ids = torch.tensor([prompt + tokens])
        with torch.no_grad():
            lp = model(ids)[0, :-1].log_softmax(-1)
        return float(sum(lp[len(prompt) - 1 + i, t] for i, t in enumerate(tokens)))

    def rollout(tokens, reward):
        ids = torch.tensor([prompt + tokens])
        with torch.no_grad():
            lp = model(ids)[0, :-1].log_softmax(-1)
        return Rollout(prompt, tokens, [float(lp[len(prompt) - 1 + i, t]) for i, t in enumerate(tokens)],
                       False, reward, reward > 0, True, 0)

    before = seq_logp(good) - seq_logp(bad)
    cfg = GRPOConfig(lr=3e-3, group_size=2)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    for _ in range(5):
        rs = [rollout(good, 1.0), rollout(bad, 0.0)]
        adv = torch.tensor([1.0, -1.0])
        policy_update(model, None, opt, rs, adv, cfg, Dist(), first=True)
    assert seq_logp(good) - seq_logp(bad) > before + 0.5


def test_bad_rl_configs_are_one_line_errors(base_run, tmp_path):
    cmd = [sys.executable, "-m", "nanoseek.cli", "rl", "--init", str(base_run), "--out", str(tmp_path / "x"),
           "--group-size", "1"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode != 0 and "group_size" in p.stderr and "Traceback" not in p.stderr
    cmd = [sys.executable, "-m", "nanoseek.cli", "rl", "--init", str(tmp_path / "missing"), "--out", str(tmp_path / "y")]
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode != 0 and "does not exist" in p.stderr and "Traceback" not in p.stderr


def test_grpo_under_torchrun_two_processes(base_run, tmp_path):
    """Each rank rolls out its share of the prompts; gradients and expert loads are averaged; rank 0 alone
    writes metrics and checkpoints."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29631",
           "-m", "nanoseek.cli", "rl", "--init", str(base_run), "--out", str(out), "--steps", "2",
           "--group-size", "4", "--prompts-per-step", "4", "--max-new-tokens", "8", "--device", "cpu"]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]  # one writer: no duplicated lines
    assert rows[-1]["groups_trained"] == 2  # this rank's share: 4 prompts over 2 ranks
    assert (out / "checkpoints" / "step_2" / "model.safetensors").exists()


def test_eval_cli_uses_the_difficulty_the_run_trained_on(base_run, tmp_path):
    """`nanoseek eval` scores a run on the difficulty recorded in its config (RL or pretraining section)
    unless --difficulty overrides it, and the held-out problems follow that difficulty."""
    from nanoseek.cli import main
    from nanoseek.commands.eval import trained_difficulty

    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    cfg = json.loads((run / "config.json").read_text())
    assert trained_difficulty(run, "arithmetic") is None
    (run / "config.json").write_text(json.dumps({**cfg, "rl": {"task": "arithmetic", "difficulty": 3}}))
    assert trained_difficulty(run, "arithmetic") == 3 and trained_difficulty(run, "countdown") is None
    (run / "config.json").write_text(json.dumps({**cfg, "data": {"task": "arithmetic", "difficulty": 1}}))
    assert trained_difficulty(run, "arithmetic") == 1
    out = tmp_path / "e.json"
    assert main(["eval", "--run", str(run), "--n", "3", "--samples", "1", "--max-new-tokens", "8",
                 "--out", str(out)]) == 0
    assert json.loads(out.read_text())["difficulty"] == 1
    assert main(["eval", "--run", str(run), "--n", "3", "--samples", "1", "--max-new-tokens", "8",
                 "--difficulty", "2", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["difficulty"] == 2


def test_policy_update_counts_expert_loads_over_real_tokens_only(base_run, monkeypatch):
    """The bias update during RL sees the routed (token, expert) pairs of real tokens only: right padding of
    the shorter sequences would otherwise pile onto a few experts and drag the routing bias."""
    torch.manual_seed(0)
    model = Transformer(tiny_cfg(Tokenizer.load(base_run / "tokenizer.json").vocab_size))
    seqs = [([0, 4, 30, 31, 5], [40, 41, 42, 43, 44, 45, 1]), ([0, 4, 30, 5], [50, 1])]
    rs = [Rollout(p, t, [-1.0] * len(t), False, float(i), i == 0, True, 0) for i, (p, t) in enumerate(seqs)]
    seen = []
    monkeypatch.setattr(model, "update_expert_bias", lambda gamma, loads: seen.append(loads.clone()))
    cfg = GRPOConfig(group_size=2)
    policy_update(model, None, torch.optim.AdamW(model.parameters(), lr=1e-4), rs, torch.tensor([1.0, -1.0]),
                  cfg, Dist(), first=True)
    width = max(len(p) + len(t) for p, t in seqs) - 1  # training inputs: ids[:, :-1]
    real = sum(min(len(p) + len(t), width) for p, t in seqs)
    assert real < 2 * width  # the batch really has padding
    (loads,) = seen
    k = model.cfg.n_activated_experts
    main_layers = loads[:model.cfg.n_layers - model.cfg.n_dense_layers]
    assert main_layers.sum(dim=1).tolist() == [float(k * real)] * main_layers.size(0)


def test_policy_update_skips_zero_advantage_rows_without_changing_the_gradient(base_run):
    """Rows of a zero-spread group are left out of the forward/backward (beta = 0), yet the gradient equals
    the full-batch loss over every row with the same normalizers."""
    from nanoseek.train.grpo import batch_tensors, token_logprobs
    from nanoseek.train.rl_math import aggregate, clipped_surrogate

    torch.manual_seed(0)
    model = Transformer(tiny_cfg(Tokenizer.load(base_run / "tokenizer.json").vocab_size))
    seqs = [([0, 4, 30, 31, 5], [40, 41, 42, 1]), ([0, 4, 30, 31, 5], [50, 51, 1]),
            ([0, 4, 33, 5], [60, 61, 62, 63, 1]), ([0, 4, 33, 5], [70, 1])]
    rewards = [1.0, 0.0, 0.6, 0.6]
    rs = []
    for (p, t), r in zip(seqs, rewards):
        with torch.no_grad():
            lp = model(torch.tensor([p + t]))[0, :-1].log_softmax(-1)
        rs.append(Rollout(p, t, [float(lp[len(p) - 1 + i, x]) for i, x in enumerate(t)], False, r, r == 1.0,
                          True, 0))
    adv = group_advantages(torch.tensor(rewards), 2)
    assert adv[2:].abs().max() == 0 and adv[:2].abs().min() > 0
    for agg in ("grpo", "dapo", "dr_grpo"):
        cfg = GRPOConfig(group_size=2, loss_agg=agg, grad_clip=1e9, bias_update=False)
        model.zero_grad()
        ids, mask, old, targets = batch_tensors(rs, "cpu")
        model.train()
        logp, _ = token_logprobs(model, ids, targets, cfg.temperature)
        per_tok, _ = clipped_surrogate(logp, old, adv, cfg.eps_low, cfg.eps_high)
        aggregate(per_tok, mask, agg, cfg.max_new_tokens, n_seqs=4, n_tokens=float(mask.sum())).backward()
        want = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]

        class Recorder:
            def zero_grad(self, set_to_none=True):
                model.zero_grad(set_to_none=set_to_none)

            def step(self):
                self.grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                              for p in model.parameters()]

        rec = Recorder()
        out = policy_update(model, None, rec, rs, adv, cfg, Dist(), first=True)
        assert out["rows_trained"] == 2
        for g, w in zip(rec.grads, want):
            assert torch.allclose(g, w, atol=1e-7, rtol=1e-5)
