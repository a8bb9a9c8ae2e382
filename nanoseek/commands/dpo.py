"""`nanoseek dpo`: DPO on preference pairs against the frozen init model (nanoseek.train.dpo).

    nanoseek dpo --init runs/aha/rl --data pairs.jsonl --out runs/dpo --steps 100 --beta 0.1
    nanoseek dpo --init runs/aha/rl --make-pairs 500 --data pairs.jsonl --out runs/dpo   # pairs from the run's samples
    nanoseek dpo --out runs/dpo --resume

The training options are DPOConfig's fields (nanoseek.cli_config): on --resume the run's stored config
holds, except --steps when given. --make-pairs and its options only write the data file first.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from nanoseek.cli_config import ConfigCLI, stored_config
from nanoseek import sandbox
from nanoseek.train.dpo import DPOConfig, preference_pairs, train_dpo, write_pairs

CLI = ConfigCLI(DPOConfig, section="dpo")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="run directory")
    CLI.add_arguments(p)
    p.add_argument("--make-pairs", type=int, default=0, metavar="N",
                   help="first write --data from N train problems: shortest correct vs longest (or wrong) sample")
    p.add_argument("--task", default="arithmetic", help="with --make-pairs")
    p.add_argument("--samples", type=int, default=4, help="with --make-pairs: samples per problem")
    p.add_argument("--max-new-tokens", type=int, default=64, help="with --make-pairs")
    p.add_argument("--resume", action="store_true")
    sandbox.add_unsafe_argument(p)


def run(args: argparse.Namespace) -> int:
    cfg = CLI.resolve(args, stored_config(args.out, DPOConfig, "dpo") if args.resume else None)
    if CLI.print_config(args, cfg):
        return 0
    if args.make_pairs and not args.resume:
        sandbox.check_for_task(args.task, args.unsafe_no_sandbox)  # no sandbox: refuse before any work
        pairs = preference_pairs(cfg.init, args.task, args.make_pairs, args.samples, 1.0, args.max_new_tokens,
                                 cfg.seed)
        write_pairs(pairs, Path(cfg.data))
        print(f"{len(pairs)} pairs from {args.make_pairs} problems -> {cfg.data}")
    s = train_dpo(args.out, cfg, resume=args.resume, steps=cfg.steps)
    print(f"done: step {s.get('step')}, loss {s.get('loss', float('nan')):.4f}, margin {s.get('margin', 0):.3f}, "
          f"{s['pairs']} pairs ({s['skipped']} skipped); run: {args.out}")
    return 0
