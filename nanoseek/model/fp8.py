"""FP8-style fine-grained quantized matmul (DeepSeek-V3 report sec. 3.3, SPEC 1.5), simulated.

Activations get one E4M3 scale per 1x128 tile (per token, per 128 channels), weights one per 128x128
block; scale = amax / 448 computed online. The quantized values are cast to float8_e4m3fn and back, then
multiplied in FP32, which reproduces FP8's rounding error exactly while accumulating in full FP32
(stricter than the 128-element promotion interval of the report). Gradients pass straight through, so
master weights and optimizer states stay FP32. Simplification: no FP8 kernel is used, so this measures
accuracy, not speed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

E4M3_MAX = 448.0
TILE = 128


def _quantize_blocks(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Fake-quantize a 2-D tensor with one scale per (rows x cols) block (padding the edges)."""
    r, c = x.shape
    pr, pc = (-r) % rows, (-c) % cols
    xp = F.pad(x, (0, pc, 0, pr))
    blocks = xp.unflatten(0, (-1, rows)).unflatten(2, (-1, cols))  # (R, rows, C, cols)
    amax = blocks.abs().amax(dim=(1, 3), keepdim=True).clamp(min=1e-12)
    scale = amax / E4M3_MAX
    q = (blocks / scale).to(torch.float8_e4m3fn).to(x.dtype) * scale
    return q.flatten(2).flatten(0, 1)[:r, :c]


class _FP8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        x2 = x.reshape(-1, x.size(-1)).float()
        xq = _quantize_blocks(x2, 1, TILE)
        wq = _quantize_blocks(w.float(), TILE, TILE)
        return (xq @ wq.t()).to(x.dtype).view(*x.shape[:-1], w.size(0))

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, w = ctx.saved_tensors
        gx = g @ w
        gw = g.reshape(-1, g.size(-1)).t() @ x.reshape(-1, x.size(-1))
        return gx, gw


def fp8_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return _FP8Linear.apply(x, weight)


class Linear(torch.nn.Linear):
    """nn.Linear without bias that switches to the simulated FP8 matmul when `fp8` is set."""

    def __init__(self, in_features: int, out_features: int, fp8: bool = False):
        super().__init__(in_features, out_features, bias=False)
        self.fp8 = fp8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight) if self.fp8 else F.linear(x, self.weight)
