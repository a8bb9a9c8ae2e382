"""A lean batched decode step: one new token per row through the whole model with the fewest CPU kernels.

The same arithmetic as `Transformer.hidden(..., absorb=True)` + `Transformer.logits` on the weights that
`Transformer.prepare_inference` fuses (absorbed MLA, DeepSeek-V2 sec. 2.1.2; DeepSeekMoE, V3 report sec.
2.1.2), rearranged for a decode batch that is bound by per-op cost (batch ~128, dim 128: each kernel is a
few microseconds of work behind ~10 us of dispatch) rather than by FLOPs:

* Attention. The absorbed input projection's rows are regrouped per head as [q_lat_h ; q_rope_h] followed by
  the new latent [c_KV ; k_rope], so one matmul gives a (B, H + 1, r + d_rope) block whose rope parts are
  rotated together by one in-place complex multiply, whose first H rows *are* the queries (no concatenation)
  and whose last row is the new cache entry. The rotations of a step are built once for all layers.
* Two cache layouts per layer: the latent (B, L, S, r + d_rope) as before (values = its first r numbers),
  and its transpose (B, L, r + d_rope, S) for the keys, each written one column per step. Both score and
  value products then run on strided views; the shared path instead copied the keys into a contiguous
  transposed tensor in every layer of every step (the largest single op of a decode step). The buffers are
  reused across generate calls (`Workspace`: no page faults on fresh memory), and dropping finished rows
  moves only the filled slots of the kept rows, in place.
* Ragged prompts: one additive key bias (B, 1, S) of 0 / -inf built once and added by `baddbmm` to the
  scores (no per-step mask tensors); equal-length prompts skip it.
* MoE: the shared expert becomes an extra expert that every token visits with weight 1, so all routed and
  shared work is two `torch._grouped_mm` calls over the expert-sorted (token, expert) pairs (no padding to
  the busiest expert, no host sync on the counts); outputs are scaled in the hidden activation and
  accumulated straight into the residual stream by one `index_add_`. Routing is the model's own `Gate`. At
  small batches only the chosen experts run (at batch 1 the others' weights, most of a MoE layer's bytes, are
  not read): batch 1 runs each pair on its one row, other small batches double every pair by a zero-weight
  copy; otherwise one zero-weight pair per expert (engine/decode_static.py's `moe_experts`, shared with the
  compiled step, has the rounding argument). Experts of 1 MiB or more are stored (E, N, K) for batches (`_nk`).
* MLA projections: the precomputed absorbed ones above, or, where they hold over twice the multiply-adds of
  the factors they replace (H r > dim: `absorb_at_runtime`), W_UK / W_UV applied per token by two per-head bmms.
  Low-rank queries (q_lora_rank > 0, V2 / V3's shape): one matmul gives [c_Q ; c_KV ; k_rope], then the
  normalized c_Q goes through W_UQ (or its absorbed product).
* Batch 1 (chat, a lone server request) is a chain of GEMVs bound by memory bandwidth: its dense weights are
  read from a transposed copy (`LeanLayers.gemv`), the layout MKL streams fastest for one row, and each chosen
  expert runs on its one row (docs/decode_profile.md has the per-op measurements). On T > 1 threads every such
  matrix is stored as T row blocks (T, N/T, K) and multiplied by one `bmm` (`linear`): torch runs a one-row
  matmul on one thread whatever `set_num_threads` says, a bmm splits its batch over the threads (1.5-2x the
  bandwidth on two threads for DRAM-resident weights, bench/gemv_threads.py).
* Batches of 2+ rows read every matrix of 1 MiB or more from oneDNN's prepacked float32 layout
  (`LeanLayers.packed`, `_packed`; what inductor's freezing emits for float32 linears): MKL's GEMMs of a few
  rows (the experts' 4-16 at batch 16-64) ran at half its speed (docs/decode_profile.md); big experts then run
  one by one on their gathered rows (`_moe_packed`). Smaller matrices (the tiny preset's) keep the layouts above.

Simplifications: float32 non-FP8 models on CPU (an even q_lora_rank) and no expert parallelism; anything else
(`supported` is False) decodes through `Transformer.hidden`. The expert loads of decode steps are not recorded
(`last_load` describes training forwards). The results equal the shared path up to float rounding (summation
order), which tests/test_decode_fast.py holds to.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from nanoseek.engine import decode_static
from nanoseek.model import Transformer
from nanoseek.model.moe import MoE

CAPACITY_STEP = 64  # compiled decoding: cache capacity rounded up to a multiple of this (fewer distinct shapes)


def supported(model: Transformer, cache_dtype: torch.dtype) -> bool:
    """Whether `LeanDecoder` can run this model (else the engine decodes through `Transformer.hidden`)."""
    cfg = model.cfg
    dtype = next(model.parameters()).dtype
    # _grouped_mm wants 16-byte strides: dim and the expert width in multiples of 4 float32s
    # CPU only: CUDA's _grouped_mm takes bfloat16 on recent GPUs, and GPU decode is not launch-bound the same way
    # even kv_lora_rank: the in-place rope views each head's [latent ; rope] row of r + d floats as complex pairs
    # q_lora_rank > 0: its input projection [W_DQ ; W_DKV] and the rope of the new key must start at even offsets
    return (hasattr(torch, "_grouped_mm") and model.fused and not cfg.fp8 and cfg.q_lora_rank % 2 == 0
            and not cfg.sparse_attention
            and next(model.parameters()).device.type == "cpu"
            and cfg.dim % 4 == 0 and cfg.moe_inter_dim % 4 == 0 and cfg.kv_lora_rank % 2 == 0
            and cache_dtype == dtype == torch.float32
            and all(m.ep is None and m.stacked is not None for m in model.moe_layers())
            and all(layer.attn.fused is not None for layer in model.layers))


def absorb_at_runtime(cfg) -> bool:
    """Whether the lean step should apply W_UK / W_UV per token (DeepSeek's own inference code does) rather than
    use the precomputed absorbed projections. The absorbed input projection has H (r + d) + r + d rows and the
    absorbed output one has H r columns: with H r > dim they hold more numbers than the factors they replace,
    so every decode step reads (batch 1, memory-bound) and multiplies (large batches) more. Runtime absorption
    costs two small per-head bmms and a concatenation more per layer: chosen where it at least halves the
    multiply-adds of the attention projections per token (the ~100M bench config: 0.42x; the tiny preset,
    0.80x, is launch-bound and keeps the single fused matmul)."""
    H, r, d, nope, v, dim = (cfg.n_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.qk_nope_head_dim,
                             cfg.v_head_dim, cfg.dim)
    q_in = cfg.q_lora_rank or dim  # the query projection's input: x, or the normalized low-rank c_Q
    fused = H * (r + d) * q_in + (r + d) * dim + dim * H * r
    runtime = H * (nope + d) * q_in + (r + d) * dim + H * nope * r + H * r * v + dim * H * v
    # the in-place rope views the rope block as complex pairs: it must start at an even offset
    return runtime <= 0.5 * fused and (H * nope + r) % 2 == 0


@dataclass
class _Layer:
    attn_norm: torch.Tensor
    # absorbed: (H * (r + d) + r + d, dim), per head [q_lat_h ; q_rope_h], then [c_KV ; k_rope]
    # runtime absorption: (H * nope + r + H * d + d, dim), [q_nope (all heads) ; c_KV ; q_rope (all heads) ; k_rope]
    w_in: torch.Tensor
    kv_norm: torch.Tensor
    w_ov: torch.Tensor  # absorbed: (dim, H * r); runtime absorption: W_O (dim, H * v)
    ffn_norm: torch.Tensor
    moe: MoE | None
    w13: torch.Tensor  # dense: (2I, dim); MoE: (E [+1 shared], dim, 2I)
    w2: torch.Tensor  # dense: (dim, I); MoE: (E [+1 shared], I, dim)
    shared_apart: bool  # MoE whose shared experts are wider than one routed expert: run them on their own
    w_uk: torch.Tensor | None = None  # runtime absorption: (H, nope, r), scale-folded W_UK; None: absorbed
    w_uv: torch.Tensor | None = None  # runtime absorption: (H, r, v)
    # low-rank queries (q_lora_rank > 0): w_in is [W_DQ (q_lora) ; c_KV (r) ; k_rope (d)] on x, and the query
    # comes from the normalized c_Q by wq_b: absorbed (H * (r + d), q_lora) per head [q_lat_h ; q_rope_h];
    # runtime absorption (H * nope + H * d, q_lora) [q_nope (all heads) ; q_rope (all heads)], scale folded in
    q_norm: torch.Tensor | None = None
    wq_b: torch.Tensor | None = None


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """F.linear(x, w) for a 2-D (N, K) weight; for a 3-D one (T, N/T, K) (`_blocks`: batch 1 on T threads) each
    row block times x (1, K) in one bmm, whose (T, N/T, 1) result is the (1, N) row as it lies in memory; for a
    oneDNN-packed one (`_packed`) oneDNN's linear."""
    if w.is_mkldnn:  # `_packed`: oneDNN's prepacked float32 GEMM (batched steps)
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), w, None, "none", [], "")
    if w.dim() == 2:
        return F.linear(x, w)
    return torch.bmm(w, x.t().expand(w.size(0), x.size(-1), 1)).view(1, -1)


def _blocks(w: torch.Tensor, T: int) -> torch.Tensor:
    """An (N, K) weight as T contiguous row blocks (T, N/T, K) for `linear` (each thread streams its block's
    rows: 24-28 GB/s on two threads for DRAM-resident weights against 13-18 for the one-thread GEMV,
    bench/gemv_threads.py); where N is not a multiple of T, or T is 1, the one-thread layout `_kn`."""
    N, K = w.shape
    if T < 2 or N % T:
        return _kn(w)
    return w.reshape(T, N // T, K).contiguous()


def _expert_blocks(w: torch.Tensor, T: int) -> torch.Tensor:
    """Stacked experts (E, K, N) (x @ W[e]) for one-row groups: contiguous (E, K, N) on one thread (`moe_experts`);
    on T threads (E, T, N/T, K), each expert's `_blocks` (`_moe_one_row`; N not a multiple of T: one block)."""
    E, K, N = w.shape
    if T < 2:
        return w.contiguous()
    T = T if N % T == 0 else 1
    return w.transpose(1, 2).reshape(E, T, N // T, K).contiguous()


PACK_MIN_BYTES = 1 << 20  # batched steps: matrices at least this big go to oneDNN's packed layout (`_packed`)
PACK_ROWS = 64  # the row count oneDNN's packing is tuned for (any row count runs)


def _packed(w: torch.Tensor) -> torch.Tensor:
    """An (N, K) float32 weight in oneDNN's prepacked layout (`torch.ops.mkldnn._reorder_linear_weight`, what
    inductor's freezing uses for float32 linears), where it holds >= PACK_MIN_BYTES and oneDNN is available; else
    as it is. Products of 2-128 rows ran 1.4-2.1x the speed of MKL's `F.linear` on DRAM-resident weights here
    (docs/decode_profile.md, "Session 11"; end to end bench/batched_packed.py); the tiny preset's matrices (<= 128 KB) stay as they are and decode bit-identically."""
    if not _packs(w):
        return w
    return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), PACK_ROWS)


def _packs(w: torch.Tensor) -> bool:
    """Whether `_packed` packs w (one matrix, or one expert of a stack)."""
    return (w.numel() * w.element_size() >= PACK_MIN_BYTES and w.dtype == torch.float32 and w.device.type == "cpu"
            and torch.backends.mkldnn.is_available())


def _kn(w: torch.Tensor) -> torch.Tensor:
    """The same (N, K) matrix for one-row products: where N >= K, stored transposed (a (N, K) view of a
    contiguous (K, N) copy: MKL's x @ W GEMV, 1.1-1.8x the bandwidth of x @ W^T on those shapes here); wider
    than tall (N < K: the dense FFN's w2, an absorbed W_O) it is faster as it is (docs/decode_profile.md)."""
    return w.t().contiguous().t() if w.size(0) >= w.size(1) else w


NK_MIN_BYTES = 1 << 20  # experts at least this big are stored (E, N, K) for batched GEMMs (see `_nk`)


def _nk(w: torch.Tensor) -> torch.Tensor:
    """Stacked expert matrices (E, K, N) for batched decode: where one expert's matrix holds >= NK_MIN_BYTES, a view
    of contiguous (E, N, K) storage (nn.Linear's order; MKL's GEMM of an expert's 4-128 rows ran 1.06-1.22x
    faster on it at the 107M model's 3 MB experts, slower on 1-3 rows); smaller ones stay contiguous (E, K, N)
    (the tiny preset's 128 KB experts: the two orders within +-7%, and its decode stays bit-identical)."""
    if w[0].numel() * w.element_size() < NK_MIN_BYTES:
        return w.contiguous()
    return w.transpose(1, 2).contiguous().transpose(1, 2)


def _moe_one_row(h: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                 shared: bool, out: torch.Tensor) -> None:
    """out += sum_k w_k E_k(h) (+ the folded shared expert, the last of w13 / w2, weight 1) for one row h (1, dim),
    the experts in (E, T, N/T, K) blocks (`_expert_blocks`). The same pairs as `moe_experts`, added in its order (expert
    id, the shared expert last); each chosen expert's two products are one bmm each."""
    inter = w13.size(1) * w13.size(2) // 2
    pairs = sorted(zip(indices[0].tolist(), weights[0].unbind()))
    if shared:
        pairs.append((w13.size(0) - 1, None))
    for e, w in pairs:
        gu = linear(h, w13[e])
        act = F.silu(gu[:, :inter]).mul_(gu[:, inter:])
        if w is not None:
            act.mul_(w)
        out += linear(act, w2[e])


def _moe_packed(h: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, w13: list, w2: list, shared: bool,
                out: torch.Tensor) -> None:
    """out += sum_k w_k E_k(h) (+ the folded shared expert, the last of w13 / w2, weight 1) for h (N, dim), each
    expert's rows gathered and run through its packed matrices (`_packed`, one oneDNN linear each); experts
    without rows are skipped (their weights not read). The pairs as `moe_experts` sorts them (by expert id, stable),
    without its zero-weight pairs (a rounding device of `_grouped_mm` that oneDNN does not need)."""
    N, K = indices.shape
    token, tail_experts, tail_w, _, _ = decode_static._pair_ids(N, K, len(w13), shared, h, zero_pairs=False)
    expert, w = indices.flatten(), weights.flatten()
    if tail_experts is not None:  # the folded shared expert: every token, weight 1
        expert, w = torch.cat([expert, tail_experts]), torch.cat([w, tail_w])
    order = expert.argsort(stable=True)
    counts = torch.bincount(expert, minlength=len(w13)).tolist()
    token_of, w_of = token.index_select(0, order), w.index_select(0, order)
    rows = h.index_select(0, token_of)
    parts, start = [], 0
    for e, n in enumerate(counts):
        if n:
            gu = linear(rows[start:start + n], w13[e])
            inter = gu.size(-1) // 2
            act = F.silu(gu[:, :inter]).mul_(gu[:, inter:]).mul_(w_of[start:start + n].unsqueeze(-1))
            parts.append(linear(act, w2[e]))
            start += n
    out.index_add_(0, token_of, torch.cat(parts))


class LeanLayers(list):
    """The lean step's per-layer tensors (`build_layers`), plus their batch-1 variant built on first use: the
    dense linears' weights (attention projections, dense FFN, head) in the layout one-row products stream
    fastest (`_kn`), the stacked experts in (E, K, N) storage (MKL's x @ W GEMV per one-row group), while
    batches keep the layouts their GEMMs prefer. Costs one more copy of the weights, built only where a batch
    of one row runs."""

    def __init__(self, layers: list[_Layer], head: torch.Tensor):
        super().__init__(layers)
        self.head = head
        self._gemv: tuple[int, list[_Layer], torch.Tensor] | None = None
        self._packed: tuple[list[_Layer], torch.Tensor | None] | None = None

    def packed(self) -> tuple[list[_Layer], torch.Tensor | None]:
        """(layers, head weight or None) for batches of 2+ rows: the dense matrices of PACK_MIN_BYTES or more in
        oneDNN's packed layout (`_packed`), experts that big as a list of packed (N, K) matrices, one per expert
        (`_moe_packed`). Built once; None for the head keeps `model.logits`."""
        if self._packed is None:
            def experts(w):  # (E, K, N) views for x @ W[e] -> packed (N, K) per expert, or as they are
                return [_packed(w[e].t()) for e in range(w.size(0))] if _packs(w[0]) else w
            layers = [replace(lay, w_in=_packed(lay.w_in), w_ov=_packed(lay.w_ov),
                              wq_b=None if lay.wq_b is None else _packed(lay.wq_b),
                              **(dict(w13=experts(lay.w13), w2=experts(lay.w2)) if lay.moe is not None
                                 else dict(w13=_packed(lay.w13), w2=_packed(lay.w2))))
                      for lay in self]
            head = _packed(self.head)
            self._packed = (layers, head if head.is_mkldnn else None)
        return self._packed

    def gemv(self, threads: int = 1) -> tuple[list[_Layer], torch.Tensor]:
        """(layers, head weight) for batch 1 on `threads` threads: the same numbers, the dense matrices in (K, N)
        storage (one thread) or T row blocks (`_blocks`), the experts likewise (`_expert_blocks`). One copy
        is kept: a change of thread count rebuilds it."""
        if self._gemv is None or self._gemv[0] != threads:
            self._gemv = None  # free the old copy first
            dense = lambda w: _blocks(w, threads)  # noqa: E731
            layers = [replace(lay, w_in=dense(lay.w_in), w_ov=dense(lay.w_ov),
                              wq_b=None if lay.wq_b is None else dense(lay.wq_b),
                              **(dict(w13=_expert_blocks(lay.w13, threads), w2=_expert_blocks(lay.w2, threads))
                                 if lay.moe is not None else dict(w13=dense(lay.w13), w2=dense(lay.w2))))
                      for lay in self]
            self._gemv = (threads, layers, dense(self.head))
        return self._gemv[1], self._gemv[2]


def build_layers(model: Transformer, runtime_absorb: bool | None = None) -> LeanLayers:
    """The per-layer tensors of the lean step, from the fused inference weights of `prepare_inference`.
    runtime_absorb None: `absorb_at_runtime(cfg)`."""
    cfg = model.cfg
    H, r, d, nope, v = cfg.n_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.qk_nope_head_dim, cfg.v_head_dim
    runtime = absorb_at_runtime(cfg) if runtime_absorb is None else runtime_absorb
    out = []
    low_rank_q = cfg.q_lora_rank > 0
    for layer in model.layers:
        attn = layer.attn
        w_uk = w_uv = q_norm = wq_b = None
        if low_rank_q:
            w_in = torch.cat([attn.wq_a.weight, attn.wkv_a.weight]).contiguous()
            q_norm = attn.q_norm.weight
        if runtime:  # the softmax scale folds into the query rows (as fuse_absorbed does)
            wq = (attn.wq_b if low_rank_q else attn.wq).weight.view(H, nope + d, -1) * attn.softmax_scale
            q_nope, q_rope = wq[:, :nope].reshape(H * nope, -1), wq[:, nope:].reshape(H * d, -1)
            if low_rank_q:
                wq_b = torch.cat([q_nope, q_rope]).contiguous()
            else:
                wkv = attn.wkv_a.weight
                w_in = torch.cat([q_nope, wkv[:r], q_rope, wkv[r:]]).contiguous()
            w = attn.wkv_b.weight.view(H, nope + v, r)
            w_uk, w_uv = w[:, :nope].contiguous(), w[:, nope:].transpose(1, 2).contiguous()
            w_ov = attn.wo.weight
        elif low_rank_q:
            wq_b, w_ov = attn.fused  # wq_b rows per head [q_lat_h (r); q_rope_h (d)], scale folded in
        else:
            wq, w_ov = attn.fused  # wq rows: [q_lat (H*r); c_KV (r); q_rope (H*d); k_rope (d)]
            q_lat, c_kv, q_rope, k_rope = wq.split([H * r, r, H * d, d])
            per_head = torch.cat([q_lat.view(H, r, -1), q_rope.view(H, d, -1)], dim=1).flatten(0, 1)
            w_in = torch.cat([per_head, c_kv, k_rope]).contiguous()
        lat_kw = dict(w_uk=w_uk, w_uv=w_uv, q_norm=q_norm, wq_b=wq_b)
        ffn = layer.ffn
        if isinstance(ffn, MoE):
            w13, w2 = ffn.stacked
            sh = ffn.shared_experts
            shared_apart = sh is not None and sh.w2.weight.size(1) != w2.size(1)
            if sh is not None and not shared_apart:
                w13 = torch.cat([w13, sh.w13.t()[None]])
                w2 = torch.cat([w2, sh.w2.weight.t()[None]])
            # big experts stored (E, N, K) for batches (`_nk`); batch 1's one-row groups keep (K, N) (`LeanLayers.gemv`)
            out.append(_Layer(layer.attn_norm.weight, w_in, attn.kv_norm.weight, w_ov, layer.ffn_norm.weight, ffn,
                              _nk(w13), _nk(w2), shared_apart, **lat_kw))
        else:
            w13 = ffn.w13 if ffn.w13 is not None else torch.cat([ffn.w1.weight, ffn.w3.weight])
            out.append(_Layer(layer.attn_norm.weight, w_in, attn.kv_norm.weight, w_ov, layer.ffn_norm.weight, None,
                              w13, ffn.w2.weight, False, **lat_kw))
    return LeanLayers(out, model.head.weight)


class Workspace:
    """Cache memory reused across generate calls: a fresh 10-30 MB buffer per call pays a page fault on first touch
    of every 4 KiB page, which at RL batch sizes costs more than the copies into it. Grows to the largest batch
    and length seen (up to `max_bytes`; beyond it every call gets fresh memory)."""

    def __init__(self, max_bytes: int = 1 << 30):
        self.max_bytes = max_bytes
        self.buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    def capacity(self, L: int, C: int, dtype: torch.dtype, device) -> int:
        """The cache length the buffers already hold for this layout (0: none)."""
        buf = self.buffers
        if buf is None or buf[0].dtype != dtype or buf[0].device != device or buf[0].size(1) != L \
                or buf[0].size(3) != C:
            return 0
        return buf[0].size(2)

    def views(self, B: int, L: int, S: int, C: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, S, C) latent and (B, L, C, S) key views; contents undefined (every slot is written before it
        is read)."""
        buf = self.buffers
        if buf is None or buf[0].dtype != dtype or buf[0].device != device or buf[0].size(1) != L \
                or buf[0].size(3) != C or buf[0].size(0) < B or buf[0].size(2) < S:
            Bc, Sc = (B, S) if buf is None else (max(B, buf[0].size(0)), max(S, buf[0].size(2)))
            if 2 * Bc * L * Sc * C * torch.finfo(dtype).bits // 8 > self.max_bytes:
                return (torch.empty(B, L, S, C, dtype=dtype, device=device),
                        torch.empty(B, L, C, S, dtype=dtype, device=device))
            buf = self.buffers = (torch.empty(Bc, L, Sc, C, dtype=dtype, device=device),
                                  torch.empty(Bc, L, C, Sc, dtype=dtype, device=device))
        return buf[0][:B, :, :S], buf[1][:B, :, :, :S]


class _RowSlots:
    """Write target of a continuous-batching step: `[:, i] = new` (B, C) puts row b's entry of layer i at its own
    slot pos[b] of a (B, L, S, C) latent cache (keys False) or a (B, L, C, S) key cache (keys True)."""

    def __init__(self, cache: torch.Tensor, pos: torch.Tensor, keys: bool):
        self.cache, self.pos, self.keys = cache, pos, keys
        self.rows = torch.arange(pos.numel(), device=pos.device)

    def __setitem__(self, index: tuple, new: torch.Tensor) -> None:
        layer = index[1]
        if self.keys:
            self.cache[self.rows, layer, :, self.pos] = new
        else:
            self.cache[self.rows, layer, self.pos] = new


class LeanDecoder:
    """Decode state of one batch: both cache layouts, the key bias, the rope rotations; `step` runs one token."""

    def __init__(self, model: Transformer, layers: list[_Layer], prefill_cache: torch.Tensor, row_of: torch.Tensor | None,
                 length: int, key_valid: torch.Tensor | None, positions: torch.Tensor | None,
                 workspace: "Workspace | None" = None, compiled: str | None = None):
        """prefill_cache (L, U, P, latent) of the U distinct prompts; row_of (B,) the prompt of each row (None:
        one row per prompt); length: the cache length (prompt + new tokens); key_valid (B, length) bool and
        positions (B, length) long for ragged prompts (None: no padding, positions = slots); workspace: where the
        caches live (kept by the engine across calls; None: fresh memory); compiled: a torch.compile backend
        ("inductor") to run every step through engine/decode_static.py's compiled static-shape step (None: eager)."""
        cfg = model.cfg
        self.model, self.layers, self.cfg = model, layers, cfg
        self.eps = cfg.norm_eps
        if any(lay.w_uk is not None or lay.wq_b is not None for lay in layers):
            compiled = None  # the compiled step implements the precomputed absorbed layout (q_lora_rank 0) only
        self.compiled = compiled
        L, U, P, C = prefill_cache.shape
        lat = prefill_cache.transpose(0, 1).contiguous()  # (U, L, P, C): transposed per distinct prompt, not per row
        keys = lat.transpose(2, 3).contiguous()
        if row_of is not None:
            lat, keys = lat.index_select(0, row_of), keys.index_select(0, row_of)
        B = lat.size(0)
        ws = workspace if workspace is not None else Workspace()
        if compiled:  # fixed capacity: a multiple of CAPACITY_STEP, the workspace's full length (contiguous views)
            length = max(-(-length // CAPACITY_STEP) * CAPACITY_STEP, ws.capacity(L, C, lat.dtype, lat.device))
            if key_valid is not None:
                key_valid = F.pad(key_valid, (0, length - key_valid.size(1)), value=True)
                positions = F.pad(positions, (0, length - positions.size(1)))
        self.lat, self.keys = ws.views(B, L, length, C, lat.dtype, lat.device)  # keys: the transposed layout
        self.lat[:, :, :P] = lat
        self.keys[:, :, :, :P] = keys
        self.bias = None
        if key_valid is not None:
            self.bias = torch.zeros(B, 1, length, dtype=torch.float32, device=lat.device).masked_fill_(
                ~key_valid[:, None], float("-inf"))
        self.positions = positions
        self.rot = torch.complex(model.rope_cos, model.rope_sin)  # (max_seq_len, d/2): e^{i theta} per position
        self.static = None
        if compiled:
            self.lat[:, :, P:].zero_()  # masked slots are multiplied by 0: they must hold no NaN / inf
            self.keys[..., P:].zero_()
            self.static = decode_static.StaticState(
                [decode_static.StaticLayer(
                    lay.attn_norm, lay.w_in, lay.kv_norm, lay.w_ov, lay.ffn_norm, lay.moe, lay.w13, lay.w2,
                    lay.moe is not None and lay.moe.shared_experts is not None and not lay.shared_apart,
                    lay.shared_apart, lay.moe.shared_experts.w13 if lay.shared_apart else None,
                    lay.moe.shared_experts.w2.weight if lay.shared_apart else None) for lay in layers],
                model.embed.weight, model.norm.weight, model.head.weight, model.rope_cos, model.rope_sin,
                self.lat, self.keys, self.bias, self.positions, cfg.n_heads, cfg.kv_lora_rank, self.eps)

    def compact(self, sel: torch.Tensor, filled: int) -> None:
        """Keep only rows `sel` (long, increasing) of the batch; cache slots [0, filled) hold data. In place: the
        kept rows' filled slots move to the front of the same buffers."""
        n = sel.numel()
        self.lat[:n, :, :filled] = self.lat[:, :, :filled].index_select(0, sel)
        self.keys[:n, :, :, :filled] = self.keys[:, :, :, :filled].index_select(0, sel)
        self.lat, self.keys = self.lat[:n], self.keys[:n]
        if self.bias is not None:
            self.bias = self.bias.index_select(0, sel)
        if self.positions is not None:
            self.positions = self.positions.index_select(0, sel)
        if self.static is not None:
            st = self.static
            st.lat, st.keys, st.key_bias, st.positions = self.lat, self.keys, self.bias, self.positions

    def load_rows(self, first: int, cache: torch.Tensor) -> None:
        """Put the prefilled latents cache (L, k, P, C) of k new rows into rows [first, first + k), slots [0, P)
        (continuous batching: a request joins the running batch)."""
        L, k, P, C = cache.shape
        lat = cache.transpose(0, 1)
        self.lat[first:first + k, :, :P] = lat
        self.keys[first:first + k, :, :, :P] = lat.transpose(2, 3)

    def move_row(self, src: int, dst: int, filled: int) -> None:
        """Copy row src's slots [0, filled) over row dst (continuous batching: a finished row's hole is filled by
        the last row)."""
        self.lat[dst, :, :filled] = self.lat[src, :, :filled]
        self.keys[dst, :, :, :filled] = self.keys[src, :, :, :filled]

    def _moe(self, lay: _Layer, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """x + MoE(h) for h (N, dim), added into x in place (engine/decode_static.py's `moe_experts`)."""
        moe = lay.moe
        weights, indices, _ = moe.gate(h)
        shared = moe.shared_experts is not None and not lay.shared_apart
        if isinstance(lay.w13, list):  # batches: experts packed one by one (`LeanLayers.packed`)
            _moe_packed(h, weights, indices, lay.w13, lay.w2, shared, x)
        elif lay.w13.dim() == 4:  # batch 1 on T threads: experts in row blocks (`_expert_blocks`)
            _moe_one_row(h, weights, indices, lay.w13, lay.w2, shared, x)
        else:
            decode_static.moe_experts(h, weights, indices, lay.w13, lay.w2, shared, out=x)
        if lay.shared_apart:
            x += moe.shared_experts(h)
        return x

    def _low_rank_query(self, lay: _Layer, h: torch.Tensor, rot, lat_new, key_new, i: int) -> torch.Tensor:
        """q_lora_rank > 0: the new latent [c_KV ; k_rope] of layer i written into both caches, and the query's
        projection out of the normalized c_Q (W_UQ, or its absorbed product): (B, wq_b rows)."""
        r, ql = self.cfg.kv_lora_rank, self.cfg.q_lora_rank
        B = h.size(0)
        out = linear(h, lay.w_in)  # [c_Q (ql) ; c_KV (r) ; k_rope (d)]
        k_rope = out[:, ql + r:]
        torch.view_as_complex(k_rope.view(B, 1, -1, 2)).mul_(rot)
        new = torch.cat([F.rms_norm(out[:, ql:ql + r], (r,), lay.kv_norm, self.eps), k_rope], -1)
        lat_new[:, i] = new
        key_new[:, i] = new
        return linear(F.rms_norm(out[:, :ql], (ql,), lay.q_norm, self.eps), lay.wq_b)

    def _attn_runtime(self, lay: _Layer, h: torch.Tensor, i: int, rot, bias, lat_new, key_new, keys_all,
                      values_all) -> torch.Tensor:
        """The attention output of layer i with W_UK / W_UV applied per token (`absorb_at_runtime`): the same
        latent-cache attention, the query mapped into the latent space by a per-head bmm instead of a
        precomputed product, and the latent output mapped back likewise."""
        cfg = self.cfg
        H, r, d, nope = cfg.n_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.qk_nope_head_dim
        B = h.size(0)
        if lay.wq_b is not None:
            q_nope, q_rope = self._low_rank_query(lay, h, rot, lat_new, key_new, i).split([H * nope, H * d], -1)
            torch.view_as_complex(q_rope.view(B, H, d // 2, 2)).mul_(rot)
        else:
            out = linear(h, lay.w_in)  # [q_nope (H*nope) ; c_KV (r) ; q_rope (H*d) ; k_rope (d)]
            rope = out[:, H * nope + r:]
            torch.view_as_complex(rope.view(B, H + 1, d // 2, 2)).mul_(rot)  # rope of q and k at once
            new = torch.cat([F.rms_norm(out[:, H * nope:H * nope + r], (r,), lay.kv_norm, self.eps),
                             rope[:, H * d:]], -1)
            lat_new[:, i] = new
            key_new[:, i] = new
            q_nope, q_rope = out[:, :H * nope], rope[:, :H * d]
        q_lat = torch.bmm(q_nope.view(B, H, nope).transpose(0, 1), lay.w_uk)  # (H, B, r)
        q = torch.cat([q_lat.transpose(0, 1), q_rope.view(B, H, d)], dim=-1)  # (B, H, r + d)
        keys = keys_all[:, i]
        scores = torch.bmm(q, keys) if bias is None else torch.baddbmm(bias, q, keys)
        o = torch.bmm(scores.softmax(dim=-1), values_all[:, i])  # (B, H, r)
        o = torch.bmm(o.transpose(0, 1), lay.w_uv)  # (H, B, v)
        return linear(o.transpose(0, 1).reshape(B, -1), lay.w_ov)

    def step(self, tok: torch.Tensor, s: int, pos: torch.Tensor | None = None) -> torch.Tensor:
        """tok (B,) long: the token at cache slot s of every row -> next-token logits (B, vocab), float32.
        pos (B,) long, for continuous batching (engine/batcher.py: rows of different lengths, no padding): row
        b's token sits at its own slot and rope position pos[b] and attends to its slots [0, pos[b]]; s must be
        max(pos); the caches' first B rows are used."""
        if pos is not None:
            return self._step_rows(tok, s, pos)
        if self.static is not None:
            logits, entries = decode_static.compiled_step(self.compiled)(self.static, tok,
                                                                         torch.tensor(s, device=tok.device))
            self.lat[:, :, s] = entries
            self.keys[:, :, :, s] = entries
            return logits
        rot = (self.rot[s] if self.positions is None else self.rot.index_select(0, self.positions[:, s]).unsqueeze(1))
        bias = None if self.bias is None else self.bias[:, :, :s + 1]
        # this step's views: new entries at slot s, keys and values over slots [0, s]
        return self._run(tok, rot, bias, self.lat[:, :, s], self.keys[:, :, :, s], self.keys[..., :s + 1],
                         self.lat[:, :, :s + 1, :self.cfg.kv_lora_rank])

    def _step_rows(self, tok: torch.Tensor, s: int, pos: torch.Tensor) -> torch.Tensor:
        """`step` with a slot per row (continuous batching): per-row cache writes, rope positions and key bias."""
        B = tok.size(0)
        lat, keys = self.lat[:B], self.keys[:B]
        rot = self.rot.index_select(0, pos).unsqueeze(1)
        bias = torch.zeros(B, 1, s + 1, device=tok.device).masked_fill_(
            torch.arange(s + 1, device=tok.device) > pos[:, None, None], float("-inf"))
        return self._run(tok, rot, bias, _RowSlots(lat, pos, False), _RowSlots(keys, pos, True), keys[..., :s + 1],
                         lat[:, :, :s + 1, :self.cfg.kv_lora_rank])

    def _run(self, tok, rot, bias, lat_new, key_new, keys_all, values_all) -> torch.Tensor:
        """The eager step: rope rotations `rot`, key bias `bias` (or None), `lat_new[:, i] = entry` / `key_new[:, i]
        = entry` write layer i's new cache entry, keys_all / values_all span the attended slots."""
        model, cfg, eps = self.model, self.cfg, self.eps
        H, r, d = cfg.n_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
        C = r + d
        B = tok.size(0)
        x = model.embed(tok)  # (B, dim)
        layers, head = self.layers, None
        if B == 1 and isinstance(layers, LeanLayers):  # one row: the GEMV-friendly weight layout
            layers, head = layers.gemv(torch.get_num_threads())
        elif isinstance(layers, LeanLayers):  # batches: big matrices in oneDNN's packed layout
            layers, head = layers.packed()
        for i, lay in enumerate(layers):
            h = F.rms_norm(x, (x.size(-1),), lay.attn_norm, eps)
            if lay.w_uk is not None:
                x = x + self._attn_runtime(lay, h, i, rot, bias, lat_new, key_new, keys_all, values_all)
            else:
                if lay.wq_b is not None:  # low-rank q: the new latent written, then q (B, H, C)
                    q = self._low_rank_query(lay, h, rot, lat_new, key_new, i).view(B, H, C)
                    torch.view_as_complex(q[..., r:].unflatten(-1, (-1, 2))).mul_(rot)
                else:
                    qkv = linear(h, lay.w_in).view(B, H + 1, C)
                    torch.view_as_complex(qkv[..., r:].unflatten(-1, (-1, 2))).mul_(rot)  # rope of q and k at once
                    new = qkv[:, H]
                    new[:, :r] = F.rms_norm(new[:, :r], (r,), lay.kv_norm, eps)
                    lat_new[:, i] = new
                    key_new[:, i] = new
                    q = qkv[:, :H]  # (B, H, C), already scaled by the softmax scale (fuse_absorbed)
                keys = keys_all[:, i]
                scores = torch.bmm(q, keys) if bias is None else torch.baddbmm(bias, q, keys)
                probs = scores.softmax(dim=-1)
                o = torch.bmm(probs, values_all[:, i])  # (B, H, r)
                x = x + linear(o.view(B, H * r), lay.w_ov)
            h = F.rms_norm(x, (x.size(-1),), lay.ffn_norm, eps)
            if lay.moe is None:
                gate, up = linear(h, lay.w13).chunk(2, dim=-1)
                x = x + linear(F.silu(gate) * up, lay.w2)
            else:
                x = self._moe(lay, x, h)
        if head is None:
            return model.logits(x)
        return linear(F.rms_norm(x, (x.size(-1),), model.norm.weight, eps), head)
