"""Training-speed paths (docs/speed.md) held to their references: the routed-experts autograd function against
the autograd loop over per-expert modules (outputs and every gradient) and against finite differences
(gradcheck, float64); model FLOPs per token against a hand count."""
from __future__ import annotations

import pytest
import torch

from nanoseek.config import ModelConfig
from nanoseek.model.experts import RoutedExperts
from nanoseek.model.moe import MoE


def moe_cfg(**kw) -> ModelConfig:
    base = {"dim": 32, "moe_inter_dim": 16, "n_routed_experts": 8, "n_activated_experts": 3, "n_expert_groups": 2,
            "n_limited_groups": 1, "n_shared_experts": 1, "route_scale": 2.5}
    base.update(kw)
    return ModelConfig(**base).validate()


def loop_reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """shared(x) + sum_k w_k expert_{i_k}(x), one token at a time through the expert modules (autograd)."""
    flat = x.reshape(-1, x.size(-1))
    w, idx, _ = moe.gate(flat)
    rows = []
    for t in range(flat.size(0)):
        out = moe.shared_experts(flat[t:t + 1])
        for k in range(idx.size(1)):
            out = out + w[t, k] * moe.experts[int(idx[t, k])](flat[t:t + 1])
        rows.append(out)
    return torch.cat(rows).view_as(x)


def grads(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, gy: torch.Tensor) -> dict:
    module.zero_grad(set_to_none=True)
    x.grad = None
    (y * gy).sum().backward()
    out = {n: p.grad.clone() if p.grad is not None else None for n, p in module.named_parameters()}
    out["x"] = x.grad.clone()
    return out


def test_routed_experts_function_matches_autograd_loop_outputs_and_gradients():
    """Forward and every gradient (x, gate weight through the routing weights, each expert's three weights)
    equal autograd through a per-token loop; an expert that gets no token keeps grad None, as in the loop."""
    moe = MoE(moe_cfg()).train()
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    moe.gate.bias[3] = -10.0  # expert 3 is never selected
    x = torch.randn(2, 12, 32, requires_grad=True)
    gy = torch.randn(2, 12, 32)
    y = moe(x)
    ours = grads(moe, x, y, gy)
    ref_y = loop_reference(moe, x)
    ref = grads(moe, x, ref_y, gy)
    assert torch.allclose(y, ref_y, rtol=1e-5, atol=1e-6)
    assert ours["experts.3.w1.weight"] is None and ref["experts.3.w1.weight"] is None
    for name, g in ref.items():
        if g is None:
            assert ours[name] is None, name
            continue
        assert ours[name] is not None, name
        assert torch.allclose(ours[name], g, rtol=1e-4, atol=1e-6), name
    assert ours["gate.weight"].abs().sum() > 0  # the routing weights' gradient reaches the gate


def graph_leaves(t: torch.Tensor) -> set[int]:
    """ids of the leaf tensors (parameters) reachable from t's autograd graph."""
    seen, stack, leaves = set(), [t.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):
            leaves.add(id(node.variable))
        stack.extend(fn for fn, _ in node.next_functions)
    return leaves


def test_idle_expert_is_not_in_the_graph():
    """An expert with no token is no input of the function: torch.distributed.pipelining's split weight
    backward (ZB-V, DualPipeV) asks for the gradient of every parameter in the graph and fails on one whose
    gradient is None (tests/test_parallel_pp.py runs that end to end)."""
    torch.manual_seed(0)  # 96 tokens: every other expert is chosen by some token (unseeded, 24 tokens left one idle by chance)
    moe = MoE(moe_cfg()).train()
    moe.gate.bias[3] = -10.0  # expert 3 is never selected
    leaves = graph_leaves(moe(torch.randn(2, 48, 32)))
    for e, expert in enumerate(moe.experts):
        assert (id(expert.w1.weight) in leaves) == (e != 3) == (id(expert.w2.weight) in leaves), e


def test_routed_experts_function_gradcheck_float64():
    """Finite differences of the hand-written backward: x, routing weights and all expert weights, with an
    unused expert."""
    N, D, H, E, K = 7, 5, 3, 4, 2
    idx = torch.tensor([[0, 1], [1, 2], [0, 2], [2, 0], [1, 0], [0, 1], [2, 1]])  # expert 3 unused
    counts = torch.bincount(idx.flatten(), minlength=E).tolist()
    x = torch.randn(N, D, dtype=torch.double, requires_grad=True)
    w = torch.rand(N, K, dtype=torch.double, requires_grad=True)
    params = [torch.randn(*s, dtype=torch.double, requires_grad=True)
              for _ in range(E) for s in ((H, D), (H, D), (D, H))]

    def f(x, w, *p):
        return RoutedExperts.apply(x, w, idx, counts, *p)

    assert torch.autograd.gradcheck(f, (x, w, *params[:9]) + tuple(p.detach() for p in params[9:]))


def test_routed_experts_function_used_only_where_exact(monkeypatch):
    """FP32 uses the function; FP8 experts (per-weight quantization) and autocast keep the autograd loop."""
    from nanoseek.model import moe as moe_mod

    calls = []
    real = moe_mod.routed_experts
    monkeypatch.setattr(moe_mod, "routed_experts", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(1, 6, 32)
    MoE(moe_cfg()).train()(x)
    assert len(calls) == 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        MoE(moe_cfg()).train()(x)
    MoE(moe_cfg(fp8=True)).train()(x)
    assert len(calls) == 1


@pytest.mark.parametrize("q_lora_rank", [0, 24])
@pytest.mark.parametrize("mtp", [False, True])
def test_model_flops_per_token_hand_count(q_lora_rank, mtp):
    """6 x (matmul weights a token passes through, counted on the instantiated modules: routed experts weighted
    K / E) + attention's 6 L H (d_qk + d_v) (T + 1) / 2, written out by hand for this config."""
    from nanoseek.model import Transformer
    from nanoseek.model.moe import Gate
    from nanoseek.train.metrics import model_flops_per_token

    cfg = ModelConfig(vocab_size=50, dim=32, inter_dim=40, moe_inter_dim=8, n_layers=3, n_dense_layers=1,
                      n_heads=2, n_routed_experts=8, n_shared_experts=1, n_activated_experts=3,
                      q_lora_rank=q_lora_rank, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                      v_head_dim=6, n_mtp=1)
    model = Transformer(cfg)
    K_over_E = 3 / 8
    weights = 0.0
    for name, m in model.named_modules():
        if name.startswith("mtp.") and not mtp:
            continue
        if isinstance(m, torch.nn.Linear) and name != "head":
            weights += m.weight.numel() * (K_over_E if ".experts." in name else 1)
        elif isinstance(m, Gate):
            weights += m.weight.numel()
    weights += cfg.vocab_size * cfg.dim * (2 if mtp else 1)  # the shared head, once per depth
    T = 16
    layers = 4 if mtp else 3
    attn = 6 * layers * 2 * (12 + 6) * (T + 1) / 2
    assert model_flops_per_token(cfg, T, mtp=mtp) == pytest.approx(6 * weights + attn, rel=1e-12)


def test_peak_matmul_is_measured_once_and_mfu_divides_by_it(monkeypatch):
    from nanoseek.train import metrics

    peak = metrics.peak_matmul_flops(n=128, reps=2)
    assert 1e6 < peak < 1e14 and metrics.peak_matmul_flops(n=128, reps=2) == peak  # cached
    monkeypatch.setattr(metrics, "peak_matmul_flops", lambda: 2e9)
    assert metrics.mfu(1000.0, 1e6) == pytest.approx(0.5)
