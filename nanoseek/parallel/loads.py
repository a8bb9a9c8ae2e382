"""Expert loads recorded by training (metrics.jsonl `expert_load`: each MoE layer's share of routed tokens per
expert at a logged step), smoothed into the load estimate EPLB plans from. DeepSeek leaves load prediction
out of EPLB's scope and suggests a moving average of history; here an exponential moving average over the
logged steps (weight `alpha` on the newest)."""
from __future__ import annotations

from pathlib import Path

import torch

from nanoseek.config import ConfigError
from nanoseek.train.metrics import read_metrics


def recorded_loads(run_dir: str | Path, alpha: float = 0.1) -> torch.Tensor | None:
    """(n_moe_layers, n_experts) EMA of the logged per-expert token shares; None if none were logged."""
    if not 0 < alpha <= 1:
        raise ConfigError(f"alpha must be in (0, 1], got {alpha}")
    rows = [r["expert_load"] for r in read_metrics(Path(run_dir) / "metrics.jsonl") if r.get("expert_load")]
    if not rows:
        return None
    ema = torch.tensor(rows[0], dtype=torch.float64)
    for row in rows[1:]:
        t = torch.tensor(row, dtype=torch.float64)
        if t.shape != ema.shape:
            raise ConfigError(f"{run_dir}/metrics.jsonl: expert_load rows change shape")
        ema = (1 - alpha) * ema + alpha * t
    return ema.float()
