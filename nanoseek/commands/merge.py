"""`nanoseek merge`: weight-average runs of one architecture into a new run (nanoseek.train.merge).

    nanoseek merge --runs runs/aha/rl runs/aha/short --out runs/merged
    nanoseek merge --runs runs/a runs/b --weights 0.7 0.3 --out runs/merged
"""
from __future__ import annotations

import argparse

from nanoseek.train.merge import merge_runs


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs", nargs="+", required=True, help="run directories to average")
    p.add_argument("--weights", nargs="+", type=float, help="one weight per run (default: equal)")
    p.add_argument("--out", required=True, help="the merged run directory")


def run(args: argparse.Namespace) -> int:
    path = merge_runs(args.runs, args.out, args.weights)
    print(f"merged {len(args.runs)} runs -> {path}")
    return 0
