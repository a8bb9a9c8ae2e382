"""`nanoseek r1` (= `make r1`): the R1 pipeline after the demo, distillation vs RL on a dense student (the recipe:
nanoseek.recipes.r1). Resumable: rerun the same command after Ctrl-C. The options are R1Config's fields
(nanoseek.cli_config).

    nanoseek r1                          # runs/demo first where it holds no finished demo
    nanoseek r1 --until traces           # stop after a stage (student_base, ..., arm_rl, ..., curves, samples)
"""
from __future__ import annotations

import argparse

from nanoseek.cli_config import ConfigCLI
from nanoseek.recipes.r1 import STAGES, R1Config, run_r1

CLI = ConfigCLI(R1Config)


def add_arguments(p: argparse.ArgumentParser) -> None:
    CLI.add_arguments(p)
    p.add_argument("--until", choices=STAGES, help="stop after this stage (rerun without it to continue)")


def run(args: argparse.Namespace) -> int:
    cfg = CLI.resolve(args, rebase=(lambda c: R1Config.smoke_config(c.out, c.demo, c.seed)) if args.smoke else None)
    if CLI.print_config(args, cfg):
        return 0
    run_r1(cfg, args.until)
    return 0
