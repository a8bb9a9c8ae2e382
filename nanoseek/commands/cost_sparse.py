"""`nanoseek cost --index-topk K`: a V3.2 row (DeepSeek Sparse Attention, nanoseek/tokenomics/sparse.py) beside
the model's own dense-attention row at the same GPUs, dtypes and context.

    nanoseek cost --preset v3-671b --index-topk 2048 --context 131072 --batch 64
"""
from __future__ import annotations

import argparse
import dataclasses
import json

from rich.console import Console
from rich.table import Table

from nanoseek.cli_config import options
from nanoseek.config import ModelConfig
from nanoseek.tokenomics import CostModel, Scenario
from nanoseek.tokenomics.roofline import read_json_object
from nanoseek.tokenomics.sparse import SparseAttentionCost, SparseRow, dense_row, sparse_row


def add_arguments(p: argparse.ArgumentParser) -> None:
    """SparseAttentionCost's knobs as options (generated from its fields)."""
    g = p.add_argument_group("V3.2 row: DeepSeek Sparse Attention (nanoseek/tokenomics/sparse.py)")
    for o in options(SparseAttentionCost):
        g.add_argument(o.flag, dest=o.path, type=o.type, default=None, help=f"{o.knob.help} (default: {o.default})")


def from_args(args: argparse.Namespace) -> SparseAttentionCost | None:
    """The V3.2 row's settings, or None without --index-topk. The indexer's query input is the model's query
    latent (q_lora_rank of the preset or config)."""
    given = {o.path: getattr(args, o.path) for o in options(SparseAttentionCost) if getattr(args, o.path) is not None}
    if not given.get("index_topk"):
        return None
    d = read_json_object(args.config, "model config") if args.config else ModelConfig.preset(args.preset).to_dict()
    return SparseAttentionCost(**given, q_lora_rank=int(d.get("q_lora_rank") or 0))


def table(rows: list[SparseRow], title: str) -> Table:
    t = Table(title=title)
    t.add_column("per token (all layers)")
    for r in rows:
        t.add_column(r.name, justify="right")

    def line(label: str, cell) -> None:
        t.add_row(label, *[cell(r) for r in rows])

    line(f"attention FLOPs, decode @ {rows[0].context:,}", lambda r: f"{r.attention_flops_per_token / 1e9:,.2f} G")
    line("  of which indexer", lambda r: f"{r.indexer_flops_per_token / 1e9:,.2f} G")
    line("attention FLOPs, prefill (mean)", lambda r: f"{r.prefill_attention_flops_per_token / 1e9:,.2f} G")
    line("cache bytes", lambda r: f"{r.cache_bytes_per_token:,}")
    line("  of which indexer keys", lambda r: f"{r.indexer_cache_bytes_per_token:,}")
    line("max concurrent sequences", lambda r: f"{r.max_concurrent_sequences:,}")
    line("batch costed", lambda r: f"{r.batch:,}")
    line("decode tokens/s per GPU", lambda r: f"{r.decode_tokens_per_s:,.0f}")
    line("prefill tokens/s per GPU", lambda r: f"{r.prefill_tokens_per_s:,.0f}")
    line("USD / M output tokens", lambda r: f"${r.usd_per_mtok_output:,.3f}")
    line("USD / M input tokens", lambda r: f"${r.usd_per_mtok_input:,.3f}")
    return t


def run(args: argparse.Namespace, model: CostModel, sc: Scenario, dsa: SparseAttentionCost, setup: str) -> int:
    rows = [dense_row(model, sc), sparse_row(model, sc, dsa)]
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in rows], indent=2))
    else:
        Console().print(table(rows, f"{setup}: context {sc.context:,}, batch <= {sc.batch}"))
    return 0
