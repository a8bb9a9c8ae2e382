"""The arithmetic of RL from verifiable rewards, as pure functions (SPEC 3.1-3.2):

* group advantages: GRPO `(r - mean) / (std + eps)` (DeepSeekMath, arXiv 2402.03300 eq. 3), or
  mean-only (Dr. GRPO, arXiv 2503.20783);
* the clipped surrogate with separate eps_low / eps_high (DAPO clip-higher, arXiv 2503.14476) and the k3
  KL estimator `pi_ref/pi - log(pi_ref/pi) - 1`;
* loss aggregation: `grpo` (token mean per sequence, then mean), `dapo` (token mean over the batch),
  `dr_grpo` (token sum / (sequences * max_new_tokens));
* `policy_loss`: the three above composed into one batch's loss (what nanoseek.train.grpo_update minimizes);
* DAPO overlong reward shaping and the Kimi k1.5 length reward (arXiv 2501.12599 sec. 2.3.3).
"""
from __future__ import annotations

import torch

AGGREGATIONS = ("grpo", "dapo", "dr_grpo")


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """rewards (N,) with N = groups * group_size, consecutive rows one group -> advantages (N,).
    std is the unbiased sample std, as in the GRPO reference implementations."""
    r = rewards.view(-1, group_size).float()
    adv = r - r.mean(dim=1, keepdim=True)
    if scale:
        adv = adv / (r.std(dim=1, keepdim=True) + eps)
    # equal rewards carry no signal: exactly zero, not the mean's rounding error over eps (up to ~1e-3)
    same = r.amax(dim=1, keepdim=True) == r.amin(dim=1, keepdim=True)
    return adv.masked_fill(same, 0.0).flatten()


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi || pi_ref): exp(ref - logp) - (ref - logp) - 1 >= 0."""
    d = ref_logp - logp
    return d.exp() - d - 1


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, eps_low: float,
                      eps_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss -min(rho A, clip(rho, 1-eps_low, 1+eps_high) A) and a mask of clipped tokens.
    logp/old_logp (B, T), adv (B,) broadcast over tokens."""
    ratio = (logp - old_logp).exp()
    a = adv.unsqueeze(-1)
    unclipped = ratio * a
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high) * a
    loss = -torch.minimum(unclipped, clipped)
    return loss, (clipped < unclipped).float()


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, how: str, max_new_tokens: int,
              n_seqs: float | None = None, n_tokens: float | None = None) -> torch.Tensor:
    """Reduce a (B, T) per-token loss over `mask` (1 on completion tokens). `n_seqs` / `n_tokens` are the
    global counts when the batch is split over micro-batches or ranks (defaults: this batch's)."""
    if how not in AGGREGATIONS:
        raise ValueError(f"loss aggregation must be one of {AGGREGATIONS}, got {how!r}")
    n_seqs = per_token.size(0) if n_seqs is None else n_seqs
    masked = per_token * mask
    if how == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / n_seqs
    if how == "dapo":
        total = float(mask.sum()) if n_tokens is None else float(n_tokens)
        return masked.sum() / max(total, 1.0)
    return masked.sum() / (n_seqs * max_new_tokens)


def overlong_penalty(length: int, max_len: int, cache_len: int) -> float:
    """DAPO soft overlong punishment: 0 up to max_len - cache_len, linear down to -1 at max_len, -1 beyond."""
    if cache_len <= 0:
        return 0.0
    start = max_len - cache_len
    if length <= start:
        return 0.0
    if length <= max_len:
        return (start - length) / cache_len
    return -1.0


def length_rewards(lengths: list[int], correct: list[bool]) -> list[float]:
    """Kimi k1.5 length reward within one group: lambda = 0.5 - (len - min) / (max - min); correct answers get
    lambda, wrong ones min(0, lambda); all zeros when every length is equal."""
    lo, hi = min(lengths), max(lengths)
    if hi == lo:
        return [0.0] * len(lengths)
    out = []
    for n, ok in zip(lengths, correct):
        lam = 0.5 - (n - lo) / (hi - lo)
        out.append(lam if ok else min(0.0, lam))
    return out


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, how: str,
                max_new_tokens: int, eps_low: float, eps_high: float, beta: float = 0.0,
                ref_logp: torch.Tensor | None = None, n_seqs: float | None = None, n_tokens: float | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The GRPO-family loss of one (micro-)batch: the clipped surrogate per token, plus beta * k3 KL to the
    reference when beta > 0, reduced by `aggregate(how)` over `mask`. logp / old_logp / ref_logp / mask (B, T),
    adv (B,). Returns (loss, clipped-token mask, per-token KL or None)."""
    per_tok, clipped = clipped_surrogate(logp, old_logp, adv, eps_low, eps_high)
    kl = None
    if beta > 0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs the reference log-probs")
        kl = k3_kl(logp, ref_logp)
        per_tok = per_tok + beta * kl
    return aggregate(per_tok, mask, how, max_new_tokens, n_seqs=n_seqs, n_tokens=n_tokens), clipped, kl
