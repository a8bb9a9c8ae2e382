"""`nanoseek demo`: until the R1-Zero pipeline lands, build every preset's parameter table and time the
tiny model's forward/backward on this machine."""
from __future__ import annotations

import argparse

from rich.console import Console

from nanoseek.commands.info import param_table, time_forward_backward
from nanoseek.config import ModelConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    console = Console()
    for name in ("tiny", "v3-671b"):
        console.print(param_table(ModelConfig.preset(name), name))
    cfg = ModelConfig.preset("tiny")
    dt = time_forward_backward(cfg, 8, 128)
    console.print(f"tiny: forward+backward at 8 x 128 tokens: {dt * 1000:.1f} ms ({8 * 128 / dt:,.0f} tokens/s)")
    return 0
