"""`nanoseek sft`: supervised fine-tuning on prompt / completion JSONL (completion-only loss; nanoseek.train.sft).

    nanoseek sft --init runs/demo/base --data traces.jsonl --out runs/sft --epochs 3
    nanoseek sft --preset tiny-dense --tokenizer runs/demo/base --data traces.jsonl --out runs/sft_student
    nanoseek sft --out runs/sft --resume            # continue exactly where it stopped
    torchrun --nproc_per_node=2 -m nanoseek.cli sft ...
    torchrun --nproc_per_node=2 -m nanoseek.cli sft ... --ep 2    # routed experts sharded over the 2 ranks
"""
from __future__ import annotations

import argparse

from nanoseek.config import PRESETS
from nanoseek.parallel.training import add_ep_arguments
from nanoseek.train.precision import PUBLIC as PRECISIONS
from nanoseek.train.common import TrainConfig
from nanoseek.train.sft import SFTConfig, train_sft


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = SFTConfig().train
    p.add_argument("--out", required=True, help="run directory (runs/NAME)")
    p.add_argument("--init", help="a run directory to fine-tune (its latest checkpoint and tokenizer)")
    p.add_argument("--preset", help=f"or a freshly initialised model: {', '.join(PRESETS)} (needs --tokenizer)")
    p.add_argument("--tokenizer", help="tokenizer.json (or a run directory holding one) for --preset")
    p.add_argument("--data", help='JSONL of {"prompt": ..., "completion": ...} rows')
    p.add_argument("--steps", type=int, help=f"optimizer steps (default {d.steps}; on --resume the stored value)")
    p.add_argument("--epochs", type=float, default=0.0, help="passes over the data instead of --steps")
    p.add_argument("--minutes", type=float, help="wall-clock limit of this process (checkpoints and stops)")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup", type=int, default=d.warmup_steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="global examples per micro-batch")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum)
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="longest example in tokens (longer ones are skipped)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--ckpt-interval", type=int, default=d.ckpt_interval)
    p.add_argument("--keep-last", type=int, default=d.keep_last)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", choices=PRECISIONS, help="fp32 (default), bf16 or fp8 (see docs/precision.md); "
                   "on --resume the run's own precision unless given")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the blocks' training forward (docs/speed.md); on --resume the stored choice "
                        "unless given")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    add_ep_arguments(p)


def run(args: argparse.Namespace) -> int:
    if args.resume:
        summary = train_sft(args.out, None, resume=True, device=args.device, steps=args.steps, minutes=args.minutes,
                            ep=args.ep, ep_redundant=args.ep_redundant,
                            precision=args.precision, compile=args.compile)
    else:
        d = SFTConfig().train
        train = TrainConfig(**{**d.to_dict(), "lr": args.lr, "warmup_steps": args.warmup,
                               "batch_size": args.batch_size, "grad_accum": args.grad_accum,
                               "seq_len": args.seq_len, "seed": args.seed, "ckpt_interval": args.ckpt_interval,
                               "keep_last": args.keep_last, "steps": args.steps or d.steps,
                               "minutes": args.minutes or 0.0, "compile": bool(args.compile)})
        cfg = SFTConfig(data=args.data or "", init=args.init, preset=args.preset, tokenizer=args.tokenizer,
                        epochs=args.epochs, train=train, precision=args.precision or "fp32")
        summary = train_sft(args.out, cfg, device=args.device, ep=args.ep, ep_redundant=args.ep_redundant)
    print(f"done: step {summary['step']}, loss {summary['loss']:.4f}, {summary['examples']} examples "
          f"({summary['skipped']} skipped as too long); run: {summary['run_dir']}")
    return 0
