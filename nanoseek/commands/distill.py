"""`nanoseek distill`: on-policy distillation (student samples, teacher scores every token, reverse KL;
nanoseek.train.distill).

    nanoseek distill --teacher runs/demo/rl --student runs/student_base --task arithmetic --out runs/distill
    nanoseek distill --out runs/distill --resume

The options are DistillConfig's fields (nanoseek.cli_config; of its TrainConfig only --steps, --lr,
--warmup and --seed): on --resume the run's stored config holds, except --steps and --minutes when given.
"""
from __future__ import annotations

import argparse
import dataclasses

from nanoseek.cli_config import ConfigCLI, stored_config
from nanoseek.train.common import TrainConfig
from nanoseek.train.distill import DistillConfig, train_distill

TRAIN_KNOBS = ("steps", "lr", "warmup_steps", "seed")  # the TrainConfig knobs distillation uses
CLI = ConfigCLI(DistillConfig, section="distill", skip=[f"train.{f.name}" for f in dataclasses.fields(TrainConfig)
                                                         if f.name not in TRAIN_KNOBS])


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="run directory (runs/NAME)")
    CLI.add_arguments(p)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")


def run(args: argparse.Namespace) -> int:
    cfg = CLI.resolve(args, stored_config(args.out, DistillConfig, "distill") if args.resume else None)
    if CLI.print_config(args, cfg):
        return 0
    if args.resume:
        s = train_distill(args.out, None, resume=True, device=args.device, steps=cfg.train.steps,
                          budget_s=cfg.budget_s)
    else:
        s = train_distill(args.out, cfg, device=args.device)
    loss = f"{s['loss']:.4f}" if s["loss"] is not None else "-"
    print(f"done: step {s['step']}, reverse KL {loss}, {s['samples_seen']} student samples; run: {s['run_dir']}")
    return 0
