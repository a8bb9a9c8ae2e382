"""DeepSeekMoE (V3 report sec. 2.1.2, SPEC 1.3): shared + fine-grained routed SwiGLU experts.

Gate: sigmoid affinities (V3; softmax for V2); a per-expert bias (not trained by gradient) shifts
*selection* only; group-limited routing keeps the `n_limited_groups` groups with the best top-2 biased sums (the best
single affinity for V2's softmax gate, as in V2's group-limited greedy routing); the
selected unbiased affinities are normalized to 1 (unless `norm_topk_prob` is false; V2's softmax gate
does not normalize) and scaled by `route_scale`. Experts run batched:
tokens are sorted by expert and each expert processes its slice once (a loop over experts, never
over tokens). No token dropping. The sequence-wise balance loss, the batch-wise auxiliary balance loss and
the per-expert load of the last forward are kept on the module for the trainer.

Two balance losses (the trainer weighs them; V3 sec. 2.1.2 uses only the first, with the bias doing the work):
- `sequence_balance_loss`: V3's complementary sequence-wise loss, sum_i f_i P_i per sequence, averaged.
- `batch_balance_loss`: the conventional auxiliary loss that the bias replaced (DeepSeekMoE sec. 3.3; Wang et
  al. 2024 "Auxiliary-Loss-Free Load Balancing" eq. 2), the same sum_i f_i P_i over every token of the
  forward's batch. Simplification: "the batch" is one micro-batch on one rank (f is not all-reduced across
  micro-batches or ranks), and a float load mask (RL's weighted tokens) is not applied to it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.experts import routed_experts
from nanoseek.model.fp8 import Linear


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x): the dense FFN, each expert, and the fused shared experts."""

    def __init__(self, dim: int, inter_dim: int, fp8: bool = False):
        super().__init__()
        self.w1 = Linear(dim, inter_dim, fp8)
        self.w2 = Linear(inter_dim, dim, fp8)
        self.w3 = Linear(dim, inter_dim, fp8)
        self.fp8 = fp8
        self.w13: torch.Tensor | None = None  # inference-only [w1; w3], one matmul instead of two

    @torch.no_grad()
    def fuse(self, enable: bool = True) -> None:
        self.w13 = torch.cat([self.w1.weight, self.w3.weight]) if enable and not self.fp8 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w13 is not None and not torch.is_grad_enabled():
            gate, up = F.linear(x, self.w13).chunk(2, dim=-1)
            return self.w2(F.silu(gate) * up)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Gate(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.topk = cfg.n_activated_experts
        self.n_groups = cfg.n_expert_groups
        self.topk_groups = cfg.n_limited_groups
        self.score_func = cfg.score_func
        self.route_scale = cfg.route_scale
        self.normalize = cfg.normalizes_topk
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.dim))
        # Selection bias for auxiliary-loss-free balancing: a buffer, so no gradient and no weight decay.
        self.register_buffer("bias", torch.zeros(cfg.n_routed_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (N, dim) -> (weights (N, K), indices (N, K), affinities (N, E))."""
        xf = x if x.dtype == torch.float32 else x.float()  # the gate stays in FP32 (also under autocast)
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(xf, self.weight if self.weight.dtype == torch.float32 else self.weight.float())
        scores = logits.sigmoid() if self.score_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores + self.bias
        if self.n_groups > 1:
            grouped = choice.view(x.size(0), self.n_groups, -1)
            # V3: sum of the top-2 biased affinities; V2 (softmax, "group-limited greedy"): the best one
            group_scores = (grouped.topk(2, dim=-1)[0].sum(dim=-1) if self.score_func == "sigmoid"
                            else grouped.amax(dim=-1))
            keep = group_scores.topk(self.topk_groups, dim=-1)[1]
            drop = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
            choice = grouped.masked_fill(drop.unsqueeze(-1), float("-inf")).flatten(1)
        indices = choice.topk(self.topk, dim=-1)[1]
        weights = scores.gather(1, indices)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.route_scale != 1.0:
            weights = weights * self.route_scale
        return (weights if weights.dtype == x.dtype else weights.to(x.dtype)), indices, scores


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts = cfg.n_routed_experts
        self.topk = cfg.n_activated_experts
        self.gate = Gate(cfg)
        self.experts = nn.ModuleList(SwiGLU(cfg.dim, cfg.moe_inter_dim, cfg.fp8) for _ in range(cfg.n_routed_experts))
        self.fp8 = cfg.fp8
        self.shared_experts = (SwiGLU(cfg.dim, cfg.n_shared_experts * cfg.moe_inter_dim, cfg.fp8)
                               if cfg.n_shared_experts > 0 else None)
        self.register_buffer("last_load", torch.zeros(cfg.n_routed_experts), persistent=False)
        self.register_buffer("load_accum", torch.zeros(cfg.n_routed_experts), persistent=False)
        self.balance_loss: torch.Tensor | None = None
        self.aux_loss: torch.Tensor | None = None  # batch_balance_loss of the last training forward
        # (B, T) bool, set by a trainer whose batch has padding: only True tokens count toward the expert
        # loads that drive the bias update (padding would otherwise pile onto a few experts); or (B, T)
        # float: each token counts with its weight (RL's shared prompts stand for several rows)
        self.load_mask: torch.Tensor | None = None
        self.stacked: tuple[torch.Tensor, torch.Tensor] | None = None  # inference-only fused weights
        # expert parallelism (nanoseek.parallel.expert_parallel.ExpertDispatch): set when `experts` holds only
        # this rank's physical experts; then it dispatches (token, expert) pairs to the ranks that hold them
        self.ep = None

    @torch.no_grad()
    def stack_experts(self, enable: bool = True) -> None:
        """Fuse the routed experts into two stacked tensors for the inference path (one padded bmm per
        projection instead of three matmuls per expert). The engine enables this for the duration of a
        generate call, while the weights cannot change, and disables it after."""
        if self.shared_experts is not None:
            self.shared_experts.fuse(enable)
        if not enable or self.fp8:
            # FP8: the stacked bmm would multiply unquantized weights; inference keeps the per-expert FP8
            # linears of `routed`, so an fp8 model decodes exactly as it trains
            self.stacked = None
            return
        w13 = torch.stack([torch.cat([e.w1.weight, e.w3.weight]).t() for e in self.experts])  # (E, dim, 2I)
        w2 = torch.stack([e.w2.weight.t() for e in self.experts])  # (E, I, dim)
        self.stacked = (w13.contiguous(), w2.contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        flat = x.reshape(-1, D)
        weights, indices, scores = self.gate(flat)
        y = self.dispatch(flat, weights, indices, scores.view(B, T, -1))
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        return y.view(B, T, D)

    @torch.compiler.disable
    def dispatch(self, flat: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                 scores: torch.Tensor) -> torch.Tensor:
        """The routed experts' sum (N, D) and the load / balance-loss bookkeeping. Data-dependent (tokens per
        expert as Python ints, a loop over experts), so it always runs eagerly: under `torch.compile` the
        graph breaks here, around the gate and the shared experts (which compile)."""
        inference = self.stacked is not None and not torch.is_grad_enabled()
        counts = None
        if self.ep is not None:
            counts = torch.bincount(indices.flatten(), minlength=self.n_experts)
            y = self.ep(flat, weights, indices)
        elif inference and indices.numel() <= 16:
            y = self.routed_gathered(flat, weights, indices)  # decode: no load bookkeeping
        else:
            counts = torch.bincount(indices.flatten(), minlength=self.n_experts)
            y = (self.routed_stacked if inference else self.routed)(flat, weights, indices, counts)
        if counts is None:
            return y
        self.last_load.copy_(counts)
        load = self.last_load
        if self.training:
            if self.load_mask is not None and self.load_mask.dtype != torch.bool:  # per-token weights
                w = self.load_mask.reshape(-1, 1).expand_as(indices).to(load.dtype)
                load = torch.bincount(indices.flatten(), weights=w.flatten(), minlength=self.n_experts)
            elif self.load_mask is not None:
                real = indices[self.load_mask.reshape(-1)]
                load = torch.bincount(real.flatten(), minlength=self.n_experts).to(load.dtype)
            self.load_accum += load
            B, T = scores.shape[:2]
            self.balance_loss = sequence_balance_loss(scores, indices.view(B, T, -1))
            real = self.load_mask.reshape(-1) if self.load_mask is not None and self.load_mask.dtype == torch.bool \
                else None
            flat_scores = scores.reshape(B * T, -1)
            self.aux_loss = (batch_balance_loss(flat_scores, indices) if real is None
                             else batch_balance_loss(flat_scores[real], indices[real]))
        return y

    def routed(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Sum_k w_k * expert_{i_k}(x), with the (token, expert) pairs sorted by expert so that each expert
        multiplies one contiguous slice (a loop over experts, never over tokens). Plain (non-FP8, no autocast)
        experts run as one autograd function with a hand-written backward (nanoseek.model.experts: the same
        sum, a fraction of the memory traffic); otherwise autograd loops over `split` slices (a slice's
        backward would fill a zero gradient of all N*K rows per expert; split's is one concatenation)."""
        if not self.fp8 and not torch.is_autocast_enabled(x.device.type) and x.dtype == weights.dtype:
            return routed_experts(x, weights, indices, counts.tolist(), self.experts)
        flat_idx = indices.flatten()
        order = flat_idx.argsort(stable=True)
        token_of = order // self.topk
        xs = x.index_select(0, token_of)  # backward: one index_add, not a scatter per expert
        parts = xs.split(counts.tolist())
        ys = torch.cat([self.experts[e](part) for e, part in enumerate(parts) if part.size(0)])
        out = ys * weights.flatten()[order].unsqueeze(-1)
        return torch.zeros_like(x).index_add_(0, token_of, out)

    def routed_stacked(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                       counts: torch.Tensor) -> torch.Tensor:
        """Same sum as `routed`, computed as batched matmuls over all experts at once: for a handful of
        tokens (decode) each (token, expert) pair gathers its expert's weights; otherwise tokens are
        padded per expert into one (E, max_count, dim) batch."""
        w13, w2 = self.stacked
        flat_idx = indices.flatten()
        order = flat_idx.argsort(stable=True)
        expert_of = flat_idx[order]
        starts = counts.cumsum(0) - counts
        rank = torch.arange(flat_idx.numel(), device=x.device) - starts[expert_of]
        token_of = order // self.topk
        buf = x.new_zeros(self.n_experts, int(counts.max()), x.size(1))
        buf[expert_of, rank] = x.index_select(0, token_of)
        gate, up = torch.bmm(buf, w13).chunk(2, dim=-1)
        out = torch.bmm(F.silu(gate) * up, w2)[expert_of, rank]
        out = out * weights.flatten()[order].unsqueeze(-1)
        return torch.zeros_like(x).index_add_(0, token_of, out)


    def routed_gathered(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """For a handful of tokens (decode): each (token, expert) pair gathers its expert's stacked weights
        and all pairs run as one bmm per projection."""
        w13, w2 = self.stacked
        flat_idx = indices.flatten()
        xs = x.repeat_interleave(self.topk, dim=0).unsqueeze(1)  # (N*K, 1, dim)
        # index_select, not w13[flat_idx]: the advanced-indexing kernel is ~4x slower on CPU
        gate, up = torch.bmm(xs, w13.index_select(0, flat_idx)).chunk(2, dim=-1)
        out = torch.bmm(F.silu(gate) * up, w2.index_select(0, flat_idx)).view(x.size(0), self.topk, -1)
        return torch.bmm(weights.unsqueeze(1), out).squeeze(1)


def sequence_balance_loss(scores: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """sum_i f_i P_i per sequence, averaged over sequences (alpha applied by the trainer).

    f_i = E / (K T) * #{t : i in TopK_t},  P_i = mean_t s_i,t / sum_j s_j,t.  scores (B, T, E), indices (B, T, K).
    """
    B, T, E = scores.shape
    K = indices.size(-1)
    counts = torch.zeros(B, E, device=scores.device).scatter_add_(
        1, indices.reshape(B, -1), torch.ones(B, T * K, device=scores.device))
    f = counts * E / (K * T)
    p = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1)
    return (f * p).sum(dim=-1).mean()


def batch_balance_loss(scores: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The conventional auxiliary balance loss over one batch of N tokens (alpha applied by the trainer):

        sum_i f_i P_i,  f_i = E / (K N) * #{t : i in TopK_t},  P_i = mean_t s_i,t / sum_j s_j,t

    scores (N, E) unbiased affinities, indices (N, K). 1.0 for perfectly uniform routing and affinities; f carries
    no gradient (it counts a top-K choice), so the gradient reaches the gate through P. An empty batch gives 0."""
    if scores.size(0) == 0:
        return scores.sum() * 0.0
    return sequence_balance_loss(scores.unsqueeze(0), indices.unsqueeze(0))


# ---- balance statistics (trainer logging) ---------------------------------------------------------------
def max_vio(loads: torch.Tensor) -> float | None:
    """Wang et al. 2024's MaxVio of one batch: per MoE layer max_i load_i / mean_i load_i - 1 (0 = perfectly
    balanced; K/E-routing caps it at E/K - 1), averaged over layers (the MTP modules' MoE layers included).
    loads (n_moe_layers, n_experts) token counts of ONE global batch (all micro-batches and ranks summed:
    "MaxVio_global"); None without MoE layers or routed tokens."""
    if loads.numel() == 0 or loads.sum() == 0:
        return None
    mean = loads.double().mean(dim=1)
    return float((loads.double().max(dim=1).values / mean - 1).mean())


def mean_max_vio(batches: list[torch.Tensor]) -> float | None:
    """MaxVio of each held-out batch (see max_vio), averaged over the batches."""
    vios = [v for v in (max_vio(b) for b in batches) if v is not None]
    return sum(vios) / len(vios) if vios else None


def load_summary(loads: torch.Tensor) -> dict:
    """Per-MoE-layer max/mean load (1.0 = perfectly balanced) and each expert's share of the routed tokens."""
    if loads.numel() == 0:
        return {}
    mean = loads.mean(dim=1).clamp_min(1e-9)
    share = loads / loads.sum(dim=1, keepdim=True).clamp_min(1e-9)
    return {"load_max_mean": (loads.max(dim=1).values / mean).tolist(),
            "expert_load": [[round(v, 5) for v in row] for row in share.tolist()],
            **({"max_vio": max_vio(loads)} if loads.sum() > 0 else {})}
