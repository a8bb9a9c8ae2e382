"""FP8 fine-grained mixed-precision linear layer (DeepSeek-V3 report sec. 3.3, SPEC 1.5).

All three GEMMs of y = x W^T (x: (M tokens, K in-features), W: (N out-features, K)) take E4M3 inputs with
fine-grained scales (scale = amax / 448 of each tile, computed online), and every GEMM accumulates in FP32
promoted once per 128-element chunk of its contraction dimension (the report's "increasing accumulation
precision" with N_C = 128): out = sum_c (s_a[:, c] * A_c) @ (B_c * s_b[c, :]), each chunk product in FP32.
Every tile runs along the GEMM's contraction dimension, so that one scale factors out of each chunk product:

* fprop  y  = x @ W^T     contracts K (in-features):  x in 1x128 tiles along K (per token), W in 128x128 blocks.
* dgrad  dx = dy @ W      contracts N (out-features): dy in 1x128 tiles along N (per token), W in the same
                          128x128 blocks (a block is square, so it serves W and W^T alike).
* wgrad  dW = dy^T @ x    contracts M (tokens):       dy and x both in 128x1 tiles along the token dimension
                          (per channel, per 128 tokens).

The activation x is saved for backward in real `torch.float8_e4m3fn` storage (1 byte per element) with its
1x128 scales; wgrad dequantizes it and re-quantizes it into 128x1 tiles (the report's sec. 3.5.2 describes the
same read-dequantize-transpose-requantize step, and asks hardware for it). The weight is not saved: the
FP32 master weight is a parameter anyway and is re-quantized in backward (deterministic, same blocks).
Outputs are in the autocast dtype when autocast is on (BF16, as in the report), else in x's dtype; dx in x's
dtype, dW in the master weight's dtype (FP32).

Which GEMM path runs: `torch._scaled_mm` with row-wise scales (an (M, 1) scale for A and a (1, P) one for B)
exists on CPU in torch 2.13 and is used for every 128-K chunk (`SCALED_MM` is True); where it is missing
(older torch) an exact emulation runs instead: the same chunk loop with the FP8 values cast to FP32
(E4M3 x E4M3 products are exact in FP32). Blockwise-scaled `_scaled_mm` (sm90 GPUs) would replace the chunk
loop by one call. Either path is a reference, not a fast kernel: on a CPU this measures accuracy and memory,
not speed.

`per_tensor=True` (the ablation of docs/precision.md) uses one scale for each whole operand instead of tiles
(the coarse scaling the report argues against: one outlier coarsens every value).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

E4M3_MAX = 448.0
TILE = 128
FP8 = torch.float8_e4m3fn


def _probe_scaled_mm() -> bool:
    try:
        a = torch.ones(2, 16, dtype=FP8)
        out = torch._scaled_mm(a, a.t(), scale_a=torch.ones(2, 1), scale_b=torch.ones(1, 2), out_dtype=torch.float32)
        return bool(torch.all(out == 16))
    except (AttributeError, RuntimeError, TypeError, NotImplementedError):
        return False


SCALED_MM = _probe_scaled_mm()  # row-wise torch._scaled_mm works on this build (else: exact emulation)


def quantize(x: torch.Tensor, rows: int, cols: int, per_tensor: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D tensor to E4M3 with one scale per (rows x cols) tile (edge tiles are partial).
    Returns (q: FP8 tensor of x's shape, scale: FP32 (ceil(r/rows), ceil(c/cols))), x ~= q * scale per tile.
    per_tensor: one scale (the whole tensor's amax) for every tile."""
    x = x.float()
    r, c = x.shape
    nr, nc = -(-r // rows), -(-c // cols)
    padded = nr * rows != r or nc * cols != c
    xp = F.pad(x, (0, nc * cols - c, 0, nr * rows - r)) if padded else x
    tiles = xp.reshape(nr, rows, nc, cols)
    if per_tensor:
        scale = torch.full((nr, nc), float(x.abs().amax().clamp(min=1e-12)) / E4M3_MAX)
    else:
        scale = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12) / E4M3_MAX
    q = (tiles / scale[:, None, :, None]).to(FP8).reshape(nr * rows, nc * cols)
    return (q[:r, :c].contiguous() if padded else q), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    r, c = q.shape
    nr, nc = scale.shape
    if nr * rows == r and nc * cols == c:
        return (q.float().reshape(nr, rows, nc, cols) * scale[:, None, :, None]).reshape(r, c)
    return q.float() * scale.repeat_interleave(rows, 0)[:r].repeat_interleave(cols, 1)[:, :c]


def scaled_matmul(aq: torch.Tensor, sa: torch.Tensor, bq: torch.Tensor, sb: torch.Tensor) -> torch.Tensor:
    """FP32 (M, P) = sum over 128-chunks c of the contraction dim L of (sa[:, c] * aq_c) @ (bq_c * sb[c]).
    aq: FP8 (M, L) with sa (M, L/128); bq: FP8 (L, P) with sb (L/128, P). Each chunk product is accumulated
    in FP32 into the FP32 sum (promotion every 128 elements)."""
    out = None
    for c in range(sa.size(1)):
        a, b = aq[:, c * TILE:(c + 1) * TILE], bq[c * TILE:(c + 1) * TILE]
        s_a, s_b = sa[:, c:c + 1].contiguous(), sb[c:c + 1].contiguous()
        if SCALED_MM:
            part = torch._scaled_mm(a.contiguous(), b, scale_a=s_a, scale_b=s_b, out_dtype=torch.float32)
        else:
            part = (a.float() @ b.float()) * s_a * s_b
        out = part if out is None else out.add_(part)
    return out


def _weight_scales_to(sw: torch.Tensor, n: int, along_rows: bool) -> torch.Tensor:
    """Expand 128x128 block scales sw (N/128, K/128) to the per-chunk, per-column layout scaled_matmul wants:
    (K/128, N) for fprop (B = W^T), (N/128, K) for dgrad (B = W)."""
    return sw.t().repeat_interleave(TILE, 1)[:, :n] if along_rows else sw.repeat_interleave(TILE, 1)[:, :n]


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


class FP8LinearFunction(torch.autograd.Function):
    """y = x W^T with FP8 fprop, dgrad and wgrad (tile orientations in the module docstring)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, per_tensor: bool = False) -> torch.Tensor:
        N, K = w.shape
        x2 = x.reshape(-1, K)
        with torch.autocast(x.device.type, enabled=False):
            xq, sx = quantize(x2, 1, TILE, per_tensor)  # 1x128 along K
            wq, sw = quantize(w, TILE, TILE, per_tensor)  # 128x128 blocks
            y = scaled_matmul(xq, sx, wq.t(), _weight_scales_to(sw, N, along_rows=True))
        ctx.save_for_backward(xq, sx, w)
        ctx.per_tensor, ctx.x_shape, ctx.x_dtype = per_tensor, x.shape, x.dtype
        return y.to(_out_dtype(x)).view(*x.shape[:-1], N)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        xq, sx, w = ctx.saved_tensors
        N, K = w.shape
        pt = ctx.per_tensor
        g2 = g.reshape(-1, N)
        gx = gw = None
        with torch.autocast(g.device.type, enabled=False):
            if ctx.needs_input_grad[0]:  # dgrad: contract N
                gq, sg = quantize(g2, 1, TILE, pt)  # 1x128 along N (out-features)
                wq, sw = quantize(w, TILE, TILE, pt)
                gx = scaled_matmul(gq, sg, wq, _weight_scales_to(sw, K, along_rows=False))
                gx = gx.to(ctx.x_dtype).view(ctx.x_shape)
            if ctx.needs_input_grad[1]:  # wgrad: contract M (tokens)
                gtq, sgt = quantize(g2.t(), 1, TILE, pt)  # dy^T (N, M): 1x128 along tokens = dy in 128x1 tiles
                xt_q, sxt = quantize(dequantize(xq, sx, 1, TILE), TILE, 1, pt)  # x requantized: 128x1 tiles
                gw = scaled_matmul(gtq, sgt, xt_q, sxt).to(w.dtype)
        return gx, gw, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, per_tensor: bool = False) -> torch.Tensor:
    return FP8LinearFunction.apply(x, weight, per_tensor)


class Linear(torch.nn.Linear):
    """nn.Linear without bias that switches to the FP8 GEMMs when `fp8` is set (`per_tensor`: ablation)."""

    def __init__(self, in_features: int, out_features: int, fp8: bool = False):
        super().__init__(in_features, out_features, bias=False)
        self.fp8 = fp8
        self.per_tensor = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.per_tensor) if self.fp8 else F.linear(x, self.weight)
