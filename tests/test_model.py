"""Model core (SPEC 1.1-1.5): every test compares the model against an independent reference written
here from the formulas (explicit loops, float64 einsums, closed forms, hand-computed numbers)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nanoseek.config import ConfigError, ModelConfig
from nanoseek.model import IGNORE, Transformer
from nanoseek.model.fp8 import fp8_linear
from nanoseek.model.moe import sequence_balance_loss
from nanoseek.model.rope import rope_frequencies


def tiny(**kw) -> ModelConfig:
    """A model small enough for a unit test; init_std large enough that attention is far from uniform."""
    base = {"vocab_size": 64, "dim": 48, "inter_dim": 96, "moe_inter_dim": 24, "n_layers": 2,
            "n_dense_layers": 1, "n_heads": 3, "n_routed_experts": 8, "n_shared_experts": 1,
            "n_activated_experts": 2, "n_expert_groups": 1, "n_limited_groups": 1, "kv_lora_rank": 16,
            "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 12, "max_seq_len": 64,
            "original_seq_len": 64, "n_mtp": 0, "init_std": 0.1}
    base.update(kw)
    return ModelConfig(**base).validate()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ---- independent references ------------------------------------------------------------------------
def yarn_freqs_closed_form(dim: int, base: float, factor: float, orig_len: int, beta_fast: float,
                           beta_slow: float) -> list[float]:
    """YaRN (Peng et al. 2023, as in its released code and DeepSeek-V3's): pair i has theta_i =
    base^(-2i/dim); the correction dim for r full rotations over orig_len is
    d(r) = dim * ln(orig_len / (2 pi r)) / (2 ln(base)). Below floor(d(beta_fast)) keep theta_i, above
    ceil(d(beta_slow)) use theta_i / factor, and ramp linearly in the pair index between."""
    def d(r):
        return dim * math.log(orig_len / (2 * math.pi * r)) / (2 * math.log(base))

    lo, hi = max(math.floor(d(beta_fast)), 0), min(math.ceil(d(beta_slow)), dim - 1)
    if lo == hi:
        hi += 0.001
    out = []
    for i in range(dim // 2):
        theta = base ** (-2 * i / dim)
        gamma = min(max((i - lo) / (hi - lo), 0.0), 1.0)  # 0 = extrapolate (keep), 1 = interpolate (/factor)
        out.append(theta * (1 - gamma) + theta / factor * gamma if factor > 1 else theta)
    return out


def ref_freqs(cfg: ModelConfig) -> torch.Tensor:
    return torch.tensor(yarn_freqs_closed_form(cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_factor,
                                               cfg.original_seq_len, cfg.beta_fast, cfg.beta_slow),
                        dtype=torch.float64)


def rope_ref(x: torch.Tensor, pos: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0, x1), (x2, x3), ... as complex numbers by pos * freq.
    x: (B, T, [H,] d)."""
    z = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2).contiguous())
    angles = pos.double()[:, None] * freqs[None]
    rot = torch.polar(torch.ones_like(angles), angles)
    if z.dim() == 4:
        rot = rot[:, None]
    return torch.view_as_real(z * rot).flatten(-2)


def rmsnorm_ref(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.double()


def mla_ref(attn, x: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """SPEC 1.1 written out in float64 with materialized per-head keys, causal softmax, explicit scale."""
    B, T, _ = x.shape
    H, r = cfg.n_heads, cfg.kv_lora_rank
    dn, dr, dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    x = x.double()
    W = {n: p.detach().double() for n, p in attn.named_parameters()}
    if cfg.q_lora_rank:
        q = rmsnorm_ref(x @ W["wq_a.weight"].T, W["q_norm.weight"], cfg.norm_eps) @ W["wq_b.weight"].T
    else:
        q = x @ W["wq.weight"].T
    q = q.view(B, T, H, dn + dr)
    freqs = ref_freqs(cfg)
    pos = torch.arange(T)
    q_nope, q_pe = q[..., :dn], rope_ref(q[..., dn:], pos, freqs)
    a = x @ W["wkv_a.weight"].T
    c_kv = rmsnorm_ref(a[..., :r], W["kv_norm.weight"], cfg.norm_eps)
    k_pe = rope_ref(a[..., r:], pos, freqs)  # (B, T, dr): one rope key for all heads
    up = (c_kv @ W["wkv_b.weight"].T).view(B, T, H, dn + dv)
    k_nope, v = up[..., :dn], up[..., dn:]
    m = 0.1 * cfg.mscale * math.log(cfg.rope_factor) + 1 if cfg.rope_factor > 1 else 1.0
    scale = (dn + dr) ** -0.5 * m * m
    scores = torch.einsum("bthd,bshd->bhts", q_nope, k_nope) + torch.einsum("bthd,bsd->bhts", q_pe, k_pe)
    scores = scores * scale
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    o = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v).reshape(B, T, H * dv)
    return o @ W["wo.weight"].T


def gate_ref(x, weight, bias, cfg: ModelConfig):
    """Brute force per token: affinities sigmoid(u_e) (V3) or exp(u_e) / sum_j exp(u_j) (V2's softmax);
    groups scored by the sum of their top-2 biased affinities (V3) or by their best one (V2's
    group-limited greedy); the best n_limited_groups groups kept; top-K biased affinities inside them;
    weights = unbiased affinities, normalized to 1 unless the config says not to (sigmoid: yes, softmax: no,
    norm_topk_prob overrides), times route_scale."""
    E, G, K = cfg.n_routed_experts, cfg.n_expert_groups, cfg.n_activated_experts
    per = E // G
    softmax = cfg.score_func == "softmax"
    normalize = cfg.norm_topk_prob if cfg.norm_topk_prob is not None else not softmax
    u_all = (x.double() @ weight.double().T).tolist()
    idx_out, w_out = [], []
    for u in u_all:
        if softmax:
            z = sum(math.exp(v) for v in u)
            s = [math.exp(v) / z for v in u]
        else:
            s = [1 / (1 + math.exp(-v)) for v in u]
        c = [s[e] + float(bias[e]) for e in range(E)]
        group_score = []
        for g in range(G):
            members = sorted((c[e] for e in range(g * per, (g + 1) * per)), reverse=True)
            group_score.append((members[0] if softmax else sum(members[:2])) if G > 1 else 0.0)
        kept = sorted(range(G), key=lambda g: -group_score[g])[:cfg.n_limited_groups]
        cand = [e for g in kept for e in range(g * per, (g + 1) * per)]
        chosen = sorted(sorted(cand, key=lambda e: -c[e])[:K])
        tot = sum(s[e] for e in chosen) if normalize else 1.0
        idx_out.append(chosen)
        w_out.append([s[e] / tot * cfg.route_scale for e in chosen])
    return torch.tensor(idx_out), torch.tensor(w_out, dtype=torch.float64)


# ---- MLA ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [
    tiny(),
    tiny(q_lora_rank=24, rope_factor=4.0, mscale=0.707, max_seq_len=64, original_seq_len=16),
], ids=["plain", "qlora-yarn"])
def test_mla_matches_reference(cfg):
    """Attention output equals a float64 reference of SPEC 1.1 (low-rank q, shared rope key, latent norm,
    YaRN-scaled softmax) for both the naive and the absorbed path."""
    model = Transformer(cfg).eval()
    attn = model.layers[0].attn
    x = torch.randn(2, 24, cfg.dim)
    cos, sin = model.rope(None, 0, 24)
    ref = mla_ref(attn, x, cfg)
    with torch.no_grad():
        for absorb in (False, True):
            assert rel_err(attn(x, cos, sin, absorb=absorb), ref) < 1e-5
        attn.fuse_absorbed(True)  # precomputed W_UK·W_Q and W_O·W_UV (what the engine decodes with)
        assert attn.fused is not None
        assert rel_err(attn(x, cos, sin, absorb=True), ref) < 1e-5


def test_naive_and_absorbed_agree_full_forward():
    """Weight absorption (W_UK into the query, W_UV into the output) gives the same hidden states."""
    model = Transformer(tiny(q_lora_rank=16)).eval()
    ids = torch.randint(0, 64, (2, 32))
    with torch.no_grad():
        assert rel_err(model.hidden(ids, absorb=True), model.hidden(ids, absorb=False)) < 1e-5


@pytest.mark.parametrize("q_lora_rank", [0, 16])
@pytest.mark.parametrize("absorb,fused", [(False, False), (True, False), (True, True)])
def test_cached_decode_matches_full_forward(absorb, fused, q_lora_rank):
    """Prefill 8 tokens, then a 5-token chunk (causal over a filled prefix), then one token at a time into a
    preallocated latent cache: every position's hidden state equals the full no-cache forward (also with the
    engine's fused inference weights, with and without a low-rank query)."""
    cfg = tiny(q_lora_rank=q_lora_rank, rope_factor=2.0, original_seq_len=16)
    model = Transformer(cfg).eval()
    full_model = model
    if fused:
        import copy
        full_model = copy.deepcopy(model)
        model.prepare_inference(True)
    B, T, S = 2, 24, 32
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    cache = torch.zeros(cfg.n_layers, B, S, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    with torch.no_grad():
        full = full_model.hidden(ids)
        steps = [(0, 8), (8, 13)] + [(t, t + 1) for t in range(13, T)]
        outs = [model.hidden(ids[:, a:b], cache=cache, start=a, absorb=absorb) for a, b in steps]
    assert rel_err(torch.cat(outs, dim=1), full) < 1e-5
    assert cache[:, :, T:].abs().max() == 0  # nothing written past the last position


def test_cache_holds_normalized_latent_and_rotated_rope_key():
    """Layer 0's cache row t is [rmsnorm(c_KV_t) ; RoPE_t(k_rope_t)]: kv_lora_rank + qk_rope_head_dim
    numbers."""
    cfg = tiny(rope_factor=4.0, original_seq_len=16)
    model = Transformer(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 20))
    cache = torch.zeros(cfg.n_layers, 1, 20, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    with torch.no_grad():
        model.hidden(ids, cache=cache, start=0, absorb=True)
    blk = model.layers[0]
    h = rmsnorm_ref(model.embed(ids).double(), blk.attn_norm.weight, cfg.norm_eps)
    a = h @ blk.attn.wkv_a.weight.double().T
    freqs = ref_freqs(cfg)
    expect = torch.cat([rmsnorm_ref(a[..., :cfg.kv_lora_rank], blk.attn.kv_norm.weight, cfg.norm_eps),
                        rope_ref(a[..., cfg.kv_lora_rank:], torch.arange(20), freqs)], dim=-1)
    assert rel_err(cache[0], expect) < 1e-5


# ---- RoPE / YaRN -----------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [
    ModelConfig.preset("v3-671b"),
    tiny(qk_rope_head_dim=16, rope_factor=8.0, original_seq_len=4096, max_seq_len=32768),
    tiny(qk_rope_head_dim=32, rope_factor=4.0, rope_theta=500.0, original_seq_len=256, max_seq_len=1024,
         beta_fast=16, beta_slow=2),
    tiny(qk_rope_head_dim=16),  # no YaRN: plain RoPE
], ids=["v3", "factor8", "custom-betas", "plain"])
def test_yarn_frequencies_closed_form(cfg):
    """rope_frequencies equals the YaRN closed form; the fastest pair is never interpolated and, with YaRN,
    the slowest pair is exactly theta / factor."""
    got = rope_frequencies(cfg).double()
    want = ref_freqs(cfg)
    assert torch.allclose(got, want, rtol=1e-6, atol=0)
    assert got[0].item() == pytest.approx(1.0)
    slowest = cfg.rope_theta ** (-(cfg.qk_rope_head_dim - 2) / cfg.qk_rope_head_dim)
    assert got[-1].item() == pytest.approx(slowest / cfg.rope_factor, rel=1e-6)


def test_yarn_ramp_for_v3_shape():
    """V3 (rope dim 64, 4K original, s = 40, betas 32/1): pairs 0..10 keep theta, pairs 23..31 are theta/40,
    the ones between are strictly in between (hand-derived correction dims 10.47 and 22.51 -> 10 and 23)."""
    cfg = ModelConfig.preset("v3-671b")
    f = rope_frequencies(cfg).double()
    theta = torch.tensor([10000.0 ** (-2 * i / 64) for i in range(32)], dtype=torch.float64)
    ratio = f / theta
    assert torch.allclose(ratio[:11], torch.ones(11, dtype=torch.float64), rtol=1e-6)
    assert torch.allclose(ratio[23:], torch.full((9,), 1 / 40, dtype=torch.float64), rtol=1e-6)
    assert ((ratio[11:23] < 1) & (ratio[11:23] > 1 / 40)).all()


def test_softmax_scale_with_mscale():
    """softmax_scale = qk_head_dim^-0.5, times m^2 with m = 0.1 * mscale * ln(s) + 1 under YaRN
    (V3: 192^-0.5 * 1.3689^2 = 0.13523)."""
    v3 = ModelConfig.preset("v3-671b")
    assert v3.softmax_scale == pytest.approx(192 ** -0.5 * (0.1 * math.log(40) + 1) ** 2, rel=1e-12)
    assert v3.softmax_scale == pytest.approx(0.135234, rel=1e-4)
    assert tiny().softmax_scale == pytest.approx(16 ** -0.5)
    c = tiny(rope_factor=4.0, mscale=0.707)
    assert c.softmax_scale == pytest.approx(16 ** -0.5 * (0.0707 * math.log(4) + 1) ** 2, rel=1e-12)


# ---- MoE ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("groups,limited,k", [(1, 1, 3), (4, 2, 3), (4, 1, 2), (8, 3, 4)])
def test_gate_matches_brute_force(groups, limited, k):
    """Top-K selection with bias and group limits, and the weights (unbiased, normalized, times route_scale),
    match a per-token brute-force enumeration."""
    cfg = tiny(n_routed_experts=16, n_activated_experts=k, n_expert_groups=groups, n_limited_groups=limited,
               route_scale=2.5)
    _check_gate(cfg, bias_std=0.1)


def _check_gate(cfg: ModelConfig, bias_std: float) -> None:
    gate = Transformer(cfg).layers[1].ffn.gate
    gate.bias.normal_(0, bias_std)
    x = torch.randn(40, cfg.dim)
    with torch.no_grad():
        w, idx, scores = gate(x)
    ref_idx, ref_w = gate_ref(x, gate.weight, gate.bias, cfg)
    order = idx.argsort(dim=-1)
    assert torch.equal(idx.gather(1, order), ref_idx)
    assert torch.allclose(w.gather(1, order).double(), ref_w, rtol=1e-5, atol=1e-6)
    if cfg.score_func == "softmax":
        assert torch.allclose(scores.sum(-1), torch.ones(40))


@pytest.mark.parametrize("score_func,groups,limited,k,norm", [
    ("softmax", 1, 1, 6, None),  # V2-Lite: 64 -> 16 experts here, top-6, no renormalization
    ("softmax", 4, 2, 3, None),  # V2: group-limited greedy (groups ranked by their best expert)
    ("softmax", 8, 3, 4, True),  # softmax with norm_topk_prob=true
    ("sigmoid", 4, 2, 3, False),  # V3 gate with norm_topk_prob=false (transformers' option)
])
def test_gate_softmax_and_norm_topk_prob_match_brute_force(score_func, groups, limited, k, norm):
    """The softmax gate (V2) and norm_topk_prob against the per-token brute force: selection with bias and
    group limits, and the weights (normalized or not)."""
    cfg = tiny(n_routed_experts=16, n_activated_experts=k, n_expert_groups=groups, n_limited_groups=limited,
               route_scale=1.5, score_func=score_func, norm_topk_prob=norm, init_std=0.3)
    _check_gate(cfg, bias_std=0.02 if score_func == "softmax" else 0.1)


def test_gate_bias_moves_selection_not_weights():
    """A large bias forces an expert into every token's top-K, but its weight still comes from the unbiased
    affinity (the bias never enters the mixing weights)."""
    cfg = tiny(n_routed_experts=8, n_activated_experts=2, route_scale=1.0)
    gate = Transformer(cfg).layers[1].ffn.gate
    x = torch.randn(16, cfg.dim)
    gate.bias[5] = 10.0
    with torch.no_grad():
        w, idx, scores = gate(x)
    assert (idx == 5).any(dim=-1).all()
    s = scores.gather(1, idx)
    assert torch.allclose(w, s / s.sum(-1, keepdim=True), atol=1e-6)
    assert not any(n.endswith("gate.bias") for n, _ in Transformer(cfg).named_parameters())


@pytest.mark.parametrize("stacked", [False, True], ids=["per-expert", "stacked"])
def test_moe_matches_per_token_loop(stacked):
    """The batched expert dispatch (per-expert slices, or the stacked-weights inference path) equals, per
    token, shared(x) + sum_k w_k * expert_{i_k}(x) in a loop."""
    cfg = tiny(n_routed_experts=8, n_activated_experts=3, n_shared_experts=2, n_expert_groups=2,
               n_limited_groups=1, route_scale=2.5)
    moe = Transformer(cfg).layers[1].ffn.eval()
    moe.gate.bias.normal_(0, 0.05)
    moe.stack_experts(stacked)
    x = torch.randn(2, 10, cfg.dim)
    with torch.no_grad():
        y = moe(x)
        w, idx, _ = moe.gate(x.reshape(-1, cfg.dim))

        def swiglu(m, v):
            return (F.silu(v @ m.w1.weight.T) * (v @ m.w3.weight.T)) @ m.w2.weight.T

        ref = []
        for t, v in enumerate(x.reshape(-1, cfg.dim)):
            out = swiglu(moe.shared_experts, v)
            for j in range(cfg.n_activated_experts):
                out = out + w[t, j] * swiglu(moe.experts[int(idx[t, j])], v)
            ref.append(out)
    assert rel_err(y.reshape(-1, cfg.dim), torch.stack(ref)) < 1e-5
    assert moe.last_load.tolist() == torch.bincount(idx.flatten(), minlength=8).float().tolist()


def test_sequence_balance_loss_hand_computed():
    """L = sum_i f_i P_i per sequence, averaged. Sequence 1 (E=4, K=2, T=2): tokens pick {0,1} and {1,2},
    f = E/(KT) * counts = [1, 2, 1, 0]; P = mean_t of normalized scores = [0.3, 61/180, 7/30, 23/180], so
    L1 = 0.3 + 122/180 + 7/30 = 218/180. Sequence 2: uniform scores, picks {0,1},{2,3}: L2 = 1.
    Mean 398/360."""
    scores = torch.tensor([[[0.9, 0.5, 0.3, 0.1], [0.2, 0.8, 0.6, 0.4]],
                           [[0.5, 0.5, 0.5, 0.5], [0.5, 0.5, 0.5, 0.5]]])
    indices = torch.tensor([[[0, 1], [1, 2]], [[0, 1], [2, 3]]])
    assert sequence_balance_loss(scores, indices).item() == pytest.approx(398 / 360, rel=1e-6)
    assert sequence_balance_loss(scores[:1], indices[:1]).item() == pytest.approx(218 / 180, rel=1e-6)


def test_balance_loss_collected_in_training():
    """In training mode the forward returns the sum over MoE layers of each layer's balance loss, which is
    >= 1 (its minimum, reached by perfectly uniform routing and affinities) and has a gradient to the gate."""
    cfg = tiny(n_layers=3, n_dense_layers=1)
    model = Transformer(cfg).train()
    ids = torch.randint(0, 64, (2, 16))
    _, parts = model(ids, ids.roll(-1, 1))
    per_layer = [m.balance_loss for m in model.moe_layers()]
    assert len(per_layer) == 2
    assert parts.balance.item() == pytest.approx(sum(p.item() for p in per_layer))
    assert all(p.item() >= 1 - 1e-6 for p in per_layer)
    parts.balance.backward()
    assert model.layers[1].ffn.gate.weight.grad.abs().sum() > 0


def test_update_expert_bias_sign_rule():
    """b_i += gamma * sign(mean_load - load_i): overloaded experts go down, underloaded up, average stay."""
    cfg = tiny(n_layers=3, n_dense_layers=1, n_routed_experts=4, n_activated_experts=1)
    model = Transformer(cfg)
    loads = torch.tensor([[4.0, 0.0, 2.0, 2.0], [1.0, 1.0, 1.0, 5.0]])  # means 2 and 2; sign, not size
    model.update_expert_bias(0.01, loads)
    model.update_expert_bias(0.01, loads)
    gates = [m.gate for m in model.moe_layers()]
    assert torch.allclose(gates[0].bias, torch.tensor([-0.02, 0.02, 0.0, 0.0]))
    assert torch.allclose(gates[1].bias, torch.tensor([0.02, 0.02, 0.02, -0.02]))


def test_update_expert_bias_uses_accumulated_loads():
    """Without explicit loads the update uses the token counts accumulated over training forwards (all
    micro-batches), then resets them."""
    cfg = tiny(n_layers=2, n_dense_layers=1, n_routed_experts=4, n_activated_experts=1)
    model = Transformer(cfg).train()
    total = torch.zeros(4)
    for _ in range(2):
        model(torch.randint(0, 64, (2, 8)))
        total += model.expert_loads()[0]
    assert torch.equal(model.accumulated_loads()[0], total) and total.sum() == 32
    model.update_expert_bias(0.5)
    assert torch.equal(model.moe_layers()[0].gate.bias, 0.5 * torch.sign(total.mean() - total))
    assert model.accumulated_loads().abs().sum() == 0


# ---- MTP ---------------------------------------------------------------------------------------------
def test_mtp_loss_matches_hand_built_loop():
    """Depth k at position i combines h^{k-1}_i with Emb(t_{i+k}) and predicts t_{i+k+1}; the loss is the mean
    over depths of each depth's mean CE over non-ignored targets (built here position by position)."""
    cfg = tiny(n_mtp=2)
    model = Transformer(cfg).eval()
    B, T = 2, 12
    stream = torch.randint(0, cfg.vocab_size, (B, T + 1))
    ids, targets = stream[:, :T], stream[:, 1:].clone()
    targets[0, 3] = IGNORE
    targets[1, T - 1] = IGNORE
    with torch.no_grad():
        _, parts = model(ids, targets)
        h = model.hidden(ids)
        depth_losses = []
        for k, mod in enumerate(model.mtp, start=1):
            n = T - k
            emb = torch.stack([model.embed(stream[:, i + k]) for i in range(n)], dim=1)  # Emb(t_{i+k})
            x = mod.eh_proj(torch.cat([mod.enorm(emb), mod.hnorm(h[:, :n])], dim=-1))
            cos, sin = model.rope(None, 0, n)
            h = mod.block(x, cos, sin)
            logp = model.head(mod.norm(h)).double().log_softmax(-1)
            nll = [-logp[b, i, targets[b, i + k]]
                   for b in range(B) for i in range(n) if targets[b, i + k] != IGNORE]
            depth_losses.append(torch.stack(nll).mean())
    assert parts.mtp.item() == pytest.approx(torch.stack(depth_losses).mean().item(), rel=1e-5)
    logits = model.logits(model.hidden(ids))
    main = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
    assert parts.main.item() == pytest.approx(main.item(), rel=1e-6)


def test_mtp_depth1_sees_next_token_embedding():
    """Changing token t_j changes depth-1 MTP logits only at positions i >= j-1 (position j-1 reads Emb(t_j)
    directly); the main logits only at positions >= j."""
    cfg = tiny(n_mtp=1)
    model = Transformer(cfg).eval()
    T, j = 12, 6
    ids = torch.randint(0, cfg.vocab_size, (1, T))
    ids2 = ids.clone()
    ids2[0, j] = (ids[0, j] + 1) % cfg.vocab_size

    def mtp_logits(x):
        h = model.hidden(x)
        mod = model.mtp[0]
        cos, sin = model.rope(None, 0, T - 1)
        return model.head(mod.norm(mod(h[:, :-1], model.embed(x[:, 1:]), cos, sin))), model.logits(h)

    with torch.no_grad():
        (m1, l1), (m2, l2) = mtp_logits(ids), mtp_logits(ids2)
    changed_mtp = (m1 - m2).abs().amax(-1)[0] > 1e-6
    changed_main = (l1 - l2).abs().amax(-1)[0] > 1e-6
    assert changed_mtp.tolist() == [i >= j - 1 for i in range(T - 1)]
    assert changed_main.tolist() == [i >= j for i in range(T)]


# ---- config -------------------------------------------------------------------------------------------
def counts_from_modules(cfg: ModelConfig) -> dict[str, int]:
    """Count parameters from the modules themselves, built on the meta device (no memory): embedding, final
    norm and head, plus one dense block, one MoE block and one MTP module times their numbers; `active`
    drops the routed experts a token does not use (n_routed - n_activated per MoE layer)."""
    from nanoseek.model.transformer import Block, MTPModule

    def numel(m: torch.nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    d = cfg.dim
    with torch.device("meta"):
        dense = numel(Block(0, cfg)) if cfg.n_layers - cfg.n_moe_layers else 0
        moe_block = Block(cfg.n_layers - 1, cfg) if cfg.n_moe_layers else None
        mtp = numel(MTPModule(cfg.n_layers, cfg)) if cfg.n_mtp else 0
    outer = 2 * cfg.vocab_size * d + d  # embedding, head, final norm
    total = outer + (cfg.n_layers - cfg.n_moe_layers) * dense
    active = total
    if moe_block is not None:
        unused = (cfg.n_routed_experts - cfg.n_activated_experts) * numel(moe_block.ffn.experts[0])
        total += cfg.n_moe_layers * numel(moe_block)
        active += cfg.n_moe_layers * (numel(moe_block) - unused)
    return {"total": total, "active": active, "mtp": cfg.n_mtp * mtp}


@pytest.mark.parametrize("preset,total,active,mtp", [
    ("tiny", 1_880_448, 995_712, 544_448),
    ("v3-671b", 671_026_404_352, 37_552_282_624, 11_610_067_968),
    ("v2-lite-16b", 15_706_484_224, 2_661_150_208, 0),
])
def test_param_counts_of_presets_are_the_readme_figures(preset, total, active, mtp):
    """The exact counts README quotes: the closed form (ModelConfig.param_counts) and a count of the modules
    (built on the meta device) both give them. Published: V3 671B total / 37B activated (arXiv 2412.19437),
    V2-Lite 15.7B total (arXiv 2405.04434; its 2.4B activated excludes the embedding: 2.45B here)."""
    cfg = ModelConfig.preset(preset)
    c = cfg.param_counts()
    assert (c["total"], c["active"], c["mtp"]) == (total, active, mtp)
    assert counts_from_modules(cfg) == {"total": total, "active": active, "mtp": mtp}
    if preset == "tiny":  # small enough to build for real: every parameter of the model, counted
        model = Transformer(cfg)
        main = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp."))
        assert (main, model.num_params() - main) == (total, mtp)
    if preset == "v3-671b":  # the papers' figures are truncated
        assert (total // 10**9, active // 10**9) == (671, 37)
    if preset == "v2-lite-16b":
        assert (total // 10**8, (active - c["embed"]) // 10**8) == (157, 24)


@pytest.mark.parametrize("cfg", [
    tiny(),
    tiny(q_lora_rank=16, n_mtp=2, n_shared_experts=2, n_dense_layers=0),
    tiny(n_routed_experts=0, n_dense_layers=2),
], ids=["moe", "qlora-mtp", "dense"])
def test_param_counts_match_instantiated_model(cfg):
    """The closed-form count equals the number of parameters of the instantiated model."""
    assert cfg.param_counts()["total_with_mtp"] == Transformer(cfg).num_params()


def test_config_json_round_trip(tmp_path):
    """to_json / from_json (file and string) give back an equal config."""
    cfg = ModelConfig.preset("small", rope_factor=4.0, n_mtp=2, fp8=True)
    cfg.to_json(tmp_path / "m.json")
    assert ModelConfig.from_json(tmp_path / "m.json") == cfg
    assert ModelConfig.from_json(str(tmp_path / "m.json")) == cfg
    assert ModelConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize("fields,needle", [
    ({"n_routed_experts": 10, "n_expert_groups": 4}, "n_expert_groups"),
    ({"qk_rope_head_dim": 7}, "qk_rope_head_dim"),
    ({"n_activated_experts": 9}, "n_activated_experts"),
    ({"n_expert_groups": 2, "n_limited_groups": 3}, "n_limited_groups"),
    ({"n_dense_layers": 5}, "n_dense_layers"),
    ({"dim": 0}, "dim"),
    ({"rope_factor": 0.5}, "rope_factor"),
    ({"score_func": "relu"}, "score_func"),
    ({"n_experts": 8}, "n_experts"),  # unknown field
])
def test_config_validation_errors(fields, needle):
    """Impossible shapes raise ConfigError naming the offending field."""
    d = ModelConfig().to_dict()
    d.update(fields)
    with pytest.raises(ConfigError, match=needle):
        ModelConfig.from_dict(d)


def test_config_file_errors(tmp_path):
    """A missing file, bad JSON or unknown preset are ConfigErrors with a clear message."""
    with pytest.raises(ConfigError, match="not found"):
        ModelConfig.from_json(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_json(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="unknown preset"):
        ModelConfig.preset("gpt5")


# ---- FP8 -------------------------------------------------------------------------------------------------
def test_fp8_linear_error_bounded():
    """Fine-grained E4M3 quantize-dequantize keeps fp8_linear within 5% relative error of F.linear, yet it is
    not a no-op (error above 0.1%)."""
    x, w = torch.randn(64, 256), torch.randn(192, 256) * 0.05
    err = rel_err(fp8_linear(x, w), F.linear(x, w))
    assert 1e-3 < err < 0.05


def test_fp8_activation_scales_are_per_1x128_tile():
    """An outlier in one 1x128 activation tile coarsens only that tile's quantization. fp8_linear(x, I)
    exposes the quantized activations, since the identity's blocks (amax 1) quantize exactly."""
    eye = torch.eye(256)
    x = torch.randn(4, 256)
    x_out = x.clone()
    x_out[1, 5] = 1000.0
    q, q_out = fp8_linear(x, eye), fp8_linear(x_out, eye)
    tile = torch.zeros(4, 256, dtype=torch.bool)
    tile[1, :128] = True
    assert torch.equal(q[~tile], q_out[~tile])
    assert not torch.equal(q[tile & (torch.arange(256) != 5)], q_out[tile & (torch.arange(256) != 5)])
    # Reference per-tile quantization of an untouched tile.
    t = x[2, 128:]
    s = t.abs().max() / 448
    assert torch.equal(q[2, 128:], (t / s).to(torch.float8_e4m3fn).float() * s)


def test_fp8_weight_scales_are_per_128x128_block():
    """An outlier in one 128x128 weight block changes only that block's quantization
    (fp8_linear(I, W) = Wq^T)."""
    eye = torch.eye(256)
    w = torch.randn(256, 256)
    w_out = w.clone()
    w_out[3, 7] = 500.0  # block (0, 0)
    q, q_out = fp8_linear(eye, w).T, fp8_linear(eye, w_out).T
    block = torch.zeros(256, 256, dtype=torch.bool)
    block[:128, :128] = True
    assert torch.equal(q[~block], q_out[~block])
    block[3, 7] = False
    assert not torch.equal(q[block], q_out[block])


def test_fp8_model_trains_close_to_fp32():
    """A tiny model with fp8=True learns (loss falls over 20 AdamW steps) and tracks the identical fp32 model
    (final loss within 5%); the two differ, so FP8 simulation is really on."""
    base = {"vocab_size": 64, "dim": 64, "inter_dim": 128, "moe_inter_dim": 32, "n_layers": 2, "n_heads": 2,
            "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 16, "v_head_dim": 16,
            "init_std": 0.02}
    ids = torch.randint(0, 64, (4, 25))
    losses = {}
    for fp8 in (False, True):
        torch.manual_seed(1)
        model = Transformer(tiny(**base, fp8=fp8)).train()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        hist = []
        for _ in range(20):
            _, parts = model(ids[:, :-1], ids[:, 1:])
            opt.zero_grad()
            parts.main.backward()
            opt.step()
            hist.append(parts.main.item())
        losses[fp8] = hist
    f32, f8 = losses[False], losses[True]
    assert f8[-1] < f8[0] - 0.5
    assert abs(f8[-1] - f32[-1]) / f32[-1] < 0.05
    assert f8 != f32


def test_prepared_inference_weights_are_reused_until_the_weights_change():
    """prepare_inference reuses its fused tensors while the weights are untouched, and rebuilds them after an
    optimizer step, so a decode after training never runs on stale weights."""
    cfg = tiny()
    model = Transformer(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 12))

    def fused_decode():
        model.prepare_inference(True)
        try:
            with torch.no_grad():
                return model.hidden(ids, cache=torch.zeros(cfg.n_layers, 2, 12, cfg.kv_lora_rank + cfg.qk_rope_head_dim),
                                    absorb=True)
        finally:
            model.prepare_inference(False)

    first = fused_decode()
    fused_first = model._fused_cache[1]
    assert all(getattr(m, "fused", None) is None for m in model.modules() if hasattr(m, "fused") and m is not model)
    fused_decode()
    assert model._fused_cache[1] is fused_first  # unchanged weights: nothing rebuilt
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    model(ids, ids)[1].main.backward()
    opt.step()
    model.eval()
    second = fused_decode()
    assert model._fused_cache[1] is not fused_first
    with torch.no_grad():
        assert rel_err(second, model.hidden(ids)) < 1e-5 and rel_err(second, first) > 1e-3
