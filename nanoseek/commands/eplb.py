"""`nanoseek eplb`: how much EPLB's redundant experts would even out the GPUs of an expert-parallel deployment
of a trained run, from the expert loads its training recorded (metrics.jsonl, moving average).

    nanoseek eplb --run runs/base --gpus 4 --nodes 1 --replicas 12

Per MoE layer: max / mean GPU load with the experts placed contiguously (E / G per GPU, no redundancy), with
EPLB's packing alone (replicas = experts), and with EPLB's `--replicas` physical experts. 1.00 is perfect
balance. The "all layers" row is sum over layers of the max GPU load over sum of the mean (layers run one
after another, so each layer's slowest GPU sets its time).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from nanoseek.config import ConfigError
from nanoseek.parallel.eplb import gpu_loads, identity_plan, rebalance_experts
from nanoseek.parallel.loads import recorded_loads


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="a run directory whose metrics.jsonl recorded expert loads")
    p.add_argument("--gpus", type=int, required=True, help="GPUs of the expert-parallel group")
    p.add_argument("--nodes", type=int, default=1, help="nodes the GPUs sit in (hierarchical policy when they "
                   "divide the expert groups)")
    p.add_argument("--replicas", type=int, required=True, help="physical experts per layer (a multiple of --gpus, "
                   ">= the routed experts)")
    p.add_argument("--alpha", type=float, default=0.1, help="moving-average weight of the newest logged step")


def balance_table(loads: torch.Tensor, gpus: int, nodes: int, replicas: int, groups: int) -> list[dict]:
    """Rows {layer, contiguous, packed, eplb} of max/mean GPU load, plus the all-layers row (layer 'all')."""
    L, E = loads.shape
    if gpus < 1 or nodes < 1 or gpus % nodes:
        raise ConfigError(f"--gpus ({gpus}) must be a positive multiple of --nodes ({nodes})")
    if replicas < E or replicas % gpus:
        raise ConfigError(f"--replicas ({replicas}) must be >= the {E} experts and a multiple of --gpus ({gpus})")
    groups = groups if E % groups == 0 else 1
    plans = {"contiguous": identity_plan(E, L) if E % gpus == 0 else None,
             "packed": rebalance_experts(loads, E, groups, nodes, gpus)[0] if E % gpus == 0 else None,
             "eplb": rebalance_experts(loads, replicas, groups, nodes, gpus)[0]}
    per_gpu = {k: gpu_loads(loads, p, gpus) if p is not None else None for k, p in plans.items()}
    rows = []
    for layer in range(L):
        rows.append({"layer": layer, **{k: None if g is None else (g[layer].max() / g[layer].mean()).item()
                                        for k, g in per_gpu.items()}})
    rows.append({"layer": "all", **{k: None if g is None else (g.max(1).values.sum() / g.mean(1).sum()).item()
                                    for k, g in per_gpu.items()}})
    return rows


def run(args: argparse.Namespace) -> int:
    run_dir = Path(args.run)
    cfg_path = run_dir / "config.json"
    if not cfg_path.exists():
        raise ConfigError(f"no config.json in {run_dir}: is it a run directory?")
    model = json.loads(cfg_path.read_text()).get("model", {})
    loads = recorded_loads(run_dir, args.alpha)
    if loads is None:
        raise ConfigError(f"{run_dir}/metrics.jsonl records no expert loads (a dense model, or no step logged)")
    rows = balance_table(loads, args.gpus, args.nodes, args.replicas, int(model.get("n_expert_groups", 1)))
    E = loads.size(1)
    table = Table(title=f"max / mean GPU load, {E} experts on {args.gpus} GPUs ({args.nodes} node(s)), "
                        f"loads: moving average of {run_dir}/metrics.jsonl")
    for col in ("MoE layer", "contiguous", f"EPLB packed ({E})", f"EPLB {args.replicas} replicas"):
        table.add_column(col, justify="right")

    def fmt(v):
        return "-" if v is None else f"{v:.3f}"

    for r in rows:
        table.add_row(str(r["layer"]), fmt(r["contiguous"]), fmt(r["packed"]), fmt(r["eplb"]))
    Console(width=120).print(table)
    return 0
