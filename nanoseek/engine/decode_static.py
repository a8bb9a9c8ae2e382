"""The lean decode step with static shapes, for `torch.compile` (opt-in: `Engine(compile_decode=True)`).

The same arithmetic as `LeanDecoder.step` (engine/decode.py; absorbed MLA, DeepSeek-V2 sec. 2.1.2; DeepSeekMoE,
V3 report sec. 2.1.2), rewritten so that one compiled graph serves every step of a generate call:

* The step's slot `s` is a 0-d tensor, not a Python int, and attention runs over the whole cache capacity with
  the slots from `s` on masked to -inf (their cache entries are zero-filled once, so no NaN reaches a product),
  plus the new entry itself as one more key, in one softmax. The graph is pure: it returns the new entries and
  the caller writes them into both cache layouts (two ops per step; written inside the graph, each layer's
  write was functionalized into a copy of the whole cache).
  The shapes of a step then depend only on (batch, capacity); torch.compile's automatic dynamic shapes turn a
  dimension symbolic the first time it changes, so a process compiles a handful of graphs, not one per step.
* RoPE is the real-valued rotation (inductor generates no code for complex tensors), fused by inductor with
  the norms, the residual adds and the SwiGLU activations into a few C++ loops.
* The routed experts (and the shared expert folded in as one more) stay an eager `torch._grouped_mm` dispatch,
  wrapped as the custom op `nanoseek::lean_moe` with a shape-only fake kernel: `_grouped_mm` has no float32
  meta kernel, so dynamo could not trace it, and the op has a fixed output shape (N, dim) whatever the routing.

Simplifications: the models `decode.supported` accepts; weights are graph inputs (no inductor "freezing"), so
a weight update (RL) needs no recompile. Numerics: the eager step's up to float rounding (summation order of
the longer masked softmax and of inductor's fused loops; tests/test_decode_compiled.py holds it to 1e-5).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_PAIRS: dict[tuple, tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor]] = {}


def _pair_ids(N: int, K: int, groups: int, shared: bool, like: torch.Tensor, zero_pairs: bool = True):
    """The constant parts of the (token, expert) pair list, cached per shape: the token of every pair, the expert
    ids and weights appended after the routed pairs, and whether the list is doubled (see `moe_experts`).
    zero_pairs False: the routed and shared pairs only (no zero-weight pairs, never doubled; decode._moe_packed)."""
    key = (N, K, groups, shared, like.device, like.dtype, zero_pairs)
    if key not in _PAIRS:
        tokens = torch.arange(N, device=like.device)
        ids = [tokens.repeat_interleave(K)] + ([tokens] if shared else [])
        experts = [torch.full((N,), groups - 1, device=like.device)] if shared else []
        weights = [like.new_ones(N)] if shared else []
        sparse = N * (K + shared) < 2 * groups or not zero_pairs
        doubled = sparse and N > 1 and zero_pairs
        if not sparse:  # one zero-weight pair per expert (token 0)
            ids.append(tokens.new_zeros(groups))
            experts.append(torch.arange(groups, device=like.device))
            weights.append(like.new_zeros(groups))
        ids = torch.cat(ids)
        if len(_PAIRS) > 64:
            _PAIRS.clear()
        _PAIRS[key] = (torch.cat([ids, ids]) if doubled else ids, torch.cat(experts) if experts else None,
                       torch.cat(weights) if weights else None, like.new_zeros(N * (K + shared)), doubled)
    return _PAIRS[key]


def moe_experts(h: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                shared: bool, out: torch.Tensor | None = None) -> torch.Tensor:
    """out + sum_k w_k E_k(h) (+ the folded shared expert, the last group of w13 / w2, weight 1) for h (N, dim);
    out None: a zero tensor; added in place. Two `torch._grouped_mm` over the expert-sorted (token, expert)
    pairs (no padding to the busiest expert). At small batches (fewer pairs than twice the experts) only the
    chosen experts run (at batch 1 the others' weights are most of a MoE layer's bytes): a single row runs
    each of its pairs once, larger small batches double every pair by a zero-weight copy; otherwise one
    zero-weight pair per expert (the few unchosen ones then run on one zero row).
    Rounding: CPU `_grouped_mm` (MKL) rounds a group of 1, 2 or 3 rows alike and differently from a group of 4
    or more (measured bitwise, docs/decode_profile.md), so batch 1 without the zero copies gives the very
    numbers the doubled pairs gave, at one GEMV's cost instead of a 2-row GEMM's (1.3-1.4x the time on one
    thread, far more on two threads under load)."""
    N, K = indices.shape
    groups = w13.size(0)
    token_ids, tail_experts, tail_w, zeros, doubled = _pair_ids(N, K, groups, shared, h)
    expert = indices.flatten() if tail_experts is None else torch.cat([indices.flatten(), tail_experts])
    w = weights.flatten() if tail_w is None else torch.cat([weights.flatten(), tail_w])
    if doubled:
        expert, w = torch.cat([expert, expert]), torch.cat([w, zeros])
    offs = torch.bincount(expert, minlength=groups).cumsum(0, dtype=torch.int32)
    order = expert.argsort(stable=True)
    token_of = token_ids.index_select(0, order)
    gu = torch._grouped_mm(h.index_select(0, token_of), w13, offs=offs)
    inter = w2.size(1)
    act = F.silu(gu[:, :inter]).mul_(gu[:, inter:]).mul_(w.index_select(0, order).unsqueeze(-1))
    out = h.new_zeros(h.shape) if out is None else out
    return out.index_add_(0, token_of, torch._grouped_mm(act, w2, offs=offs))


@torch.library.custom_op("nanoseek::lean_moe", mutates_args=())
def lean_moe(h: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
             shared: bool) -> torch.Tensor:
    """`moe_experts` as an opaque op for the compiled step (data-dependent pair counts inside, a fixed (N, dim)
    result outside)."""
    return moe_experts(h, weights, indices, w13, w2, shared)


@lean_moe.register_fake
def _lean_moe_fake(h, weights, indices, w13, w2, shared):
    return torch.empty_like(h)


def _rope_real(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved pairs (x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos); cos/sin broadcast over x's pairs."""
    pairs = x.unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)


@dataclass
class StaticLayer:
    """One block's tensors for `static_step` (from decode._Layer)."""
    attn_norm: torch.Tensor
    w_in: torch.Tensor
    kv_norm: torch.Tensor
    w_ov: torch.Tensor
    ffn_norm: torch.Tensor
    moe: torch.nn.Module | None  # the MoE (its Gate routes); None: dense FFN
    w13: torch.Tensor
    w2: torch.Tensor
    shared_folded: bool  # the shared expert is the last group of w13 / w2
    shared_apart: bool  # wider shared experts run as their own SwiGLU (sh_w13, sh_w2)
    sh_w13: torch.Tensor | None
    sh_w2: torch.Tensor | None


@dataclass
class StaticState:
    """Everything one compiled step reads: weights, rope tables, caches (contiguous, fixed capacity S), the
    padding key bias (B, 1, S) of 0 / -inf and per-row positions (B, S) for ragged prompts (else None)."""
    layers: list[StaticLayer]
    embed: torch.Tensor
    norm: torch.Tensor
    head: torch.Tensor
    rope_cos: torch.Tensor
    rope_sin: torch.Tensor
    lat: torch.Tensor
    keys: torch.Tensor
    key_bias: torch.Tensor | None
    positions: torch.Tensor | None
    n_heads: int
    kv_lora_rank: int
    eps: float


def static_step(state: "StaticState", tok: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """tok (B,) long at cache slot s (0-d long tensor) -> (next-token logits (B, vocab) float32, the new cache
    entries (B, L, C) of every layer for slot s). Pure: the caller writes the entries into both cache layouts
    (inside the graph the writes would be functionalized into a copy of the whole cache per layer). Attention
    takes slots [0, s) from the cache and slot s from the new entry, one softmax over both."""
    H, r, eps = state.n_heads, state.kv_lora_rank, state.eps
    lat, keys = state.lat, state.keys  # (B, L, S, C), (B, L, C, S)
    B, S, C = lat.size(0), lat.size(2), lat.size(3)
    x = F.embedding(tok, state.embed)
    pos = s.expand(B) if state.positions is None else state.positions.index_select(1, s.view(1)).view(B)
    cos = state.rope_cos.index_select(0, pos).unsqueeze(1)  # (B, 1, d/2): the same angle for q and k
    sin = state.rope_sin.index_select(0, pos).unsqueeze(1)
    slots = torch.arange(S, device=tok.device)
    bias = torch.where(slots < s, 0.0, float("-inf")).expand(B, 1, S)  # the cache's slots before s
    if state.key_bias is not None:
        bias = bias + state.key_bias
    entries = []
    for i, lay in enumerate(state.layers):
        h = F.rms_norm(x, (x.size(-1),), lay.attn_norm, eps)
        qkv = F.linear(h, lay.w_in).view(B, H + 1, C)
        qkv = torch.cat([qkv[..., :r], _rope_real(qkv[..., r:], cos, sin)], dim=-1)
        new = torch.cat([F.rms_norm(qkv[:, H, :r], (r,), lay.kv_norm, eps), qkv[:, H, r:]], dim=-1)  # (B, C)
        entries.append(new)
        q = qkv[:, :H]  # (B, H, C), pre-scaled by the softmax scale
        scores = torch.cat([torch.baddbmm(bias, q, keys[:, i]), (q * new.unsqueeze(1)).sum(-1, keepdim=True)], -1)
        probs = scores.softmax(dim=-1)  # (B, H, S + 1): the cache's slots, then slot s
        o = torch.bmm(probs[..., :S], lat[:, i, :, :r]) + probs[..., S:] * new[:, None, :r]  # (B, H, r)
        x = x + F.linear(o.reshape(B, H * r), lay.w_ov)
        h = F.rms_norm(x, (x.size(-1),), lay.ffn_norm, eps)
        if lay.moe is None:
            gate, up = F.linear(h, lay.w13).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, lay.w2)
        else:
            weights, indices, _ = lay.moe.gate(h)
            x = x + torch.ops.nanoseek.lean_moe(h, weights, indices, lay.w13, lay.w2, lay.shared_folded)
            if lay.shared_apart:
                gate, up = F.linear(h, lay.sh_w13).chunk(2, dim=-1)
                x = x + F.linear(F.silu(gate) * up, lay.sh_w2)
    h = F.rms_norm(x, (x.size(-1),), state.norm, eps)
    return F.linear(h, state.head), torch.stack(entries, dim=1)


@functools.cache
def compiled_step(backend: str = "inductor"):
    """One compiled `static_step` per process and backend (guards and automatic dynamic shapes decide
    recompiles). backend "aot_eager" traces the same graph without inductor's C++ build (the fast tests)."""
    return torch.compile(static_step, fullgraph=True, backend=backend)
