"""Run reports: `runs/NAME/report.md` with `plots/loss.png` and `plots/expert_load.png`, built from the run's
metrics.jsonl and config.json; plus `compare_runs` for one figure of several runs (e.g. MoE vs dense).

loss.png: main next-token CE, MTP CE, the weighted total and the held-out (eval) CE against step; the
sequence balance loss on its own axis (it lives on another scale). expert_load.png: max/mean routed-token
load per MoE layer against step (1.0 = perfectly balanced; the auxiliary-loss-free bias pulls it down), and a
layer x expert heatmap of each expert's share of the tokens at the last logged step. Figures use the Agg
backend and every file is written atomically.

    python -m nanoseek.report runs/NAME
    python -m nanoseek.report compare runs/A runs/B --labels MoE dense --out docs/img/moe_vs_dense.png
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter

from nanoseek.config import ConfigError
from nanoseek.io import atomic_write, atomic_write_text
from nanoseek.train.metrics import read_metrics


def _plain_log_axis(ax) -> None:
    """Log-scale y with plain tick labels (1.2, not 1.2e0): losses span a few x, not decades."""
    ax.set_yscale("log")
    fmt = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(fmt)
    ax.yaxis.set_minor_formatter(fmt)
    ax.tick_params(axis="y", which="minor", labelsize=7)


def save_figure(fig, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)


def _series(rows: list[dict], key: str, x: str = "step") -> tuple[list, list]:
    pts = [(r[x], r[key]) for r in rows if r.get(key) is not None and x in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def ema(values: list[float], beta: float = 0.9) -> list[float]:
    out, m = [], None
    for v in values:
        m = v if m is None else beta * m + (1 - beta) * v
        out.append(m)
    return out


_save, _ema = save_figure, ema  # the names commands/aha.py imports


def plot_losses(rows: list[dict], path: Path) -> None:
    fig, (ax, axb) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
    for key, label in (("loss", "total"), ("main", "main CE"), ("mtp", "MTP CE")):
        xs, ys = _series(rows, key)
        ax.plot(xs, ys, label=label, lw=1)
    xs, ys = _series(rows, "eval_loss")
    if xs:
        ax.plot(xs, ys, "o-", label="held-out CE", color="black", ms=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    _plain_log_axis(ax)
    ax.grid(alpha=0.3)
    ax.legend()
    xs, ys = _series(rows, "balance")
    axb.plot(xs, ys, color="tab:purple", lw=1)
    axb.set_title("sequence balance loss (sum over MoE layers)", fontsize=9)
    axb.set_xlabel("step")
    axb.grid(alpha=0.3)
    save_figure(fig, path)


def moe_layer_names(model_cfg: dict | None, n: int) -> list[str]:
    """Names of the rows of the load metrics: Transformer.moe_layers() order is the main MoE layers, then the MTP
    modules' blocks."""
    if model_cfg and model_cfg.get("n_routed_experts", 0) > 0:
        first, n_layers = model_cfg["n_dense_layers"], model_cfg["n_layers"]
        names = [f"layer {i}" for i in range(first, n_layers)] + [f"MTP {k + 1}" for k in range(model_cfg["n_mtp"])]
        if len(names) == n:
            return names
    return [f"MoE {i}" for i in range(n)]


def plot_expert_load(rows: list[dict], path: Path, model_cfg: dict | None = None) -> None:
    with_load = [r for r in rows if r.get("load_max_mean")]
    names = moe_layer_names(model_cfg, len(with_load[-1]["load_max_mean"]))
    fig, (ax, axh) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [r["step"] for r in with_load]
    for i, name in enumerate(names):
        ax.plot(steps, ema([r["load_max_mean"][i] for r in with_load]), label=name, lw=1)
    ax.axhline(1.0, color="gray", ls="--", lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("max / mean expert load (EMA)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    share = with_load[-1]["expert_load"]
    im = axh.imshow(share, aspect="auto", cmap="viridis")
    axh.set_xlabel("expert")
    axh.set_xticks(range(len(share[0])))
    axh.set_yticks(range(len(names)), names)
    axh.set_title(f"share of routed tokens at step {with_load[-1]['step']}", fontsize=9)
    fig.colorbar(im, ax=axh)
    save_figure(fig, path)


def write_report(run_dir: str | Path) -> Path:
    """Write report.md and plots/ for a run directory; returns the report path."""
    run_dir = Path(run_dir)
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if "step" in r]
    if not rows:
        raise ConfigError(f"no metrics in {run_dir}/metrics.jsonl: nothing to report")
    cfg = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").exists() else {}
    plots = run_dir / "plots"
    plot_losses(rows, plots / "loss.png")
    has_moe = any(r.get("load_max_mean") for r in rows)
    if has_moe:
        plot_expert_load(rows, plots / "expert_load.png", cfg.get("model"))

    last = rows[-1]
    evals = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
    rates = [r["tokens_per_s"] for r in rows if r.get("tokens_per_s")]
    lines = [f"# Run report: {run_dir.name}", ""]
    if cfg:
        from nanoseek.config import ModelConfig

        counts = ModelConfig.from_dict(cfg["model"]).param_counts()
        kind = "dense" if cfg.get("dense") else "MoE"
        data = cfg.get("data", {})
        source = (f"Text: {', '.join(data['data'])}" if data.get("data") else f"Task: {data.get('task', '?')}")
        lines += [(f"Model: {kind}, {counts['total']:,} parameters ({counts['active']:,} active per token, "
                   f"+{counts['mtp']:,} MTP). {source}."), ""]
    lines += ["| figure | value |", "|---|---|",
              f"| steps | {last['step']:,} |",
              f"| tokens seen | {last.get('tokens', 0):,} |",
              f"| wall-clock | {last.get('elapsed_s', 0) / 60:.1f} min |",
              f"| tokens/s (median) | {statistics.median(rates):,.0f} |" if rates else "| tokens/s | - |",
              (f"| final train loss (total / main / MTP / balance) | {last['loss']:.4f} / {last['main']:.4f} / "
               f"{last['mtp']:.4f} / {last['balance']:.4f} |")]
    if evals:
        best = min(evals, key=lambda e: e[1])
        lines.append(f"| held-out CE (last, step {evals[-1][0]}) | {evals[-1][1]:.4f} |")
        lines.append(f"| held-out CE (best, step {best[0]}) | {best[1]:.4f} |")
    bpbs = [(r["step"], r["val_bpb"]) for r in rows if r.get("val_bpb") is not None]
    if bpbs:
        lines.append(f"| held-out bits per byte (last, step {bpbs[-1][0]}) | {bpbs[-1][1]:.4f} |")
    if has_moe:
        lm = [r for r in rows if r.get("load_max_mean")][-1]["load_max_mean"]
        names = moe_layer_names(cfg.get("model"), len(lm))
        lines.append("| expert load max/mean (last step) | "
                     f"{', '.join(f'{n}: {v:.2f}' for n, v in zip(names, lm, strict=True))} |")
    lines += ["", "![losses](plots/loss.png)", ""]
    if has_moe:
        lines += ["![expert load](plots/expert_load.png)", ""]
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def compare_runs(run_dirs: list[str | Path], labels: list[str], out: str | Path) -> Path:
    """Train CE (EMA) and held-out CE against wall-clock minutes, and held-out CE against tokens seen, for several
    runs in one figure (same time budget and same data stream: which model learns more per second and per token)."""
    fig, (ax, axe, axt) = plt.subplots(1, 3, figsize=(15, 4))
    for run_dir, label in zip(run_dirs, labels, strict=True):
        rows = read_metrics(Path(run_dir) / "metrics.jsonl")
        if not rows:
            raise ConfigError(f"no metrics in {run_dir}")
        xs, ys = _series(rows, "main", "elapsed_s")
        line, = ax.plot([x / 60 for x in xs], ema(ys, 0.95), label=label, lw=1.2)
        xs, ys = _series(rows, "eval_loss", "elapsed_s")
        axe.plot([x / 60 for x in xs], ys, "o-", label=label, color=line.get_color(), ms=4)
        xs, ys = _series(rows, "eval_loss", "tokens")
        axt.plot([x / 1e6 for x in xs], ys, "o-", label=label, color=line.get_color(), ms=4)
    for a, title, xlabel in ((ax, "train next-token CE (EMA 0.95)", "wall-clock minutes"),
                             (axe, "held-out next-token CE", "wall-clock minutes"),
                             (axt, "held-out next-token CE", "million tokens seen")):
        a.set_xlabel(xlabel)
        a.set_title(title, fontsize=10)
        _plain_log_axis(a)
        a.grid(alpha=0.3, which="both")
        a.legend(fontsize=8)
    out = Path(out)
    save_figure(fig, out)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["compare"]:
        p = argparse.ArgumentParser(prog="python -m nanoseek.report compare")
        p.add_argument("runs", nargs="+")
        p.add_argument("--labels", nargs="+")
        p.add_argument("--out", required=True)
        a = p.parse_args(argv[1:])
        labels = a.labels or [Path(r).name for r in a.runs]
        if len(labels) != len(a.runs):
            p.error("give one label per run")
        print(compare_runs(a.runs, labels, a.out))
        return 0
    p = argparse.ArgumentParser(prog="python -m nanoseek.report")
    p.add_argument("run_dir")
    print(write_report(p.parse_args(argv).run_dir))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
