"""`nanoseek cost`: what serving a model costs on a given GPU setup (memory, roofline speed, $ per token).

Two models: one replica of `--gpus` GPUs with a free network (nanoseek/tokenomics/roofline.py), or, with
any deployment flag (`--prefill-ep`, `--decode-ep`, `--deployment FILE`, `--scenario NAME`), disaggregated
prefill and decode units with expert parallelism and the all-to-all traffic they cost
(nanoseek/tokenomics/deployment.py). The arithmetic and its assumptions are in those modules' docstrings."""
from __future__ import annotations

import argparse
import dataclasses
import json

from rich.console import Console
from rich.table import Table

from nanoseek.commands import cost_sparse
from nanoseek.config import PRESETS
from nanoseek.config import ConfigError
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
from nanoseek.tokenomics.deployment import (
    SCHEMES,
    Deployment,
    FleetResult,
    PhasePlan,
    Prices,
    Traffic,
    fleet,
    load_deployment,
)
from nanoseek.tokenomics.reasoning import ReasoningModel, kv_comparison
from nanoseek.tokenomics.scenarios import SCENARIOS, PublishedScenario, diagnostics, get_scenario, side_by_side


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
    dd = Deployment()
    e = p.add_argument_group("deployment: disaggregated prefill / decode units with expert parallelism "
                             "(any of these switches to this model)")
    e.add_argument("--scenario", help=f"a published deployment, predicted vs published: {', '.join(SCENARIOS)} "
                   "(it brings all its inputs: model, GPU and deployment flags are not used)")
    e.add_argument("--deployment", help="a deployment JSON (Deployment's fields; replaces the flags below)")
    e.add_argument("--prefill-ep", type=int, help="GPUs per prefill unit (EP = DP)")
    e.add_argument("--decode-ep", type=int, help="GPUs per decode unit (EP = DP)")
    e.add_argument("--redundant-experts", type=int, default=0, help="extra expert slots per unit, both phases")
    e.add_argument("--microbatches", type=int, default=1, help="2 = dual-microbatch overlap of comm and compute")
    e.add_argument("--prefill-scheme", default="hierarchical", choices=SCHEMES, help="prefill all-to-all")
    e.add_argument("--decode-scheme", default="direct", choices=SCHEMES, help="decode all-to-all")
    e.add_argument("--gpus-per-node", type=int, default=dd.gpus_per_node)
    e.add_argument("--prompt-tokens", type=int, default=dd.prompt_tokens, help="mean prompt length")
    e.add_argument("--prefix-cache-hit", type=float, default=dd.prefix_cache_hit,
                   help="fraction of prompt tokens served from the prefix cache")
    e.add_argument("--prefill-chunk", type=int, default=dd.prefill_chunk,
                   help="computed prompt tokens per GPU per prefill forward")
    e.add_argument("--decode-batch", type=int, help="sequences per decode GPU (default: the largest that fits "
                   "and meets --min-user-tps)")
    e.add_argument("--min-user-tps", type=float, default=dd.min_user_tokens_per_s,
                   help="decode SLO: tokens/s per user (0 = none)")
    e.add_argument("--link-efficiency", type=float, default=dd.link_efficiency,
                   help="fraction of NVLink / InfiniBand bandwidth reached")
    e.add_argument("--overlap-efficiency", type=float, default=dd.overlap_efficiency,
                   help="share of min(work, comm) that the other microbatch hides")
    e.add_argument("--usd-per-gpu-hour", type=float, help="a lease price (default: the TCO below)")
    e.add_argument("--input-tokens-per-day", type=float, help="traffic: input tokens per day (cache hits included)")
    e.add_argument("--output-tokens-per-day", type=float, help="traffic: output tokens per day")
    e.add_argument("--prices", help="USD per M tokens input-hit,input-miss,output, e.g. 0.14,0.55,2.19")
    e.add_argument("--reasoning", nargs="+", metavar="NAME:TOKENS:ACCURACY",
                   help="cost per answered question for each reasoning model, per attention variant")
    o = p.add_argument_group("output")
    o.add_argument("--json", action="store_true", help="print JSON instead of a table")
    o.add_argument("--compare", action="store_true", help="attention variants of the same model side by side")
    o.add_argument("--sweep", help=f"plot tokens/s and $/Mtok against one of: {', '.join(SWEEPS)}")
    o.add_argument("--plot", help="PNG path for --sweep (default cost_sweep_<sweep>.png)")
    cost_sparse.add_arguments(p)


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


# ---- deployment mode ---------------------------------------------------------------------------------
DEPLOYMENT_FLAGS = ("scenario", "deployment", "prefill_ep", "decode_ep")


def deployment_from_args(args: argparse.Namespace, sc: Scenario) -> Deployment:
    if args.deployment:
        return load_deployment(args.deployment, sc)
    return Deployment(
        serving=sc,
        prefill=PhasePlan(args.prefill_ep or 1, args.redundant_experts, args.microbatches, args.prefill_scheme),
        decode=PhasePlan(args.decode_ep or 1, args.redundant_experts, args.microbatches, args.decode_scheme),
        gpus_per_node=args.gpus_per_node, prompt_tokens=args.prompt_tokens, prefix_cache_hit=args.prefix_cache_hit,
        prefill_chunk=args.prefill_chunk, decode_batch=args.decode_batch, min_user_tokens_per_s=args.min_user_tps,
        link_efficiency=args.link_efficiency, overlap_efficiency=args.overlap_efficiency,
        usd_per_gpu_hour=args.usd_per_gpu_hour)


def traffic_from_args(args: argparse.Namespace, dep: Deployment) -> tuple[Traffic | None, Prices | None]:
    if args.input_tokens_per_day is None and args.output_tokens_per_day is None:
        if args.prices:
            raise ConfigError("--prices needs traffic: --input-tokens-per-day and/or --output-tokens-per-day")
        return None, None
    inp = args.input_tokens_per_day or 0.0
    traffic = Traffic(inp, inp * dep.prefix_cache_hit, args.output_tokens_per_day or 0.0).validate()
    prices = None
    if args.prices:
        try:
            hit, miss, out = (float(x) for x in args.prices.split(","))
        except ValueError:
            raise ConfigError(f"--prices wants three numbers input-hit,input-miss,output; got {args.prices!r}") from None
        prices = Prices(hit, miss, out)
    return traffic, prices


def phase_table(model: CostModel, f: FleetResult, title: str) -> Table:
    table = Table(title=title)
    table.add_column("per GPU, per step")
    for ph in (f.prefill, f.decode):
        table.add_column(f"{ph.phase} (EP{ph.ep}, {ph.nodes:g} node{'s' if ph.nodes != 1 else ''})",
                         justify="right")

    def line(label: str, cell) -> None:
        table.add_row(label, *[cell(ph) for ph in (f.prefill, f.decode)])

    line("routed expert slots (+ shared) per GPU",
         lambda ph: f"{ph.experts_per_gpu} (+{ph.shared_experts_per_gpu}), {ph.redundant_experts} redundant/unit")
    line("weights per GPU / KV room per GPU",
         lambda ph: f"{fmt_bytes(ph.weight_bytes_per_gpu)} / {fmt_bytes(ph.kv_room_bytes_per_gpu)}")
    line("tokens per GPU per step", lambda ph: (f"{ph.tokens_per_gpu_per_step:,.0f} seq (max {ph.max_batch_per_gpu:,}, "
                                                f"{ph.batch_limited_by})" if ph.phase == "decode"
                                                else f"{ph.tokens_per_gpu_per_step:,.0f} computed"))
    line("tokens per routed expert per layer", lambda ph: f"{ph.tokens_per_expert_per_step:,.1f}")
    line("copies per token per MoE layer: NVLink / IB",
         lambda ph: f"{ph.comm.copies_per_token['nvlink']:.2f} / {ph.comm.copies_per_token['ib']:.2f} ({ph.comm.scheme})")
    line("dispatch (fp8) / combine (bf16) bytes sent",
         lambda ph: f"{fmt_bytes(ph.comm.dispatch_bytes)} / {fmt_bytes(ph.comm.combine_bytes)}")
    line("bytes over NVLink / IB", lambda ph: f"{fmt_bytes(ph.comm.nvlink_bytes)} / {fmt_bytes(ph.comm.ib_bytes)}")
    line("memory time: weights + KV", lambda ph: (f"{fmt_ms(ph.memory_time_s)}: {fmt_ms(ph.memory_time_parts_s['weights'])}"
                                                   f" + {fmt_ms(ph.memory_time_parts_s['kv'])}"))
    line("compute time: matmul + attention",
         lambda ph: (f"{fmt_ms(ph.compute_time_s)}: {fmt_ms(ph.compute_time_parts_s['matmul'])}"
                     f" + {fmt_ms(ph.compute_time_parts_s['attention'])}"))
    line("comm time: NVLink / IB", lambda ph: f"{fmt_ms(ph.comm.nvlink_time_s)} / {fmt_ms(ph.comm.ib_time_s)}")
    line("microbatches; exposed (not overlapped)", lambda ph: f"{ph.microbatches}; {fmt_ms(ph.exposed_time_s)}")
    line("step = max(work, comm) + exposed", lambda ph: f"{fmt_ms(ph.step_s)} ({ph.bound})")
    line("tokens/s per GPU (per node)",
         lambda ph: f"{ph.tokens_per_s_per_gpu:,.0f} ({ph.tokens_per_s_per_node:,.0f})")
    line("tokens/s per user", lambda ph: f"{ph.tokens_per_s_per_user:,.1f}" if ph.tokens_per_s_per_user else "")
    line("USD per million tokens (input / output)",
         lambda ph: f"${f.usd_per_mtok_input:,.3f}" if ph.phase == "prefill" else f"${f.usd_per_mtok_output:,.3f}")
    return table


def fleet_rows(f: FleetResult) -> list[tuple[str, str]]:
    if f.nodes_needed is None:
        return []
    rows = [("nodes: prefill + decode = total",
             f"{f.prefill_nodes:,.1f} + {f.decode_nodes:,.1f} = {f.nodes_needed:,.1f}"),
            ("USD per day", f"${f.usd_per_day:,.0f} at ${f.usd_per_gpu_hour:.2f}/GPU-hour")]
    if f.revenue_per_day is not None:
        rows += [("revenue per day", f"${f.revenue_per_day:,.0f}"), ("cost profit margin", f"{f.margin:.0%}")]
    return rows


def _fmt_pub(key: str, v) -> str:
    if isinstance(v, tuple):
        return f"{v[0]:g}-{v[1]:g}"
    if key == "margin":
        return f"{v:.0%}"
    if key in ("usd_per_day", "revenue_per_day"):
        return f"${v:,.0f}"
    return f"{v:,.1f}" if key in ("nodes_needed", "tokens_per_s_per_user") else f"{v:,.0f}"


def scenario_tables(ps: PublishedScenario, f: FleetResult, diag: dict) -> list[Table]:
    t = Table(title=f"{ps.name}: {ps.title}")
    for c in ("quantity", "predicted", "published", "predicted / published"):
        t.add_column(c, justify="left" if c == "quantity" else "right")
    for row in side_by_side(ps, f):
        t.add_row(row["label"], _fmt_pub(row["key"], row["predicted"]), _fmt_pub(row["key"], row["published"]),
                  f"{row['ratio']:.2f}")
    d = Table(title="where the difference sits (published figures read back through the model; nothing fitted)")
    d.add_column("quantity")
    d.add_column("value", justify="right")
    d.add_row("decode batch per GPU the published figures imply (tok/s per GPU / tok/s per user)",
              f"{diag['implied_decode_batch_per_gpu']:,.1f}")
    d.add_row("model's decode step at that batch: memory / compute / comm",
              f"{fmt_ms(diag['decode_memory_time_at_implied_batch_s'])} / "
              f"{fmt_ms(diag['decode_compute_time_at_implied_batch_s'])} / "
              f"{fmt_ms(diag['decode_comm_time_at_implied_batch_s'])}")
    d.add_row("model's decode step at that batch vs published (1 / tok/s per user)",
              f"{fmt_ms(diag['decode_step_at_implied_batch_s'])} vs {fmt_ms(diag['published_decode_step_s'])}")
    d.add_row("the same step with memory and compute time added, not overlapped",
              fmt_ms(diag["decode_step_no_mem_compute_overlap_s"]))
    if diag["prefill_mfu_matching_published"] is not None:
        d.add_row("MFU at which the compute-bound prefill would match the published figure",
                  f"{diag['prefill_mfu_matching_published']:.2f} (default {ps.deployment.serving.mfu:g})")
    src = Table(title="inputs and their sources")
    src.add_column("input")
    src.add_column("source")
    for k, v in ps.sources.items():
        src.add_row(k, v)
    return [t, d, src]


def reasoning_rows(model: CostModel, dep: Deployment, specs: list[str]) -> tuple[list[ReasoningModel], dict]:
    models = [ReasoningModel.parse(x) for x in specs]
    return models, kv_comparison(model, dep, models)


def reasoning_table(model: CostModel, dep: Deployment, specs: list[str]) -> Table:
    models, rows = reasoning_rows(model, dep, specs)
    table = Table(title=f"cost per answered question: prompt {dep.prompt_tokens:,} tokens, decode at the mean KV "
                        "length prompt + output/2, USD per attempt / accuracy")
    table.add_column("attention")
    for rm in models:
        table.add_column(f"{rm.name}: {rm.output_tokens:,.0f} tok, {rm.accuracy:.1%}", justify="right")
    for variant, costs in rows.items():
        table.add_row(variant, *[
            (f"${c.usd_per_answered * 1e3:,.3f}/1k answered (batch {c.decode_batch_per_gpu}, "
             f"${c.usd_per_mtok_output:,.2f}/M out)") if c else "does not fit" for c in costs])
    return table


def _reasoning_json(model: CostModel, dep: Deployment, args: argparse.Namespace) -> dict:
    if not args.reasoning:
        return {}
    _, rows = reasoning_rows(model, dep, args.reasoning)
    return {"reasoning": {v: [dataclasses.asdict(c) if c else None for c in costs] for v, costs in rows.items()}}


def run_deployment(args: argparse.Namespace, model: CostModel, sc: Scenario, console: Console) -> int:
    if args.scenario:
        ps = get_scenario(args.scenario)
        model, dep = ps.model(), ps.deployment
        f = ps.run()
        diag = diagnostics(ps, f)
        if args.json:
            print(json.dumps({"scenario": ps.name, "predicted": f.to_dict(), "side_by_side": side_by_side(ps, f),
                              "diagnostics": diag, "published": ps.published, "sources": ps.sources,
                              **_reasoning_json(model, dep, args)}, indent=2))
            return 0
        for t in scenario_tables(ps, f, diag)[:2]:
            console.print(t)
        console.print(phase_table(model, f, f"{model.name} on {resolve_gpu(dep.serving.gpu).name}: per phase"))
        console.print(scenario_tables(ps, f, diag)[2])
    else:
        dep = deployment_from_args(args, sc)
        traffic, prices = traffic_from_args(args, dep)
        f = fleet(model, dep, traffic, prices)
        if args.json:
            print(json.dumps({**f.to_dict(), **_reasoning_json(model, dep, args)}, indent=2))
            return 0
        gpu = resolve_gpu(dep.serving.gpu)
        console.print(phase_table(model, f, f"{model.name} on {gpu.name}, {dep.gpus_per_node} per node: context "
                                  f"{dep.serving.context:,}, prompt {dep.prompt_tokens:,}, prefix-cache hit "
                                  f"{dep.prefix_cache_hit:.1%}"))
        rows = fleet_rows(f)
        if rows:
            t = Table(title="fleet for the traffic")
            t.add_column("quantity")
            t.add_column("value", justify="right")
            for k, v in rows:
                t.add_row(k, v)
            console.print(t)
    if args.reasoning:
        console.print(reasoning_table(model, dep, args.reasoning))
    return 0


# ---- entry point -------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    model = load_model(args.preset, args.config)
    sc = scenario_from_args(args)
    gpu = resolve_gpu(sc.gpu)
    setup = f"{model.name} on {sc.gpus} x {gpu.name} ({sc.weight_dtype} weights, {sc.cache_dtype} KV cache)"
    console = Console()
    if any(getattr(args, k) for k in DEPLOYMENT_FLAGS):
        if args.sweep or args.compare:
            raise ConfigError("--sweep and --compare cost one replica; drop the deployment flags to use them")
        return run_deployment(args, model, sc, console)
    dsa = cost_sparse.from_args(args)
    if dsa is not None:
        return cost_sparse.run(args, model, sc, dsa, setup)
    if args.reasoning:
        raise ConfigError("--reasoning needs a deployment: --prefill-ep/--decode-ep, --deployment or --scenario")
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
