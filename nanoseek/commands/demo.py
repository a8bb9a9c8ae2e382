"""`nanoseek demo` (= `make demo`): R1-Zero from nothing to a reasoning model on this machine (the recipe:
nanoseek.recipes.demo). Resumable: rerun the same command after Ctrl-C. The options are DemoConfig's fields
(nanoseek.cli_config).

    nanoseek demo                        # ~15 min on 2 cores
    nanoseek demo --until eval_base      # stop after a stage (pretrain_base, eval_base, grpo_and_control, ...)
    nanoseek demo --smoke --out /tmp/d   # seconds: every stage at toy scale
"""
from __future__ import annotations

import argparse

from nanoseek.cli_config import ConfigCLI
from nanoseek.recipes.demo import STAGES, DemoConfig, run_demo

CLI = ConfigCLI(DemoConfig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    CLI.add_arguments(p)
    p.add_argument("--smoke", action="store_true", help="a seconds-long run of every stage (for tests); options "
                   "given apply on top")
    p.add_argument("--until", choices=STAGES, help="stop after this stage (rerun without it to continue)")


def run(args: argparse.Namespace) -> int:
    cfg = CLI.resolve(args, rebase=(lambda c: DemoConfig.smoke(c.out, c.seed)) if args.smoke else None)
    if CLI.print_config(args, cfg):
        return 0
    run_demo(cfg, args.until)
    return 0
