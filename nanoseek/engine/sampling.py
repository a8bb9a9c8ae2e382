"""Next-token sampling: greedy, temperature, top-k, top-p (nucleus), with the log-probability of the
chosen token under the temperature-scaled distribution (before top-k/top-p filtering), which is the
policy probability GRPO's importance ratio needs.
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


def filtered_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature-scaled logits with tokens outside top-k / the top-p nucleus set to -inf."""
    logits = logits.float() / p.temperature
    if p.top_k is not None and p.top_k < logits.size(-1):
        kth = logits.topk(p.top_k, dim=-1)[0][..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p is not None and p.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the mass of the tokens strictly before it already reaches top_p
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= p.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The distribution the sampler draws from (one-hot argmax when greedy)."""
    if p.greedy:
        return torch.zeros_like(logits, dtype=torch.float32).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    return filtered_logits(logits, p).softmax(dim=-1)


def sample(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, V) -> (tokens (B,), logprobs (B,))."""
    logits = logits.float()
    if p.greedy:
        tok = logits.argmax(dim=-1)
        logp = logits.log_softmax(dim=-1)
    else:
        logp = (logits / p.temperature).log_softmax(dim=-1)
        probs = filtered_logits(logits, p).softmax(dim=-1)
        tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tok, logp.gather(-1, tok.unsqueeze(-1)).squeeze(-1)
