"""`nanoseek lm` (= `make lm`): tokenizer + tiny MoE language model of real text + held-out bits per byte
(the recipe: nanoseek.recipes.lm). Resumable: rerun the same command after Ctrl-C. The options are LMConfig's
fields (nanoseek.cli_config).

    nanoseek lm                                  # the Python standard library's sources, ~15 min on 2 cores
    nanoseek lm --data ~/my_texts --out runs/mine --minutes 30
    nanoseek lm --until data                     # stop after a stage (data, pretrain, eval, samples)
"""
from __future__ import annotations

import argparse

from nanoseek.cli_config import ConfigCLI
from nanoseek.recipes.lm import STAGES, LMConfig, run_lm

CLI = ConfigCLI(LMConfig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    CLI.add_arguments(p)
    p.add_argument("--until", choices=STAGES, help="stop after this stage")


def run(args: argparse.Namespace) -> int:
    cfg = CLI.resolve(args)
    if CLI.print_config(args, cfg):
        return 0
    run_lm(cfg, args.until)
    return 0
