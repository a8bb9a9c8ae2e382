"""Plots and markdown for an RL run (reward, accuracy, response length, KL and entropy, expert load),
built from its metrics.jsonl; the demo report embeds them next to the before/after table."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from nanoseek.report import ema, save_figure
from nanoseek.train.metrics import read_metrics


def plot_rl(run_dir: str | Path, plots_dir: str | Path) -> list[Path]:
    """Write the RL figures of `run_dir` into `plots_dir`; returns their paths."""
    rows = read_metrics(Path(run_dir) / "metrics.jsonl")
    plots_dir = Path(plots_dir)
    if not rows:
        return []
    steps = [r["step"] for r in rows]
    out = []
    panels = [("rl_reward.png", [("reward", "reward"), ("accuracy", "accuracy"), ("format_rate", "format rate")],
               "reward and its parts"),
              ("rl_length.png", [("response_len_mean", "mean"), ("response_len_max", "max")], "response length (tokens)"),
              ("rl_kl_entropy.png", [("entropy", "entropy (nats/token)"), ("kl", "KL to reference (k3)"),
                                     ("clip_frac", "clipped fraction")], "entropy, KL, clipping")]
    for name, series, title in panels:
        fig, ax = plt.subplots(figsize=(6, 3.4))
        for key, label in series:
            ys = [r.get(key, 0.0) for r in rows]
            ax.plot(steps, ys, lw=0.6, alpha=0.35)
            ax.plot(steps, ema(ys), lw=1.5, label=label, color=ax.lines[-1].get_color())
        ax.set_title(title)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        save_figure(fig, plots_dir / name)
        out.append(plots_dir / name)
    loads = [r.get("expert_load_max_over_mean") for r in rows if r.get("expert_load_max_over_mean")]
    if loads:
        fig, ax = plt.subplots(figsize=(6, 3.4))
        ls = [r["step"] for r in rows if r.get("expert_load_max_over_mean")]
        for i in range(len(loads[0])):
            if any(x[i] for x in loads):
                ax.plot(ls, ema([x[i] for x in loads]), lw=1.2, label=f"MoE layer {i}")
        ax.axhline(1.0, color="gray", ls="--", lw=0.8)
        ax.set_title("expert load max/mean during RL (1 = balanced)")
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        save_figure(fig, plots_dir / "rl_expert_load.png")
        out.append(plots_dir / "rl_expert_load.png")
    return out
