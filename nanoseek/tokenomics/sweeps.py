"""Comparisons and sweeps over the roofline serving-cost model (`roofline.evaluate`): the attention kinds side by
side (`compare`), one input varied over a range (`sweep`, `SWEEPS`), and the sweep's plot.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from nanoseek.config import ConfigError
from nanoseek.tokenomics.cost_model import CostModel
from nanoseek.tokenomics.roofline import CostResult, MemoryPlan, Scenario, evaluate, memory_plan

# ---- comparisons and sweeps --------------------------------------------------------------------------
def default_variants(model: CostModel) -> list[str]:
    """The model's own attention first, then MLA (if it has the shapes), GQA with 8 KV heads, MHA, MQA."""
    out = [model.native_attention]
    if model.is_mla:
        out.append("mla")
    if model.n_heads % 8 == 0 and model.n_heads > 8:
        out.append("gqa:8")
    out += ["mha", "mqa"]
    return list(dict.fromkeys(out))


@dataclass(frozen=True)
class Comparison:
    plan: MemoryPlan
    at_batch: CostResult | None  # None where the requested batch does not fit
    at_max_batch: CostResult | None  # at the largest batch that fits; None where not one sequence fits


def compare(model: CostModel, sc: Scenario, variants: list[str] | None = None) -> list[Comparison]:
    """Each attention variant at the requested batch and at the largest batch its KV cache allows: the
    second is where a smaller cache pays, since more sequences share each read of the weights."""
    rows = []
    for v in variants or default_variants(model):
        s = dataclasses.replace(sc, attention=v)
        plan = memory_plan(model, s)
        at_batch = evaluate(model, s) if sc.batch <= plan.max_concurrent_sequences else None
        at_max = (evaluate(model, dataclasses.replace(s, batch=plan.max_concurrent_sequences))
                  if plan.max_concurrent_sequences >= 1 else None)
        rows.append(Comparison(plan, at_batch, at_max))
    return rows


SWEEPS: dict[str, list[int]] = {
    "batch": [2 ** i for i in range(13)],
    "context": [2 ** i for i in range(9, 18)],
}


def sweep(model: CostModel, sc: Scenario, kind: str, variants: list[str] | None = None,
          values: list[int] | None = None) -> dict[str, list[CostResult]]:
    """variant -> results along `kind` ('batch' or 'context'), keeping only the points that fit."""
    if kind not in SWEEPS:
        raise ConfigError(f"unknown sweep {kind!r}; choose one of: {', '.join(SWEEPS)}")
    memory_plan(model, sc)  # the weights must fit before anything is swept
    out: dict[str, list[CostResult]] = {}
    for v in variants or default_variants(model):
        xs = list(values or SWEEPS[kind])
        if kind == "batch":  # end each curve at the variant's own largest batch
            cap = memory_plan(model, dataclasses.replace(sc, attention=v)).max_concurrent_sequences
            xs = sorted({x for x in xs if x <= cap} | ({cap} if 1 <= cap <= max(xs) else set()))
        points = []
        for x in xs:
            s = dataclasses.replace(sc, attention=v, **{kind: x})
            if s.batch <= memory_plan(model, s).max_concurrent_sequences:
                points.append(evaluate(model, s))
        out[v] = points
    return out


def plot_sweep(results: dict[str, list[CostResult]], kind: str, path: str | Path, title: str) -> Path:
    """Two panels, decode tokens/s per GPU and $ per million output tokens against `kind`, one line per
    attention variant; written atomically as PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nanoseek.io import atomic_write

    fig, (ax_t, ax_c) = plt.subplots(1, 2, figsize=(11, 4.2))
    for variant, points in results.items():
        xs = [getattr(r, kind) for r in points]
        label = variant if points else f"{variant} (does not fit)"
        ax_t.plot(xs, [r.decode_tokens_per_s for r in points], marker="o", ms=3, label=label)
        ax_c.plot(xs, [r.usd_per_mtok_output for r in points], marker="o", ms=3, label=label)
    for ax, ylabel in ((ax_t, "decode tokens/s per GPU"), (ax_c, "USD per million output tokens")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(kind)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(title="attention")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return path
