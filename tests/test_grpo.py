"""GRPO-family math against closed forms, and the RL loop's pieces on a tiny model: the policy update (skipped
rows, expert loads, beta > 0 against a hand-computed k3 KL), the trainer's log-probs under the rollout support,
the problem sampler (prioritized, curriculum, both), DAPO dynamic sampling on scripted rollouts. Whole runs
from a warm base (resume, torchrun, mu > 1) are in test_grpo_runs.py."""
import dataclasses
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


def test_policy_loss_by_hand_two_groups_of_two():
    """GRPO / DAPO / Dr. GRPO losses of 2 groups x 2 completions, worked out by hand: rewards -> group advantages
    -> the PPO clip cases per token (eps_low 0.2, eps_high 0.28) -> the three aggregations (+ beta * k3)."""
    from nanoseek.train.rl_math import policy_loss

    ratios = [[1.0, 1.5, 1.0], [0.5, 1.0, 1.2], [2.0, 1.0, 1.0], [0.9, 1.1, 0.7]]  # new / old probability
    mask = torch.tensor([[1.0, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]])  # completions of 2, 3, 1, 3 tokens
    logp, old = torch.tensor(ratios).log(), torch.zeros(4, 3)
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.5])  # groups (rows 0, 1) and (rows 2, 3)
    dr_adv = group_advantages(rewards, 2, scale=False)
    assert dr_adv.tolist() == pytest.approx([0.5, -0.5, -0.25, 0.25])
    # per token: A > 0 -> -A min(rho, 1.28); A < 0 -> -A max(rho, 0.8)
    # row 0: -0.5 * 1 - 0.5 * 1.28 = -1.14; row 1: 0.5 * (0.8 + 1 + 1.2) = 1.5; row 2: 0.25 * 2 = 0.5 (A < 0 is
    # not clipped above); row 3: -0.25 * (0.9 + 1.1 + 0.7) = -0.675 (A > 0 is not clipped below).
    # Sum over the 9 completion tokens: 0.185.
    def loss(adv, how, beta=0.0, ref=None):
        return policy_loss(logp, old, adv, mask, how, 4, 0.2, 0.28, beta, ref)

    out, clipped, kl = loss(dr_adv, "dr_grpo")
    assert out.item() == pytest.approx(0.185 / (4 * 4)) and kl is None  # token sum / (sequences * max_new_tokens)
    assert loss(dr_adv, "dapo")[0].item() == pytest.approx(0.185 / 9)  # token mean over the batch
    assert loss(dr_adv, "grpo")[0].item() == pytest.approx((-1.14 / 2 + 1.5 / 3 + 0.5 / 1 - 0.675 / 3) / 4)
    assert clipped.nonzero().tolist() == [[0, 1], [1, 0]]  # 1.5 capped for A > 0, 0.5 floored for A < 0
    # GRPO advantages: (r - mean) / (unbiased std + 1e-4); both groups' std is |r1 - r2| / sqrt(2)
    s1, s2 = 0.5 / (1 / math.sqrt(2) + 1e-4), 0.25 / (0.5 / math.sqrt(2) + 1e-4)
    adv = group_advantages(rewards, 2)
    assert adv.tolist() == pytest.approx([s1, -s1, -s2, s2])
    rows = [-s1 * (1 + 1.28) / 2, s1 * (0.8 + 1 + 1.2) / 3, s2 * 2.0 / 1, -s2 * (0.9 + 1.1 + 0.7) / 3]
    assert loss(adv, "grpo")[0].item() == pytest.approx(sum(rows) / 4)
    # beta > 0: k3 = ref/pi - log(ref/pi) - 1 per token, here ref = 1 (log 0): 1/rho + log(rho) - 1
    k3 = [[1 / r + math.log(r) - 1 for r in row] for row in ratios]
    masked_k3 = sum(k * m for krow, mrow in zip(k3, mask.tolist()) for k, m in zip(krow, mrow))
    out, _, kl = loss(dr_adv, "dapo", beta=0.1, ref=torch.zeros(4, 3))
    assert out.item() == pytest.approx((0.185 + 0.1 * masked_k3) / 9)
    assert kl.flatten().tolist() == pytest.approx([k for row in k3 for k in row], abs=1e-6)  # float32
    with pytest.raises(ValueError):
        loss(dr_adv, "dapo", beta=0.1)


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

from nanoseek.config import ModelConfig  # noqa: E402
from nanoseek.corpus import corpus_texts  # noqa: E402
from nanoseek.model import Transformer  # noqa: E402
from nanoseek.tokenizer import Tokenizer  # noqa: E402
from nanoseek.train.checkpoint import save_checkpoint  # noqa: E402
from nanoseek.train.grpo import GRPOConfig, Rollout, policy_update  # noqa: E402
from nanoseek.train.common import Dist  # noqa: E402


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


@pytest.mark.parametrize("extra,msg", [(["--group-size", "1"], "group_size"), (["--top-p", "0"], "top_p"),
                                       (["--top-k", "0"], "top_k"), (["--pool-size", "0", "--prioritized"], "pool_size"),
                                       (["--curriculum", "--difficulty", "2"], None)])
def test_bad_rl_configs_are_one_line_errors(base_run, tmp_path, capsys, extra, msg):
    """In-process (tests/test_train.py checks a real process prints no traceback). --curriculum with the
    default curriculum_start is valid (it composes with --prioritized too): only the config check runs."""
    from nanoseek.commands import rl
    from nanoseek.cli import main

    if msg is None:
        import argparse

        parser = argparse.ArgumentParser()
        rl.add_arguments(parser)
        cfg = rl.config_from_args(parser.parse_args(["--init", "x", "--out", "y", *extra, "--prioritized"]))
        assert cfg.curriculum and cfg.prioritized
        return
    assert main(["rl", "--init", str(base_run), "--out", str(tmp_path / "x"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and msg in err


def test_rl_from_a_missing_init_is_a_one_line_error(tmp_path, capsys):
    from nanoseek.cli import main

    assert main(["rl", "--init", str(tmp_path / "missing"), "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not exist" in err


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
    """The bias update during RL sees the routed (token, expert) pairs of every row's own input tokens (its
    prompt and its completion but the last token), per expert exactly what unpadded one-row forwards route:
    no padding (it would pile onto a few experts and drag the routing bias), and a prompt packed once for the
    rows that share it still counts once per row."""
    torch.manual_seed(0)
    model = Transformer(tiny_cfg(Tokenizer.load(base_run / "tokenizer.json").vocab_size))
    seqs = [([0, 4, 30, 31, 5], [40, 41, 42, 43, 44, 45, 1]), ([0, 4, 30, 5], [50, 1]),
            ([0, 4, 30, 31, 5], [60, 61, 1]), ([0, 4, 30, 31, 5], [62, 1])]
    rs = [Rollout(p, t, [-1.0] * len(t), False, float(i), i == 0, True, 0) for i, (p, t) in enumerate(seqs)]
    with torch.no_grad():  # the reference: each row alone, no padding, no packing
        model.train()
        want = 0
        for p, t in seqs:
            model.hidden(torch.tensor([(p + t)[:-1]]))
            want = want + model.expert_loads()
        for m in model.moe_layers():
            m.load_accum.zero_()
    seen = []
    monkeypatch.setattr(model, "update_expert_bias", lambda gamma, loads: seen.append(loads.clone()))
    cfg = GRPOConfig(group_size=2, micro_batch=2)  # the 3-row prompt is split over two micro-batches
    policy_update(model, None, torch.optim.AdamW(model.parameters(), lr=1e-4), rs, torch.tensor([1.0, -1.0, 1.0, -1.0]),
                  cfg, Dist(), first=True)
    (loads,) = seen
    k = model.cfg.n_activated_experts
    assert float(loads[0].sum()) == k * sum(len(p) + len(t) - 1 for p, t in seqs)
    assert torch.equal(loads, want)


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
        logp, _ = token_logprobs(model, ids, targets, cfg.sampling())
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


# ---- the model piece RL relies on ---------------------------------------------------------------------
def test_eval_mode_forward_returns_no_stale_balance_loss(base_run):
    """The balance loss of a forward is that forward's: zero in eval mode (MoE computes none there), not the
    value left over from the last training forward."""
    torch.manual_seed(0)
    model = Transformer(tiny_cfg(Tokenizer.load(base_run / "tokenizer.json").vocab_size))
    ids = torch.randint(3, 200, (2, 12))
    targets = torch.cat([ids[:, 1:], torch.full((2, 1), -1)], dim=1)
    _, train_parts = model.train()(ids, targets)
    assert float(train_parts.balance.detach()) > 0
    _, eval_parts = model.eval()(torch.randint(3, 200, (3, 9)), torch.randint(3, 200, (3, 9)))
    assert float(eval_parts.balance) == 0.0
    _, again = model.train()(ids, targets)  # and training mode computes a fresh one
    assert float(again.balance.detach()) == pytest.approx(float(train_parts.balance.detach()))


# ---- the trainer's log-probs ------------------------------------------------------------------------------
def test_trainer_logprobs_use_the_rollout_support(base_run):
    """token_logprobs under top-k / top-p: log of the temperature-scaled softmax renormalized over the support
    (top-k, then the nucleus of what is left; the target always kept), checked against plain Python on the
    full forward's logits; unfiltered when neither is set."""
    from nanoseek.engine.sampling import SamplingParams
    from nanoseek.train.grpo import token_logprobs

    torch.manual_seed(1)
    model = Transformer(tiny_cfg(Tokenizer.load(base_run / "tokenizer.json").vocab_size)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)  # peaked enough that the filters cut real mass
        ids = torch.randint(3, 200, (2, 10))
        targets = ids[:, 1:]
        logits = model(ids)[:, :-1].double()
    for t, k, top_p in [(1.0, None, None), (0.7, 20, None), (1.0, None, 0.5), (1.2, 30, 0.8)]:
        params = SamplingParams(t, k, top_p)
        with torch.no_grad():
            got, _ = token_logprobs(model, ids, targets, params)
        for b in range(2):
            for i in range(9):
                z = [x / t for x in logits[b, i].tolist()]
                order = sorted(range(len(z)), key=lambda j: -z[j])
                keep = order[:k] if k else order
                m = max(z[j] for j in keep)
                e = {j: math.exp(z[j] - m) for j in keep}
                if top_p is not None:
                    total, cum, nucleus = sum(e.values()), 0.0, []
                    for j in keep:
                        nucleus.append(j)
                        cum += e[j] / total
                        if cum >= top_p:
                            break
                    e = {j: e[j] for j in nucleus}
                tgt = int(targets[b, i])
                e.setdefault(tgt, math.exp(z[tgt] - m))  # the target stays in the support
                assert float(got[b, i]) == pytest.approx(math.log(e[tgt] / sum(e.values())), abs=1e-4)
    params = SamplingParams(1.0, None, 0.5)
    with torch.no_grad():
        full = (model(ids)[:, :-1]).log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        filt, _ = token_logprobs(model, ids, targets, params)
    assert (filt - full).min() > 1e-3  # renormalizing over a smaller support raises every log-prob


# ---- the policy update ------------------------------------------------------------------------------------
def make_rollouts(model, seqs, rewards):
    """Rollouts whose old log-probs are the model's own (eval-mode forwards: no expert-load bookkeeping)."""
    out = []
    for (p, t), r in zip(seqs, rewards):
        with torch.no_grad():
            lp = model.eval()(torch.tensor([p + t]))[0, :-1].log_softmax(-1)
        out.append(Rollout(p, t, [float(lp[len(p) - 1 + i, x]) for i, x in enumerate(t)], False, r, r == 1.0, True, 0))
    return out


SEQS = [([0, 4, 30, 31, 5], [40, 41, 42, 1]), ([0, 4, 30, 31, 5], [50, 51, 1]),
        ([0, 4, 33, 5], [60, 61, 62, 63, 1]), ([0, 4, 33, 5], [70, 1])]


def test_skipping_zero_advantage_rows_keeps_the_expert_loads_of_the_bias_update(base_run, monkeypatch):
    """The update skips the backward of zero-advantage rows but their real tokens still count in the expert
    loads: the bias update (loads and resulting gate biases) equals the one of the update without skipping."""
    vocab = Tokenizer.load(base_run / "tokenizer.json").vocab_size
    rewards = [1.0, 0.0, 0.6, 0.6]  # the second group has zero spread
    adv = group_advantages(torch.tensor(rewards), 2)
    results = []
    for skip in (True, False):
        torch.manual_seed(0)
        model = Transformer(tiny_cfg(vocab))
        seen = []
        real_update = model.update_expert_bias
        monkeypatch.setattr(model, "update_expert_bias", lambda g, loads: seen.append(loads.clone()) or real_update(g, loads))
        cfg = GRPOConfig(group_size=2, bias_gamma=1e-2)
        out = policy_update(model, None, torch.optim.AdamW(model.parameters(), lr=1e-3),
                            make_rollouts(model, SEQS, rewards), adv, cfg, Dist(), first=True,
                            skip_zero_advantage=skip)
        assert out["rows_trained"] == (2 if skip else 4)
        results.append((seen[0], [m.gate.bias.clone() for m in model.moe_layers()]))
    (loads_skip, bias_skip), (loads_full, bias_full) = results
    real_tokens = sum(len(p) + len(t) - 1 for p, t in SEQS)  # each row's inputs: all but its last token
    assert float(loads_full[0].sum()) == 2 * real_tokens  # top-2 routing over every real token
    assert torch.equal(loads_skip, loads_full)
    assert all(torch.equal(a, b) for a, b in zip(bias_skip, bias_full))


def test_beta_adds_the_k3_kl_to_a_frozen_reference(base_run):
    """beta > 0: the loss is the surrogate plus beta * k3(pi, pi_ref) per token, with the value and the KL metric
    equal to a hand computation from two full forwards; with all advantages zero the update is the KL's gradient
    alone and moves the policy toward the reference."""
    import copy

    vocab = Tokenizer.load(base_run / "tokenizer.json").vocab_size
    torch.manual_seed(0)
    model = Transformer(tiny_cfg(vocab))
    ref = copy.deepcopy(model).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # the policy has drifted from the reference
    rewards = [1.0, 0.0, 0.6, 0.2]
    rs = make_rollouts(model, SEQS, rewards)
    adv = group_advantages(torch.tensor(rewards), 2)
    beta = 0.5

    def hand(adv_list):
        per_seq, kls = [], []
        for (p, t), a, r in zip(SEQS, adv_list, rs):
            with torch.no_grad():
                lp = model(torch.tensor([p + t]))[0, :-1].log_softmax(-1)
                lr = ref(torch.tensor([p + t]))[0, :-1].log_softmax(-1)
            tok_losses = []
            for i, x in enumerate(t):
                logp, ref_logp, old = float(lp[len(p) - 1 + i, x]), float(lr[len(p) - 1 + i, x]), r.logprobs[i]
                ratio = math.exp(logp - old)  # == 1: the rollouts come from this policy
                k3 = math.exp(ref_logp - logp) - (ref_logp - logp) - 1
                kls.append(k3)
                tok_losses.append(-min(ratio * a, max(min(ratio, 1.2), 0.8) * a) + beta * k3)
            per_seq.append(sum(tok_losses) / len(tok_losses))
        return sum(per_seq) / len(per_seq), sum(kls) / len(kls)

    want_loss, want_kl = hand(adv.tolist())
    assert want_kl > 1e-4
    cfg = GRPOConfig(group_size=2, beta=beta, lr=1e-3, bias_update=False)
    out = policy_update(model, ref, torch.optim.SGD(model.parameters(), lr=0.0), rs, adv, cfg, Dist(), first=True)
    assert out["loss"] == pytest.approx(want_loss, abs=1e-5)
    assert out["kl"] == pytest.approx(want_kl, rel=1e-4)
    assert out["rows_trained"] == 4  # beta > 0: no row is skipped (the KL has a gradient everywhere)
    zero = torch.zeros(4)
    opt = torch.optim.SGD(model.parameters(), lr=0.02)
    kls = [want_kl]
    for _ in range(4):
        policy_update(model, ref, opt, rs, zero, cfg, Dist(), first=False)
        kls.append(hand([0.0] * 4)[1])
    assert all(b < a for a, b in zip(kls, kls[1:])), kls  # pure KL steps pull the policy back toward the reference


# ---- the problem sampler ----------------------------------------------------------------------------------
def test_prioritized_sampler_prefers_unsolved_problems_and_snapshots_its_state():
    from nanoseek.train.grpo import ProblemSampler

    cfg = GRPOConfig(prioritized=True, pool_size=200, seed=3)
    s = ProblemSampler(cfg)
    for i in range(100):
        s.success[i] = 1.0  # solved: weight 1e-3 against ~0.5 for the rest
    idx = [i for i, _ in s.draw(2000, step=1)]
    assert sum(i < 100 for i in idx) < 25  # expected ~4 (uniform draws would give ~1000)
    assert len(set(idx)) > 80  # and spread over the unsolved ones
    snap = s.state()
    s.record(150, 1.0)
    assert s.success[150] == pytest.approx(0.7 * 0.5 + 0.3 * 1.0)  # moving average toward the accuracy
    assert snap["success"][150] == 0.5  # a snapshot is a copy: later records do not reach into it
    s.draw(5, step=1)
    s.load(snap)
    again = ProblemSampler(cfg)
    again.load(snap)
    assert [i for i, _ in s.draw(50, 2)] == [i for i, _ in again.draw(50, 2)]


def test_curriculum_raises_difficulty_from_start_to_target():
    from nanoseek.train.grpo import ProblemSampler

    cfg = GRPOConfig(curriculum=True, curriculum_start=1, difficulty=4, steps=7)
    s = ProblemSampler(cfg)
    levels = [s.difficulty(step) for step in range(1, 8)]
    assert levels == [round(1 + 3 * (step - 1) / 6) for step in range(1, 8)] and levels[0] == 1 and levels[-1] == 4
    for step in (1, 4, 7):
        assert {p.meta["difficulty"] for _, p in s.draw(5, step)} == {s.difficulty(step)}
    assert ProblemSampler(GRPOConfig(difficulty=4)).difficulty(1) == 4  # off: always the target


def test_curriculum_composes_with_prioritized_sampling():
    """--curriculum with --prioritized: the pool holds each level's problems; a step draws by priority among
    the current level's ones (both settings take effect, neither is silently ignored)."""
    from nanoseek.train.grpo import ProblemSampler

    cfg = GRPOConfig(curriculum=True, curriculum_start=1, difficulty=3, steps=5, prioritized=True, pool_size=40)
    s = ProblemSampler(cfg)
    assert len(s.pool) == 3 * 40
    for step in (1, 3, 5):
        drawn = s.draw(30, step)
        assert {p.meta["difficulty"] for _, p in drawn} == {s.difficulty(step)}
        assert all(s.pool[i] is p for i, p in drawn)
    assert [s.difficulty(t) for t in (1, 3, 5)] == [1, 2, 3]
    level3 = s.level_slice[3]
    for i in level3[:20]:
        s.success[i] = 1.0
    assert sum(i in level3[:20] for i, _ in s.draw(500, 5)) < 15  # priority still applies within the level


# ---- DAPO dynamic sampling on scripted rollouts -----------------------------------------------------------
class ScriptedTask:
    """Right iff the completion text is 'right'; format always ok; reward = accuracy."""

    def score(self, problem, text, truncated=False):
        from nanoseek.tasks.base import Score

        ok = text == "right" and not truncated
        return Score(correct=ok, format_ok=True, reward=float(ok), parsed=text)

    def score_batch(self, problems, texts, truncated):
        return [self.score(p, x, t) for p, x, t in zip(problems, texts, truncated)]


class ScriptedEngine:
    """Returns, per call, the next groups of (text, length) completions from a script."""

    def __init__(self, tokenizer, script, G):
        self.tokenizer, self.script, self.G, self.calls = tokenizer, list(script), G, []

    def generate(self, prompts, max_new_tokens, temperature, top_k, top_p, seed):
        from nanoseek.engine.engine import Generation

        self.calls.append(len(prompts))
        outs = []
        for _ in range(len(prompts) // self.G):
            for text, n in self.script.pop(0):
                outs.append(Generation([7] * n, [-1.0] * n, "length" if n >= max_new_tokens else "stop", text))
        return outs


@pytest.mark.parametrize("shaping", [dict(length_weight=1.0), dict(overlong_cache=8)])
def test_dynamic_sampling_keeps_groups_of_mixed_accuracy_not_of_mixed_shaped_reward(base_run, shaping):
    """DAPO drops groups whose accuracy is all 0 or all 1 and draws again. Length shaping (Kimi) or overlong
    shaping (DAPO) makes the rewards of such groups differ, yet they must still be dropped; kept groups come in
    draw order, the batch stops at prompts_per_step and the sampler records every drawn group."""
    from nanoseek.train.grpo import ProblemSampler, rollout_groups

    tok = Tokenizer.load(base_run / "tokenizer.json")
    wrong_varied = [("wrong", 3), ("wrong", 11), ("wrong", 15), ("wrong", 6)]  # accuracy 0, rewards differ
    right_varied = [("right", 2), ("right", 9), ("right", 14), ("right", 5)]  # accuracy 1, rewards differ
    mixed_a = [("right", 4), ("wrong", 4), ("wrong", 4), ("wrong", 4)]
    mixed_b = [("wrong", 5), ("right", 5), ("right", 5), ("right", 5)]
    script = [wrong_varied, mixed_a, right_varied, mixed_b, mixed_a]
    cfg = GRPOConfig(group_size=4, prompts_per_step=2, max_new_tokens=16, dynamic_sampling=True,
                     max_sampling_rounds=3, prioritized=True, pool_size=20, **shaping)
    sampler = ProblemSampler(cfg)
    sampler.task = ScriptedTask()
    engine = ScriptedEngine(tok, script, 4)
    kept, st = rollout_groups(engine, sampler, cfg, 2, step=1, seed=0)
    assert engine.calls == [8, 4, 4]  # round 1: 2 groups (1 kept); then 1 missing group per round
    assert st["rounds"] == 3 and st["groups_kept"] == 2 and len(kept) == 8
    assert [r.correct for r in kept] == [True, False, False, False, False, True, True, True]  # mixed_a, mixed_b
    assert [r.group for r in kept] == [0] * 4 + [1] * 4
    assert st["uniform_accuracy"] == [1.0, 0.0, 1.0, 0.0] and st["zero_spread"] == [0.0, 0.0, 0.0, 0.0]
    assert sum(x != 0.5 for x in sampler.success) >= 3  # every drawn group recorded, kept or not
    no_filter = dataclasses.replace(cfg, dynamic_sampling=False)
    s2 = ProblemSampler(no_filter)
    s2.task = ScriptedTask()
    kept2, st2 = rollout_groups(ScriptedEngine(tok, script, 4), s2, no_filter, 2, step=1, seed=0)
    assert st2["rounds"] == 1 and [r.correct for r in kept2][:4] == [False] * 4  # without it: kept as drawn


@pytest.mark.parametrize("agg,top_k,mask_truncated", [("grpo", None, False), ("dapo", 20, True), ("dr_grpo", None, True)])
def test_shared_prompt_update_equals_the_per_row_forward(base_run, agg, top_k, mask_truncated):
    """The update runs each prompt once for the rows that share it (shared_prefix.py). Its per-token log-probs
    equal one-row forwards of prompt + completion, and its gradient equals the padded per-row batch loss,
    with shared and unshared prompts, completions of 1 to 7 tokens, a prompt split over micro-batches,
    top-k support and truncated rows masked out."""
    from nanoseek.train.grpo import batch_tensors, packed_logprobs, token_logprobs
    from nanoseek.train.rl_math import aggregate, clipped_surrogate
    from nanoseek.train.shared_prefix import pack, plan_micro_batches

    torch.manual_seed(0)
    model = Transformer(tiny_cfg(Tokenizer.load(base_run / "tokenizer.json").vocab_size))
    seqs = [([0, 4, 30, 31, 5], [40, 41, 42, 1]), ([0, 4, 33, 5], [50, 51, 52, 1]),
            ([0, 4, 30, 31, 5], [60, 61, 62, 63, 64, 65, 1]), ([0, 4, 33, 5], [70]),
            ([0, 4, 30, 31, 5], [80, 1]), ([0, 9, 5], [90, 91, 1])]
    rewards = [1.0, 0.0, 0.6, 0.1, 0.3, 0.5]
    rs = make_rollouts(model, seqs, rewards)
    rs[2] = dataclasses.replace(rs[2], truncated=True)
    adv = torch.tensor([1.0, -0.5, 0.7, -1.2, 0.4, 0.9])
    cfg = GRPOConfig(group_size=2, grad_clip=1e9, bias_update=False, micro_batch=2, loss_agg=agg, top_k=top_k,
                     mask_truncated=mask_truncated)
    model.train()
    prompts, comps = [r.prompt for r in rs], [r.tokens for r in rs]
    plan = plan_micro_batches(list(range(6)), prompts, comps, cfg.micro_batch)
    assert sorted(i for mb in plan for pk in mb for i in pk) == list(range(6)) and max(map(len, plan)) <= 2
    with torch.no_grad():
        for mb in plan:
            p = pack(mb, prompts, comps, "cpu")
            got, _ = packed_logprobs(model, p, cfg.sampling())
            for r, i in enumerate(p.rows):
                ids = torch.tensor([prompts[i] + comps[i]])
                ref, _ = token_logprobs(model, ids, ids[:, 1:], cfg.sampling())
                n = len(comps[i])
                assert torch.allclose(got[r, :n], ref[0, len(prompts[i]) - 1:], atol=1e-6, rtol=0)
                assert float(got[r, n:].abs().sum()) == 0.0
    model.zero_grad()
    ids, mask, old, targets = batch_tensors(rs, "cpu")
    if mask_truncated:
        mask = mask * torch.tensor([0.0 if r.truncated else 1.0 for r in rs])[:, None]
    logp, _ = token_logprobs(model, ids, targets, cfg.sampling())
    per_tok, _ = clipped_surrogate(logp, old, adv, cfg.eps_low, cfg.eps_high)
    want_loss = aggregate(per_tok, mask, agg, cfg.max_new_tokens, n_seqs=6, n_tokens=float(mask.sum()))
    want_loss.backward()
    want = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]

    class Recorder:
        def zero_grad(self, set_to_none=True):
            model.zero_grad(set_to_none=set_to_none)

        def step(self):
            self.grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]

    rec = Recorder()
    out = policy_update(model, None, rec, rs, adv, cfg, Dist(), first=True)
    assert out["rows_trained"] == 6 and out["loss"] == pytest.approx(float(want_loss.detach()), abs=1e-6)
    for g, w in zip(rec.grads, want):
        assert torch.allclose(g, w, atol=1e-6, rtol=1e-5)


def test_fused_optimizer_steps_refresh_the_engines_fused_weights(base_run):
    """make_optimizer's fused AdamW writes weights without bumping their version counters; its post-step hook
    must, or prepare_inference would reuse the previous step's fused decode weights for the next rollout."""
    from nanoseek.train.grpo import make_optimizer

    model = Transformer(tiny_cfg(Tokenizer.load(base_run / "tokenizer.json").vocab_size))
    opt = make_optimizer(model, GRPOConfig(lr=1e-2))
    assert opt.defaults.get("fused")
    attn = model.layers[0].attn
    model.prepare_inference(True)
    before = attn.fused[0].clone()
    model.prepare_inference(False)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    model.prepare_inference(True)
    reused = attn.fused[0].clone()
    attn.fuse_absorbed(True)  # rebuilt from the current weights
    assert not torch.equal(before, attn.fused[0])
    assert torch.equal(reused, attn.fused[0])
