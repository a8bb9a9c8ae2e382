"""`nanoseek info`: a preset's parameter table and, for instantiable sizes, a forward/backward timing."""
from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table

from nanoseek.config import PRESETS, ModelConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny", help=f"one of {', '.join(PRESETS)}")
    p.add_argument("--config", help="a nanoseek model config JSON (overrides --preset)")
    p.add_argument("--time", action="store_true", help="time forward+backward (only for small models)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--list", action="store_true", help="list every preset with its parameter counts")


def preset_table() -> Table:
    """Every preset: kind (MoE or dense), layers, width, total / activated parameters (MTP excluded)."""
    table = Table(title="presets")
    for col in ("preset", "kind", "layers", "dim", "total", "active", "mtp"):
        table.add_column(col, justify="left" if col in ("preset", "kind") else "right")
    for name, cfg in PRESETS.items():
        c = cfg.param_counts()
        kind = f"MoE {cfg.n_activated_experts}/{cfg.n_routed_experts}" if cfg.n_moe_layers else "dense"
        table.add_row(name, kind, str(cfg.n_layers), str(cfg.dim), f"{c['total']:,}", f"{c['active']:,}",
                      f"{c['mtp']:,}")
    return table


def param_table(cfg: ModelConfig, title: str) -> Table:
    counts = cfg.param_counts()
    table = Table(title=title)
    table.add_column("part")
    table.add_column("parameters", justify="right")
    keys = ["embed", "head", "attention_per_layer", "dense_ffn_per_layer", "moe_per_layer", "expert",
            "total", "active", "mtp", "total_with_mtp"]
    if cfg.sparse_attention:  # V3.2's lightning indexer
        keys.insert(3, "indexer_per_layer")
    for key in keys:
        table.add_row(key, f"{counts[key]:,}")
    cache = "KV cache numbers / token / layer" + (" (with the indexer key)" if cfg.sparse_attention else "")
    table.add_row(cache, f"{cfg.kv_cache_numbers_per_token_layer:,}")
    return table


def time_forward_backward(cfg: ModelConfig, batch: int, seq: int, steps: int = 5) -> float:
    """Median seconds of one forward+backward at (batch, seq)."""
    from nanoseek.model import Transformer

    torch.manual_seed(0)
    model = Transformer(cfg)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        _, parts = model(ids, ids.roll(-1, 1))
        (parts.main + 0.3 * parts.mtp + 1e-4 * parts.balance).backward()
        times.append(time.perf_counter() - t0)
    return sorted(times[1:])[len(times[1:]) // 2]


def run(args: argparse.Namespace) -> int:
    if args.list:
        Console().print(preset_table())
        return 0
    cfg = ModelConfig.from_json(args.config) if args.config else ModelConfig.preset(args.preset)
    console = Console()
    console.print(param_table(cfg, args.config or args.preset))
    if args.time:
        if cfg.param_counts()["total_with_mtp"] > 200e6:
            console.print("[yellow]too large to instantiate here; timing skipped[/yellow]")
            return 0
        seq = min(args.seq, cfg.max_seq_len)
        dt = time_forward_backward(cfg, args.batch, seq)
        console.print(f"forward+backward at batch {args.batch} x {seq}: {dt * 1000:.1f} ms "
                      f"({args.batch * seq / dt:,.0f} tokens/s, {torch.get_num_threads()} threads)")
    return 0
