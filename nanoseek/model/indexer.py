"""DeepSeek Sparse Attention's lightning indexer (DeepSeek-V3.2-Exp report sec. 2.1), as transformers'
`DeepseekV32Indexer` computes it.

For query t and earlier token s the indexer scores

    I[t, s] = sum_j w[t, j] * ReLU(q[t, j] . k[s]) * d^-1/2 * n^-1/2        (j over n = index_n_heads heads)

with q[t, j] = (W_qb c_Q[t])_j from MLA's normalized query latent c_Q (so it needs q_lora_rank > 0), one key
per token shared by all heads k[s] = LayerNorm(W_k x[s]) (d = index_head_dim), per-head weights
w[t] = W_w x[t], and RoPE on the first qk_rope_head_dim numbers of q and k in the half-split layout (x_i pairs
with x_{i + d_rope/2}; MLA itself uses the interleaved one). Each query then attends (MLA) only to the
`index_topk` visible tokens of highest I (all of them when fewer are visible).

What the cache holds per token and layer is k[s] (index_head_dim numbers), after MLA's [c_KV ; k_rope].

Simplifications, all shared with the transformers reference: DeepSeek's kernels rotate q and k by a Hadamard
matrix and score in FP8; the rotation is orthogonal (H q . H k = q . k) so it is left out, and scoring runs in
float32. The indexer's projections are plain linears (not FP8-simulated under ModelConfig.fp8). The selection
is computed without autograd (top-k is discrete); the indexer's own training signal is a separate loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig


def apply_rope_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in the half-split layout: (x_i, x_{i+d/2}) rotated by frequency i. x: (B, T, H, d) or (B, T, d);
    cos/sin: (B or 1, T, d/2), the same tables as the interleaved `apply_rope`."""
    if x.dim() == 4:
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Indexer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.index_n_heads
        self.head_dim = cfg.index_head_dim
        self.rope_dim = cfg.qk_rope_head_dim
        self.topk = cfg.index_topk
        self.wq_b = nn.Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(cfg.dim, self.n_heads, bias=False)
        self.softmax_scale = self.head_dim ** -0.5

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rot, rest = x.split([self.rope_dim, self.head_dim - self.rope_dim], dim=-1)
        return torch.cat([apply_rope_half(rot, cos, sin), rest], dim=-1)

    def keys(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """k for x (B, T, dim): (B, T, index_head_dim), what the cache stores."""
        return self._rope(self.k_norm(self.wk(x)), cos, sin)

    def scores(self, x: torch.Tensor, q_lat: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               keys: torch.Tensor) -> torch.Tensor:
        """Index scores I (B, T, S) float32 of the T queries (x, their query latent q_lat) against keys (B, S, d)."""
        B, T, _ = x.shape
        q = self._rope(self.wq_b(q_lat).view(B, T, self.n_heads, self.head_dim), cos, sin)
        s = torch.matmul(q.float(), keys.transpose(-1, -2).float().unsqueeze(1)) * self.softmax_scale  # (B,T,H,S)
        w = self.weights_proj(x.to(self.weights_proj.weight.dtype)).float() * self.n_heads ** -0.5  # (B, T, H)
        return torch.matmul(w.unsqueeze(-2), F.relu(s)).squeeze(-2)

    def select(self, scores: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """bool (B, 1, T, S): the `topk` visible keys of highest score per query (every visible key when fewer).
        visible: bool (B or 1, 1, T, S), True = the query may attend (causality, padding)."""
        k = min(self.topk, scores.size(-1))
        idx = scores.masked_fill(~visible[:, 0], float("-inf")).topk(k, dim=-1).indices
        keep = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter_(-1, idx, True)
        return visible & keep.unsqueeze(1)
