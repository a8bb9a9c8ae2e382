"""NaN-aware reductions for the equivalence tests. Python's `max(0.0, nan)` is 0.0 (nan compares False), so a
running `max` over differences silently drops a NaN, and a NaN result then passes `< tol`; these keep it."""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist


def worst(values: Iterable[float | torch.Tensor]) -> float:
    """The largest value, NaN if any value is NaN (torch.max propagates NaN); 0.0 for no values."""
    flat = [torch.as_tensor(v).detach().to(torch.float64).reshape(-1) for v in values]
    return float(torch.cat(flat).max()) if flat and sum(t.numel() for t in flat) else 0.0


def worst_over_ranks(values: list[float]) -> list[float]:
    """Elementwise largest over the ranks, a NaN anywhere coming out as +inf (a backend's MAX need not
    propagate NaN; +inf survives it)."""
    t = torch.nan_to_num(torch.tensor(values, dtype=torch.float64), nan=math.inf)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def small(value: float, tol: float) -> bool:
    """True when `value` is finite and below `tol` (NaN and inf fail)."""
    return math.isfinite(value) and value < tol
