"""Multi-head Latent Attention (DeepSeek-V2 sec. 2.1, V3 report sec. 2.1.1, SPEC 1.1).

Keys and values are compressed into a latent c_KV (kv_lora_rank numbers, RMS-normalized) plus one
rope key k_rope shared by all heads; that pair is all a cache holds. Two equivalent attention paths:

* naive: up-project c_KV into per-head k_nope and v, attend with k = [k_nope ; k_rope];
* absorbed: fold W_UK into the query and W_UV into the output so attention runs directly on the
  latent cache (what decode uses: no per-head keys are ever materialized).

With sparse attention (ModelConfig.index_topk > 0, DeepSeek-V3.2-Exp sec. 2.1) a lightning indexer
(model/indexer.py) picks each query's top-k visible keys and both paths attend only to those: the selection
becomes a boolean mask ANDed into the causal / padding one (training and prefill: no compute saved), except in
the fused decode of one query per row, which gathers the top-k cache rows and attends over those only
(`_decode_gathered`). The indexer's key is cached after [c_KV ; k_rope] in the same cache row. When a query sees at most index_topk keys nothing is dropped and
the dense code path runs unchanged.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.fp8 import Linear
from nanoseek.model.indexer import Indexer
from nanoseek.model.rope import RMSNorm, apply_rope


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.q_lora_rank = cfg.q_lora_rank
        self.kv_lora_rank = cfg.kv_lora_rank
        self.qk_nope_head_dim = cfg.qk_nope_head_dim
        self.qk_rope_head_dim = cfg.qk_rope_head_dim
        self.v_head_dim = cfg.v_head_dim
        self.softmax_scale = cfg.softmax_scale
        qk_head_dim = cfg.qk_head_dim
        if self.q_lora_rank > 0:
            self.wq_a = Linear(cfg.dim, self.q_lora_rank, cfg.fp8)
            self.q_norm = RMSNorm(self.q_lora_rank, cfg.norm_eps)
            self.wq_b = Linear(self.q_lora_rank, self.n_heads * qk_head_dim, cfg.fp8)
        else:
            self.wq = Linear(cfg.dim, self.n_heads * qk_head_dim, cfg.fp8)
        self.wkv_a = Linear(cfg.dim, self.kv_lora_rank + self.qk_rope_head_dim, cfg.fp8)
        self.kv_norm = RMSNorm(self.kv_lora_rank, cfg.norm_eps)
        self.wkv_b = Linear(self.kv_lora_rank, self.n_heads * (self.qk_nope_head_dim + self.v_head_dim), cfg.fp8)
        self.wo = Linear(self.n_heads * self.v_head_dim, cfg.dim, cfg.fp8)
        self.fp8 = cfg.fp8
        self.indexer = Indexer(cfg) if cfg.sparse_attention else None
        # indexer training (V3.2 sec. 2.1.1, Transformer.set_indexer_training): None, "warmup" (main attention
        # dense, KL over all visible keys) or "sparse" (KL over the selected keys); the loss of the last
        # training forward is left in indexer_loss
        self.indexer_train: str | None = None
        self.indexer_loss: torch.Tensor | None = None
        self.fused: tuple[torch.Tensor, torch.Tensor] | None = None  # inference-only absorbed weights
        # QK-clip (nanoseek.train.optim): while track_logits, training forwards keep each head's max pre-softmax
        # logit (H,) in max_logit, a running max until the trainer reads and resets it after the step
        self.track_logits = False
        self.max_logit: torch.Tensor | None = None

    @torch.no_grad()
    def fuse_absorbed(self, enable: bool = True) -> None:
        """Precompute the absorbed projections for decode (DeepSeek-V2 sec. 2.1.2: W_UK folds into W_Q, W_UV
        into W_O), with the softmax scale folded into the query:
            q_h = scale * [W_UK_h^T W_Q_nope_h ; W_Q_rope_h] x      (r + d_rope rows per head)
            out = sum_h (W_O_h W_UV_h) o_lat_h                     (one (dim, H*r) matrix)
        so a decode step is two plain linears around the latent attention instead of four matmuls and
        three layout copies. Valid while the weights do not change: the engine enables it for the duration
        of a generate call. Skipped under simulated FP8, whose quantization is defined per original weight."""
        if not enable or self.fp8:
            self.fused = None
            return
        H, nope, rope, r = self.n_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.kv_lora_rank
        wq = (self.wq if self.q_lora_rank == 0 else self.wq_b).weight.float()
        wq = wq.view(H, nope + rope, -1)
        w = self.wkv_b.weight.float().view(H, nope + self.v_head_dim, r)
        w_uk, w_uv = w[:, :nope], w[:, nope:]
        q_lat = torch.bmm(w_uk.transpose(1, 2), wq[:, :nope])  # (H, r, in)
        wq_fused = torch.cat([q_lat, wq[:, nope:]], dim=1).reshape(H * (r + rope), -1) * self.softmax_scale
        wo = self.wo.weight.float().view(-1, H, self.v_head_dim).transpose(0, 1)  # (H, dim, v)
        w_ov = torch.bmm(wo, w_uv).transpose(0, 1).reshape(wo.size(1), H * r)  # (dim, H*r)
        dtype = self.wkv_b.weight.dtype
        if self.q_lora_rank == 0:
            # one input projection for q and the latent, rows ordered [q_lat (H*r); c_KV; q_rope (H*d); k_rope]
            # so that every rope part is one contiguous block: one rotation per decode step instead of two
            per_head = wq_fused.view(H, r + rope, -1)
            wkv = self.wkv_a.weight.float()
            wq_fused = torch.cat([per_head[:, :r].reshape(H * r, -1), wkv[:r],
                                  per_head[:, r:].reshape(H * rope, -1), wkv[r:]])
        self.fused = (wq_fused.to(dtype).contiguous(), w_ov.to(dtype).contiguous())

    def latent(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """[c_KV ; k_rope] for x: (B, T, kv_lora_rank + qk_rope_head_dim), what the cache stores; with sparse
        attention followed by the indexer's key (index_head_dim more numbers)."""
        kv, k_pe = self.wkv_a(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        parts = [self.kv_norm(kv), apply_rope(k_pe, cos, sin)]
        if self.indexer is not None:  # for the selection only (no autograd: indexer_kl recomputes them)
            with torch.no_grad():
                parts.append(self.indexer.keys(x, cos, sin).to(parts[0].dtype))
        return torch.cat(parts, dim=-1)

    def _sparse_mask(self, x: torch.Tensor, q_lat: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     lat: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
        """The attention mask restricted to the indexer's top-k keys (B, 1, T, S), or None when no query can
        lose a key (S <= index_topk: the dense path, unchanged). mask None = causal over the last T of S keys."""
        T, S = x.size(1), lat.size(1)
        if S <= self.indexer.topk:
            return None
        if mask is None:
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)[None, None]
        m = self.kv_lora_rank + self.qk_rope_head_dim
        with torch.no_grad():
            scores = self.indexer.scores(x, q_lat, cos, sin, lat[..., m:])
            return self.indexer.select(scores, mask)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None,
                cache: torch.Tensor | None = None, start: int = 0, absorb: bool = False,
                write_pos: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, dim). cos/sin: rope tables for x's positions. mask: bool (B, 1, T, S), True = attend;
        None means causal over x alone. cache: (B, S_max, latent) buffer of this layer, written at
        [start, start + T); attention then runs over cache[:, :start + T].
        write_pos (B,) long, optional: row b writes its latents at [write_pos[b], write_pos[b] + T) instead of
        the shared `start` (continuous batching, where rows have different lengths); attention still spans
        cache[:, :start + T], so pass start >= max(write_pos) and a mask hiding each row's unused keys."""
        B, T, _ = x.shape
        if self.fp8:  # absorbed weights (W_UK into the query) have no per-weight FP8 quantization: stay naive
            absorb = False
        if absorb and self.fused is not None and not torch.is_grad_enabled():
            return self._decode_fused(x, cos, sin, mask, cache, start, write_pos)
        q_lat = None if self.q_lora_rank == 0 else self.q_norm(self.wq_a(x))
        q = self.wq(x) if q_lat is None else self.wq_b(q_lat)
        q_nope, q_pe = q.view(B, T, self.n_heads, -1).split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        q_pe = apply_rope(q_pe, cos, sin)
        lat = self._cached_latent(self.latent(x, cos, sin), cache, start, write_pos, x.dtype)
        # causal over x itself (for T == 1 without a prefix this is the same as no mask); a plain bool, never a
        # condition on T, so that it stays a Python bool when T is symbolic under torch.compile
        causal = mask is None and not (cache is not None and start > 0)
        if mask is None and cache is not None and start > 0 and T > 1:  # causal over a prefix-filled cache
            S = start + T
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(start)[None, None]
            causal = False
        if (self.indexer is not None and not torch.is_grad_enabled() and self.indexer_train != "warmup"
                and lat.size(1) > self.indexer.topk):  # inference with keys to drop: sparse prefill (gathered)
            return self._prefill_gathered(x, q_lat, q_nope, q_pe, cos, sin, lat, mask)
        if self.indexer is not None:
            visible = mask
            sparse = None if self.indexer_train == "warmup" else self._sparse_mask(x, q_lat, cos, sin, lat, mask)
            if sparse is not None:
                mask, causal = sparse, False
            lat = lat[..., :self.kv_lora_rank + self.qk_rope_head_dim]
            if self.indexer_train is not None and torch.is_grad_enabled() and cache is None:
                self.indexer_loss = self.indexer_kl(x, q_lat, cos, sin, q_nope, q_pe, lat,
                                                    sparse if sparse is not None else visible)
        kv, k_pe = lat.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        w = self.wkv_b.weight.view(self.n_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        if absorb:
            # One latent key/value shared by all heads: fold heads into the query rows (MQA-style bmm).
            w_uk, w_uv = w[:, :self.qk_nope_head_dim], w[:, self.qk_nope_head_dim:]
            H = self.n_heads
            q_lat = torch.bmm(q_nope.reshape(B * T, H, -1).transpose(0, 1), w_uk)  # (H, B*T, r)
            q_full = torch.cat([q_lat.transpose(0, 1).reshape(B, T, H, -1), q_pe], dim=-1).reshape(B, T * H, -1)
            scores = torch.bmm(q_full, lat.transpose(1, 2)) * self.softmax_scale  # (B, T*H, S)
            if scores.dtype != torch.float32:
                scores = scores.float()
            S = lat.size(1)
            if causal:
                mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)[None, None]
            if mask is not None:
                scores = _mask_heads_folded(scores, mask, T, H)
            probs = scores.softmax(dim=-1)
            if probs.dtype != kv.dtype:
                probs = probs.to(kv.dtype)
            o_lat = torch.bmm(probs, kv).view(B * T, H, -1).transpose(0, 1)  # (H, B*T, r)
            o = torch.bmm(o_lat, w_uv.transpose(1, 2)).transpose(0, 1).reshape(B, T, H, -1)
        else:
            kv_up = self.wkv_b(kv).view(B, -1, self.n_heads, self.qk_nope_head_dim + self.v_head_dim)
            k_nope, v = kv_up.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
            k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(-1, -1, self.n_heads, -1)], dim=-1)
            qh = torch.cat([q_nope, q_pe], dim=-1)
            if self.track_logits and self.training:
                self._record_max_logit(qh, k, mask, causal)
            pad = qh.size(-1) - self.v_head_dim
            if pad > 0:  # equal q/k/v head dims let PyTorch pick its fused (flash) CPU kernel: ~1.6x faster
                v = F.pad(v, (0, pad))
            o = F.scaled_dot_product_attention(qh.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               attn_mask=mask, is_causal=causal, scale=self.softmax_scale)
            o = o.transpose(1, 2)[..., :self.v_head_dim]
        return self.wo(o.reshape(B, T, -1))

    @torch.no_grad()
    def _record_max_logit(self, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> None:
        """Fold this forward's per-head max logit (scaled q.k over visible keys) into self.max_logit. q (B, T, H, D),
        k (B, S, H, D); mask / causal as the attention call gets them."""
        scores = torch.matmul(q.transpose(1, 2).float(), k.permute(0, 2, 3, 1).float()) * self.softmax_scale
        T, S = scores.shape[-2:]
        if causal:
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)[None, None]
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        m = scores.amax(dim=(0, 2, 3))
        self.max_logit = m if self.max_logit is None else torch.maximum(self.max_logit, m)

    def indexer_kl(self, x: torch.Tensor, q_lat: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   q_nope: torch.Tensor, q_pe: torch.Tensor, lat: torch.Tensor,
                   support: torch.Tensor | None) -> torch.Tensor:
        """The indexer's training loss (V3.2 report sec. 2.1.1): mean over queries t of
        KL(p_t || softmax(I_t)), where p_t is the main attention distribution summed over heads and L1-normalized
        (= the heads' mean) and both distributions live on `support` (bool (B or 1, 1, T, S), None = causal): all
        visible keys in the dense warm-up, the selected set in the sparse stage. p_t carries no gradient and the
        indexer's input is detached, so this loss trains the indexer only (DeepSeek sums over t; nanoseek averages,
        which only rescales the learning rate). lat: this call's [c_KV ; k_rope] (no cache)."""
        T, S = x.size(1), lat.size(1)
        if support is None:
            support = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)[None, None]
        with torch.no_grad():
            p = self.attention_probs(q_nope, q_pe, lat, support).mean(dim=1)  # (B, T, S)
        xd = x.detach()
        scores = self.indexer.scores(xd, q_lat.detach(), cos, sin, self.indexer.keys(xd, cos, sin))
        log_q = scores.masked_fill(~support[:, 0], float("-inf")).log_softmax(dim=-1)
        kl = torch.where(p > 0, p * (p.clamp_min(1e-30).log() - log_q), p.new_zeros(()))
        return kl.sum(dim=-1).mean()

    def attention_probs(self, q_nope: torch.Tensor, q_pe: torch.Tensor, lat: torch.Tensor,
                        support: torch.Tensor) -> torch.Tensor:
        """Per-head attention probabilities (B, H, T, S) of the naive formula over keys where support is True."""
        kv, k_pe = lat.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        k_nope = self.wkv_b(kv).view(*kv.shape[:2], self.n_heads, -1)[..., :self.qk_nope_head_dim]
        scores = (torch.einsum("bthd,bshd->bhts", q_nope, k_nope)
                  + torch.einsum("bthd,bsd->bhts", q_pe, k_pe)) * self.softmax_scale
        return scores.float().masked_fill(~support, float("-inf")).softmax(dim=-1)

    @staticmethod
    def _cached_latent(lat: torch.Tensor, cache: torch.Tensor | None, start: int, write_pos: torch.Tensor | None,
                       dtype: torch.dtype) -> torch.Tensor:
        """Write the new latents into the cache (at `start`, or per row at `write_pos`) and return the
        latents attention spans: cache[:, :start + T] (or just `lat` without a cache)."""
        if cache is None:
            return lat
        B, T = lat.shape[:2]
        if write_pos is None:
            cache[:B, start:start + T] = lat  # the copy casts to the cache dtype
        else:
            rows = torch.arange(B, device=lat.device)[:, None]
            cache[rows, write_pos[:, None] + torch.arange(T, device=lat.device)] = lat
        out = cache[:B, :start + T]
        return out if out.dtype == dtype else out.to(dtype)

    def _decode_fused(self, x, cos, sin, mask, cache, start, write_pos) -> torch.Tensor:
        """The absorbed path with the precomputed weights of `fuse_absorbed` (same result, fewer kernels)."""
        B, T, _ = x.shape
        H, r = self.n_heads, self.kv_lora_rank
        wq_fused, w_ov = self.fused
        rope = self.qk_rope_head_dim
        if self.q_lora_rank == 0:  # q and the new latent from one matmul, one rotation (see fuse_absorbed)
            q_lat, kv, pe = F.linear(x, wq_fused).split([H * r, r, (H + 1) * rope], dim=-1)
            pe = apply_rope(pe.view(B, T, H + 1, rope), cos, sin)
            new_lat = torch.cat([self.kv_norm(kv), pe[:, :, H]], dim=-1)
            q = torch.cat([q_lat.view(B, T, H, r), pe[:, :, :H]], dim=-1)
        else:
            q_lat = self.q_norm(self.wq_a(x))
            q = F.linear(q_lat, wq_fused).view(B, T, H, r + rope)
            q[..., r:] = apply_rope(q[..., r:], cos, sin)
            new_lat = self.latent(x, cos, sin)
        lat = self._cached_latent(new_lat, cache, start, write_pos, x.dtype)
        S = lat.size(1)
        if self.indexer is not None:
            if S > self.indexer.topk:  # keys to drop: attend over a gather of each query's top-k latents
                return self._decode_gathered(x, q_lat, q, cos, sin, lat, mask)
            mask = self._sparse_mask(x, q_lat, cos, sin, lat, mask) if S > self.indexer.topk else mask
            lat = lat[..., :r + rope]
        # the keys transposed into a contiguous copy: CPU bmm over many tiny matrices is ~7x slower on the
        # strided view of the cache than on contiguous ones (the copy costs less than the difference)
        scores = torch.bmm(q.view(B, T * H, -1), lat.transpose(1, 2).contiguous())  # (B, T*H, S), already scaled
        if scores.dtype != torch.float32:
            scores = scores.float()
        if mask is not None:
            scores = _mask_heads_folded(scores, mask, T, H)
        elif T > 1:  # causal among the T new tokens (all earlier cache entries are visible)
            scores.view(B, T, H, S)[..., S - T:] += _future_bias(T, x.device)
        probs = scores.softmax(dim=-1)
        if probs.dtype != lat.dtype:
            probs = probs.to(lat.dtype)
        o_lat = torch.bmm(probs, lat[..., :r])  # (B, T*H, r)
        return F.linear(o_lat.view(B, T, H * r), w_ov)


    gather_chunk = 256  # queries per step of `_attend_gathered`

    def _attend_gathered(self, x, q_lat, q, cos, sin, lat, mask) -> torch.Tensor:
        """Sparse attention of T queries in MLA's absorbed (MQA) form over a gather of each query's top-k
        cache rows (DeepSeek-V3.2: DSA runs in MLA's MQA mode): the same keys as the mask formulation, so the
        same result up to float summation order, but O(T k) attention after the O(T S) index scores. q: (B, T, H,
        r + rope) absorbed queries, already scaled; lat: (B, S, r + rope + index_head_dim); mask (B or 1, 1, T,
        S) or None = causal over the last T of S keys (any mask must hide keys after a query's own position, as
        causal and padding masks do). Queries are taken `gather_chunk` at a time, so the index scores
        and the gathered rows stay O(chunk S) and O(chunk k) in memory. Returns o_lat (B, T, H, r)."""
        B, T, H, _ = q.shape
        r, m, S = self.kv_lora_rank, self.kv_lora_rank + self.qk_rope_head_dim, lat.size(1)
        out = q.new_empty(B, T, H, r)
        for c0 in range(0, T, self.gather_chunk):
            c = slice(c0, min(T, c0 + self.gather_chunk))
            lim = S - T + c.stop  # causal: no query of the chunk sees a key past its last query's position
            with torch.no_grad():
                scores = self.indexer.scores(x[:, c], q_lat[:, c], cos[:, c], sin[:, c], lat[:, :lim, m:])
                if mask is not None:
                    scores = scores.masked_fill(~mask[:, 0, c, :lim], float("-inf"))  # (B, C, lim)
                elif c.stop - c.start > 1:  # causal, built per chunk (a (T, S) mask is 256 MB at 16K)
                    pos = torch.arange(S - T + c.start, lim, device=x.device)[:, None]
                    scores = scores.masked_fill(torch.arange(lim, device=x.device) > pos, float("-inf"))
                top, idx = scores.topk(min(self.indexer.topk, lim), dim=-1)  # (B, C, k)
            # index_select on the strided [c_KV ; k_rope] columns: faster than lat[rows, idx] or whole rows on a
            # CPU, and no copy of the cache
            picks = [lat[b, :, :m].index_select(0, idx[b].reshape(-1)) for b in range(B)]
            sel = (picks[0][None] if B == 1 else torch.stack(picks)).view(*idx.shape, m)  # (B, C, k, r + rope)
            att = torch.matmul(q[:, c], sel.transpose(-1, -2))  # (B, C, H, k)
            if att.dtype != torch.float32:
                att = att.float()
            att = att.masked_fill(top.isneginf()[:, :, None], float("-inf"))  # < k visible keys: drop padding picks
            probs = att.softmax(dim=-1)
            if mask is not None:  # a query that sees nothing (padding) gets zeros, not NaN
                probs = probs.nan_to_num_(0.0)
            out[:, c] = torch.matmul(probs.to(sel.dtype), sel[..., :r])
        return out

    def _prefill_gathered(self, x, q_lat, q_nope, q_pe, cos, sin, lat, mask) -> torch.Tensor:
        """The unfused path's sparse attention at inference: queries absorbed into the latent space (W_UK),
        `_attend_gathered`, values out through W_UV and wo."""
        B, T, H, _ = q_nope.shape
        w = self.wkv_b.weight.view(H, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        q_abs = torch.einsum("bthd,hdr->bthr", q_nope, w[:, :self.qk_nope_head_dim])
        q = torch.cat([q_abs, q_pe], dim=-1) * self.softmax_scale
        o_lat = self._attend_gathered(x, q_lat, q, cos, sin, lat, mask)
        o = torch.einsum("bthr,hvr->bthv", o_lat, w[:, self.qk_nope_head_dim:])
        return self.wo(o.reshape(B, T, -1))

    def _decode_gathered(self, x, q_lat, q, cos, sin, lat, mask) -> torch.Tensor:
        """The fused path's sparse attention (any number of queries): `_attend_gathered`, then the fused output
        projection."""
        B, T, H, _ = q.shape
        o_lat = self._attend_gathered(x, q_lat, q, cos, sin, lat, mask)
        return F.linear(o_lat.reshape(B, T, H * self.kv_lora_rank), self.fused[1])


@functools.cache
def _future_bias(T: int, device: torch.device) -> torch.Tensor:
    """(T, 1, T) additive bias hiding later new tokens from earlier ones; built once per T (a speculative
    verify step would otherwise rebuild it in every layer)."""
    return torch.full((T, T), float("-inf"), device=device).triu(1).view(T, 1, T)


def _mask_heads_folded(scores: torch.Tensor, mask: torch.Tensor, T: int, H: int) -> torch.Tensor:
    """scores (B, T*H, S) with heads folded into the query rows; mask bool (B or 1, 1, T, S), True = attend."""
    B, _, S = scores.shape
    if T == 1:  # decode: one key mask per row, broadcast over heads
        m = mask.reshape(mask.size(0), 1, S)
    else:
        m = mask.expand(B, 1, T, S).transpose(1, 2).expand(B, T, H, S).reshape(B, T * H, S)
    return scores.masked_fill(~m, float("-inf"))
