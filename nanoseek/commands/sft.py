"""`nanoseek sft`: supervised fine-tuning on prompt / completion JSONL (completion-only loss; nanoseek.train.sft).

    nanoseek sft --init runs/demo/base --data traces.jsonl --out runs/sft --epochs 3
    nanoseek sft --preset tiny-dense --tokenizer runs/demo/base --data traces.jsonl --out runs/sft_student
    nanoseek sft --init runs/imported --data chats.jsonl --out runs/sft   # `nanoseek import`: its chat template
    nanoseek sft --out runs/sft --resume            # continue exactly where it stopped
    torchrun --nproc_per_node=2 -m nanoseek.cli sft ...
    torchrun --nproc_per_node=2 -m nanoseek.cli sft ... --ep 2    # routed experts sharded over the 2 ranks

The SFT options are SFTConfig's fields (nanoseek.cli_config): on --resume the run's stored config holds,
except --steps, --minutes, --precision and --compile when given.
"""
from __future__ import annotations

import argparse

from nanoseek.cli_config import ConfigCLI, stored_config
from nanoseek.parallel.training import add_ep_arguments
from nanoseek.train.sft import SFTConfig, train_sft

CLI = ConfigCLI(SFTConfig, skip=("train.log_interval", "train.eval_interval", "train.eval_batches", "train.balance",
                                 "train.aux_alpha", "train.balance_alpha"), section="sft")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="run directory (runs/NAME)")
    CLI.add_arguments(p)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    add_ep_arguments(p)


def run(args: argparse.Namespace) -> int:
    cfg = CLI.resolve(args, stored_config(args.out, SFTConfig, "sft") if args.resume else None)
    if CLI.print_config(args, cfg):
        return 0
    if args.resume:
        t = cfg.train
        summary = train_sft(args.out, None, resume=True, device=args.device, steps=t.steps, minutes=t.minutes,
                            ep=args.ep, ep_redundant=args.ep_redundant, precision=cfg.precision, compile=t.compile)
    else:
        summary = train_sft(args.out, cfg, device=args.device, ep=args.ep, ep_redundant=args.ep_redundant)
    print(f"done: step {summary['step']}, loss {summary['loss']:.4f}, {summary['examples']} examples "
          f"({summary['skipped']} skipped as too long); run: {summary['run_dir']}")
    return 0
