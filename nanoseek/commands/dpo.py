"""`nanoseek dpo`: DPO on preference pairs against the frozen init model (nanoseek.train.dpo).

    nanoseek dpo --init runs/aha/rl --data pairs.jsonl --out runs/dpo --steps 100 --beta 0.1
    nanoseek dpo --init runs/aha/rl --make-pairs 500 --data pairs.jsonl --out runs/dpo   # pairs from the run's samples
    nanoseek dpo --out runs/dpo --resume
"""
from __future__ import annotations

import argparse
from pathlib import Path

from nanoseek import sandbox
from nanoseek.train.dpo import DPOConfig, preference_pairs, train_dpo, write_pairs


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = DPOConfig()
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--init", default="", help="the run to fine-tune; also the frozen reference")
    p.add_argument("--data", default="", help='JSONL of {"prompt", "chosen", "rejected"}')
    p.add_argument("--make-pairs", type=int, default=0, metavar="N",
                   help="first write --data from N train problems: shortest correct vs longest (or wrong) sample")
    p.add_argument("--task", default="arithmetic", help="with --make-pairs")
    p.add_argument("--samples", type=int, default=4, help="with --make-pairs: samples per problem")
    p.add_argument("--max-new-tokens", type=int, default=64, help="with --make-pairs")
    p.add_argument("--beta", type=float, default=d.beta)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--resume", action="store_true")
    sandbox.add_unsafe_argument(p)


def run(args: argparse.Namespace) -> int:
    cfg = DPOConfig(init=args.init, data=args.data, beta=args.beta, lr=args.lr, steps=args.steps,
                    batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed)
    if args.make_pairs and not args.resume:
        sandbox.check_for_task(args.task, args.unsafe_no_sandbox)  # no sandbox: refuse before any work
        pairs = preference_pairs(args.init, args.task, args.make_pairs, args.samples, 1.0, args.max_new_tokens,
                                 args.seed)
        write_pairs(pairs, Path(args.data))
        print(f"{len(pairs)} pairs from {args.make_pairs} problems -> {args.data}")
    s = train_dpo(args.out, cfg, resume=args.resume)
    print(f"done: step {s.get('step')}, loss {s.get('loss', float('nan')):.4f}, margin {s.get('margin', 0):.3f}, "
          f"{s['pairs']} pairs ({s['skipped']} skipped); run: {args.out}")
    return 0
