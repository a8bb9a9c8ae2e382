"""`nanoseek cost`: what serving a model costs on a given GPU setup (memory, roofline speed, $ per token).
The arithmetic and its assumptions are in nanoseek/tokenomics.py."""
from __future__ import annotations

import argparse
import dataclasses
import json

from rich.console import Console
from rich.table import Table

from nanoseek.config import PRESETS
from nanoseek.tokenomics import (
    GPUS,
    SWEEPS,
    Comparison,
    CostModel,
    CostResult,
    MemoryPlan,
    Scenario,
    TCOInputs,
    compare,
    evaluate,
    load_model,
    plot_sweep,
    resolve_gpu,
    sweep,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    d, t = Scenario(), TCOInputs()
    p.add_argument("--preset", default="v3-671b", help=f"one of {', '.join(PRESETS)}")
    p.add_argument("--config", help="a nanoseek model config JSON or a transformers config.json (overrides --preset)")
    p.add_argument("--attention", help="cost the same model with another KV cache: mla, mha, mqa or gqa:N "
                   "(--compare and --sweep show them all)")
    p.add_argument("--gpu", default=d.gpu, help=f"one of {', '.join(GPUS)}")
    p.add_argument("--gpus", type=int, default=d.gpus, help="GPUs in one serving replica")
    p.add_argument("--weight-dtype", default=d.weight_dtype, help="bf16 or fp8")
    p.add_argument("--cache-dtype", default=d.cache_dtype, help="bf16 or fp8")
    p.add_argument("--context", type=int, default=d.context, help="KV tokens held per sequence")
    p.add_argument("--batch", type=int, default=d.batch, help="concurrent sequences on the replica")
    u = p.add_argument_group("utilization assumptions")
    u.add_argument("--mfu", type=float, default=d.mfu, help="fraction of peak FLOP/s reached")
    u.add_argument("--mbu", type=float, default=d.mbu, help="fraction of peak HBM bandwidth reached")
    u.add_argument("--mem-fraction", type=float, default=d.mem_fraction, help="fraction of HBM the server may use")
    u.add_argument("--workspace-gib", type=float, default=d.workspace_gib, help="activation workspace per GPU")
    u.add_argument("--load", type=float, default=d.load, help="fraction of hours spent serving at this batch")
    c = p.add_argument_group("cost of ownership, per GPU")
    c.add_argument("--capex", type=float, help="USD per GPU incl. its server share (default: the GPU preset's)")
    c.add_argument("--years", type=float, default=t.years, help="depreciation life")
    c.add_argument("--cost-of-capital", type=float, default=t.cost_of_capital, help="per year")
    c.add_argument("--power-w", type=float, help="average watts per GPU (default: its TDP)")
    c.add_argument("--pue", type=float, default=t.pue)
    c.add_argument("--usd-per-kwh", type=float, default=t.usd_per_kwh)
    c.add_argument("--hosting", type=float, default=t.hosting_usd_per_gpu_hour, help="USD per GPU-hour")
    o = p.add_argument_group("output")
    o.add_argument("--json", action="store_true", help="print JSON instead of a table")
    o.add_argument("--compare", action="store_true", help="attention variants of the same model side by side")
    o.add_argument("--sweep", help=f"plot tokens/s and $/Mtok against one of: {', '.join(SWEEPS)}")
    o.add_argument("--plot", help="PNG path for --sweep (default cost_sweep_<sweep>.png)")


def scenario_from_args(args: argparse.Namespace) -> Scenario:
    tco = TCOInputs(capex_usd=args.capex, years=args.years, cost_of_capital=args.cost_of_capital, power_w=args.power_w,
                    pue=args.pue, usd_per_kwh=args.usd_per_kwh, hosting_usd_per_gpu_hour=args.hosting)
    return Scenario(gpu=args.gpu, gpus=args.gpus, attention=args.attention, weight_dtype=args.weight_dtype,
                    cache_dtype=args.cache_dtype, context=args.context, batch=args.batch, mfu=args.mfu,
                    mbu=args.mbu, mem_fraction=args.mem_fraction, workspace_gib=args.workspace_gib, load=args.load,
                    tco=tco).validate()


# ---- formatting ----------------------------------------------------------------------------------------
def fmt_count(n: float) -> str:
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:,.1f}{unit}"
    return f"{n:,.0f}"


def fmt_bytes(n: float) -> str:
    for div, unit in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if abs(n) >= div:
            return f"{n / div:,.1f} {unit}"
    return f"{n:,.0f} B"


def fmt_ms(s: float) -> str:
    return f"{s * 1e3:,.2f} ms"


def result_table(m: CostModel, r: CostResult) -> Table:
    mem: MemoryPlan = r.memory
    table = Table(title=f"{r.model} on {r.gpus} x {r.gpu}: context {r.context:,}, batch {r.batch}")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    rows = [
        ("parameters total / activated", f"{fmt_count(r.params_total)} / {fmt_count(r.params_active)}"),
        ("attention (KV cache)", r.attention + ("" if r.attention == m.native_attention else " (override)")),
        ("weights (dtype, total, per GPU)",
         f"{r.weight_dtype}  {fmt_bytes(mem.weight_bytes)}  {fmt_bytes(mem.weight_bytes_per_gpu)}"),
        (f"KV bytes / token ({r.cache_dtype}): per layer, all layers",
         f"{mem.kv_bytes_per_token_layer:,}  {mem.kv_bytes_per_token:,}"),
        ("KV cache per sequence at context", fmt_bytes(mem.kv_bytes_per_sequence)),
        ("HBM left for KV cache (replica)", fmt_bytes(mem.kv_room_bytes)),
        ("max concurrent sequences (tokens)", f"{mem.max_concurrent_sequences:,} ({mem.max_concurrent_tokens:,})"),
    ]
    if r.experts_touched_per_layer is not None:
        rows.append(("routed experts touched per layer per step",
                     f"{r.experts_touched_per_layer:,.1f} of {m.n_routed_experts}"))
    rows += [
        ("decode step: memory time / compute time",
         f"{fmt_ms(r.decode_time_memory_s)} / {fmt_ms(r.decode_time_compute_s)}"),
        ("decode bound", f"[bold]{r.bound}[/bold]"),
        ("decode tokens/s per GPU (replica)", f"{r.decode_tokens_per_s:,.0f} ({r.decode_tokens_per_s_replica:,.0f})"),
        ("tokens/s seen by one sequence", f"{r.tokens_per_s_per_sequence:,.1f}"),
        ("prefill tokens/s per GPU (bound)", f"{r.prefill_tokens_per_s:,.0f} ({r.prefill_bound})"),
        ("TCO per GPU-hour: capex + power + hosting",
         (f"${r.tco['total']:.2f} = {r.tco['capex']:.2f} + {r.tco['power']:.2f} + {r.tco['hosting']:.2f} "
         f"(capex {r.tco['capex_share']:.0%})")),
        ("USD per million output tokens", f"[bold]${r.usd_per_mtok_output:,.3f}[/bold]"),
        ("USD per million input tokens", f"${r.usd_per_mtok_input:,.3f}"),
    ]
    for k, v in rows:
        table.add_row(k, v)
    return table


def compare_table(rows: list[Comparison], sc: Scenario, title: str) -> Table:
    table = Table(title=title)
    table.add_column("quantity")
    for row in rows:
        table.add_column(row.plan.attention, justify="right")

    def line(label: str, cell) -> None:
        table.add_row(label, *[cell(row) for row in rows])

    def at(attr: str, fmt) -> callable:
        return lambda row: fmt(getattr(row, attr)) if getattr(row, attr) else "does not fit"

    line("KV bytes / token", lambda row: f"{row.plan.kv_bytes_per_token:,}")
    line("KV cache per sequence", lambda row: fmt_bytes(row.plan.kv_bytes_per_sequence))
    line("max concurrent sequences", lambda row: f"{row.plan.max_concurrent_sequences:,}")
    line(f"decode tokens/s per GPU @ batch {sc.batch}", at("at_batch", lambda r: f"{r.decode_tokens_per_s:,.0f}"))
    line("decode bound", at("at_batch", lambda r: r.bound))
    line("tokens/s per sequence", at("at_batch", lambda r: f"{r.tokens_per_s_per_sequence:,.1f}"))
    line("prefill tokens/s per GPU", at("at_batch", lambda r: f"{r.prefill_tokens_per_s:,.0f}"))
    line("USD / M output tokens", at("at_batch", lambda r: f"${r.usd_per_mtok_output:,.3f}"))
    line("USD / M input tokens", at("at_batch", lambda r: f"${r.usd_per_mtok_input:,.3f}"))
    line("max batch: tokens/s per GPU",
         at("at_max_batch", lambda r: f"{r.decode_tokens_per_s:,.0f} ({r.bound})"))
    line("max batch: USD / M output tokens", at("at_max_batch", lambda r: f"${r.usd_per_mtok_output:,.3f}"))
    return table


def sweep_table(results: dict[str, list[CostResult]], kind: str) -> Table:
    table = Table(title=f"decode tokens/s per GPU | USD per million output tokens, by {kind}")
    xs = sorted({getattr(r, kind) for pts in results.values() for r in pts})
    table.add_column(kind, justify="right")
    for v in results:
        table.add_column(v, justify="right")
    for x in xs:
        cells = []
        for pts in results.values():
            r = next((r for r in pts if getattr(r, kind) == x), None)
            cells.append(f"{r.decode_tokens_per_s:,.0f} | ${r.usd_per_mtok_output:,.2f}" if r else "-")
        table.add_row(f"{x:,}", *cells)
    return table


# ---- entry point -------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    model = load_model(args.preset, args.config)
    sc = scenario_from_args(args)
    gpu = resolve_gpu(sc.gpu)
    setup = f"{model.name} on {sc.gpus} x {gpu.name} ({sc.weight_dtype} weights, {sc.cache_dtype} KV cache)"
    console = Console()
    if args.sweep:
        results = sweep(model, sc, args.sweep)
        fixed = f"context {sc.context:,}" if args.sweep == "batch" else f"batch {sc.batch}"
        path = plot_sweep(results, args.sweep, args.plot or f"cost_sweep_{args.sweep}.png", f"{setup}, {fixed}")
        if args.json:
            print(json.dumps({"plot": str(path), "points": {
                v: [{args.sweep: getattr(r, args.sweep), "decode_tokens_per_s": r.decode_tokens_per_s,
                     "usd_per_mtok_output": r.usd_per_mtok_output, "bound": r.bound} for r in pts]
                for v, pts in results.items()}}, indent=2))
        else:
            console.print(sweep_table(results, args.sweep))
            console.print(f"plot written to {path}")
        return 0
    if args.compare:
        rows = compare(model, sc)
        if args.json:
            print(json.dumps([dataclasses.asdict(row) for row in rows], indent=2))
        else:
            console.print(compare_table(rows, sc, f"{setup}: context {sc.context:,}, batch {sc.batch}"))
        return 0
    result = evaluate(model, sc)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        console.print(result_table(model, result))
    return 0
