"""Next-token sampling: greedy, temperature, top-k, top-p (nucleus), with the log-probability of the chosen
token under the distribution it was actually drawn from.

Which log-prob: with sampling (temperature > 0), log of the temperature-scaled softmax restricted to the
top-k / top-p support and renormalized over it (`sample_probs`) -- the behaviour policy, i.e. vLLM's
`logprobs_mode="processed_logprobs"`. GRPO's importance ratio needs exactly this as its denominator; the
trainer computes its numerator with the same function (`support_logprobs`), so at the weights that sampled
the ratio is 1 (train/grpo.py). Without top-k / top-p this is the plain log_softmax(logits / T). Greedy
decoding returns the log-prob under the unscaled model distribution (the sampled one-hot would give 0 for
every token, which tells a caller nothing).

Seeds: one torch.Generator for the whole batch (torch.multinomial), or per-row uniforms: the engine draws
row i's k-th uniform from row i's own generator and samples by inverse CDF, so row i's tokens depend only on
its own seed and logits, not on which rows share the batch (what makes an RL rollout independent of how the
prompts are split over processes). One vectorized draw per step either way.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None

    def validate(self) -> "SamplingParams":
        if not (self.temperature >= 0 and self.temperature <= 100):
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def mask_vocab(logits: torch.Tensor, n: int | None) -> torch.Tensor:
    """Logits with every id >= n at -inf: an imported checkpoint's embedding is padded past its tokenizer's
    vocabulary, and those rows must never be sampled. None (or n >= the logits' width): unchanged."""
    if n is None or n >= logits.size(-1):
        return logits
    return torch.cat([logits[..., :n], logits.new_full((*logits.shape[:-1], logits.size(-1) - n), float("-inf"))], -1)


def filtered_logits(logits: torch.Tensor, p: SamplingParams, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Temperature-scaled logits with tokens outside top-k / the top-p nucleus set to -inf. `keep` (same shape
    as logits without the vocabulary dim): token ids that stay in the support whatever their rank (the trainer
    passes the sampled tokens; see `support_logprobs`). Works on any leading shape and keeps autograd through
    the kept logits."""
    logits = logits.float() / p.temperature
    if (p.top_k is None or p.top_k >= logits.size(-1)) and (p.top_p is None or p.top_p >= 1):
        return logits  # nothing to drop (what every plain-temperature decode step and RL update asks for)
    drop = torch.zeros_like(logits, dtype=torch.bool)
    if p.top_k is not None and p.top_k < logits.size(-1):
        kth = logits.detach().topk(p.top_k, dim=-1)[0][..., -1:]
        drop |= logits.detach() < kth
    if p.top_p is not None and p.top_p < 1:
        sorted_logits, order = logits.detach().masked_fill(drop, float("-inf")).sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the mass of the tokens strictly before it already reaches top_p
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= p.top_p
        drop |= drop_sorted.scatter(-1, order, drop_sorted)
    if keep is not None:
        drop = drop.scatter(-1, keep.unsqueeze(-1), False)
    return logits.masked_fill(drop, float("-inf"))


def sample_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The distribution the sampler draws from (one-hot argmax when greedy)."""
    if p.greedy:
        return torch.zeros_like(logits, dtype=torch.float32).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    return filtered_logits(logits, p).softmax(dim=-1)


def support_logprobs(logits: torch.Tensor, targets: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """log p(target) under the temperature-scaled distribution renormalized over the top-k / top-p support of
    `logits`, with the target itself always in the support. For a token the sampler drew from these logits the
    target is in the support anyway, so this equals the log-prob `sample` returns; the always-in rule matters
    only for other weights (later GRPO updates, the reference model), where a token that fell out of the
    support would otherwise make the ratio 0 and the k3 KL infinite. logits (..., V), targets (...)."""
    if p.greedy:
        logp_all = logits.float().log_softmax(dim=-1)
    else:
        logp_all = filtered_logits(logits, p, keep=targets).log_softmax(dim=-1)
    return logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """probs (B, V), uniforms (B,) in [0, 1) -> the token whose cumulative-probability interval holds u * total
    (float64 sums); never a zero-probability token."""
    cdf = probs.double().cumsum(dim=-1)
    value = uniforms.double() * cdf[:, -1]
    return torch.searchsorted(cdf, value.unsqueeze(-1), right=True).squeeze(-1).clamp(max=probs.size(-1) - 1)


def sample(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None = None,
           uniforms: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, V) -> (tokens (B,), logprobs (B,)). Randomness: `uniforms` (B,), one U[0, 1) per row drawn
    from that row's own generator (inverse-CDF sampling; what per-row seeds use), else `generator` for the
    whole batch (torch.multinomial)."""
    logits = logits.float()
    if p.greedy:
        tok = logits.argmax(dim=-1)
        logp = logits.log_softmax(dim=-1)
    else:
        filtered = filtered_logits(logits, p)
        logp = filtered.log_softmax(dim=-1)
        probs = filtered.softmax(dim=-1)
        if uniforms is not None:
            tok = inverse_cdf(probs, uniforms)
        else:
            tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tok, logp.gather(-1, tok.unsqueeze(-1)).squeeze(-1)
