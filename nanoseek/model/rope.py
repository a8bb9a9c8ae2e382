"""RMSNorm and rotary position embedding with YaRN (DeepSeek-V3 report sec. 4.3, SPEC 1.2).

RoPE is applied in the interleaved layout of the DeepSeek-V3 reference code: consecutive pairs
(x0, x1), (x2, x3), ... are rotated by the position's angle. transformers' DeepseekV3 with
`rope_interleave=True` (the default) uses the same layout, so weights map across unchanged.

Two equal implementations of the rotation: `apply_rope_complex` (each pair one complex number times e^{i theta},
as the V3 reference does: three kernels, what eager decode wants, where every op is launch-bound) and
`apply_rope_real` (out0 = x0 cos - x1 sin, out1 = x0 sin + x1 cos on real tensors: what `torch.compile`'s
inductor can fuse into one kernel; it generates no code for complex tensors and graph-breaks there).
`apply_rope` picks the real one while being compiled and the complex one in eager mode.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from nanoseek.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return torch.nn.functional.rms_norm(x, (x.size(-1),), self.weight, self.eps)
        # BF16 (mixed precision) inputs: normalize in FP32, return the input dtype
        return torch.nn.functional.rms_norm(x.float(), (x.size(-1),), self.weight.float(), self.eps).to(x.dtype)


def yarn_correction_range(beta_fast: float, beta_slow: float, dim: int, base: float, original_len: int) -> tuple[int, int]:
    """Dimension indices (of dim/2 frequencies) where YaRN ramps from interpolation to extrapolation."""
    def correction_dim(num_rotations: float) -> float:
        return dim * math.log(original_len / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low = math.floor(correction_dim(beta_fast))
    high = math.ceil(correction_dim(beta_slow))
    return max(low, 0), min(high, dim - 1)


def rope_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies (dim/2,), YaRN-corrected when rope_factor > 1: below the correction range the
    frequency is divided by the factor, above it kept, linearly blended in between."""
    dim = cfg.qk_rope_head_dim
    freqs = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if cfg.rope_factor > 1:
        low, high = yarn_correction_range(cfg.beta_fast, cfg.beta_slow, dim, cfg.rope_theta, cfg.original_seq_len)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        keep = 1 - ramp  # 1 = keep the original (high) frequency
        freqs = freqs / cfg.rope_factor * (1 - keep) + freqs * keep
    return freqs.float()


def rope_cos_sin(cfg: ModelConfig, seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables of shape (seq_len, qk_rope_head_dim/2)."""
    seq_len = seq_len or cfg.max_seq_len
    t = torch.arange(seq_len, dtype=torch.float32)
    angles = torch.outer(t, rope_frequencies(cfg))
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of the last dim. x: (B, T, H, d) or (B, T, d); cos/sin: (B or 1, T, d/2).
    Real-valued under torch.compile (inductor fuses it), complex in eager mode (fewer kernels)."""
    if torch.compiler.is_compiling():
        return apply_rope_real(x, cos, sin)
    return apply_rope_complex(x, cos, sin)


def apply_rope_real(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`apply_rope` on real tensors: (x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos) per interleaved pair,
    computed in FP32 and returned in x's dtype (as the complex version)."""
    dtype = x.dtype
    pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    if x.dim() == 4:  # heads dimension
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)
    return out if dtype == torch.float32 else out.to(dtype)


def apply_rope_complex(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`apply_rope` with each pair one complex number times e^{i theta} (as the V3 reference does): three
    kernels instead of a dozen elementwise ones, which matters in decode where every op is launch-bound."""
    dtype = x.dtype
    pairs = x.float().unflatten(-1, (-1, 2))
    if pairs.stride(-1) != 1 or pairs.storage_offset() % 2 or any(s % 2 for s in pairs.stride()[:-1]):
        # clone, not .contiguous(): a view that counts as contiguous (size-1 dims, e.g. one decode row) is
        # returned as is by .contiguous(), odd offset and all (the rope part of an odd kv_lora_rank's latent)
        pairs = pairs.clone(memory_format=torch.contiguous_format)
    rot = torch.complex(cos, sin)
    if pairs.dim() == 5:  # heads dimension
        rot = rot.unsqueeze(2)
    out = torch.view_as_real(torch.view_as_complex(pairs) * rot).flatten(-2)
    return out if dtype == torch.float32 else out.to(dtype)
