"""`nanoseek distill`: on-policy distillation (student samples, teacher scores every token, reverse KL;
nanoseek.train.distill).

    nanoseek distill --teacher runs/demo/rl --student runs/student_base --task arithmetic --out runs/distill
    nanoseek distill --out runs/distill --resume
"""
from __future__ import annotations

import argparse

from nanoseek.train.common import TrainConfig
from nanoseek.train.distill import DistillConfig, train_distill


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = DistillConfig()
    p.add_argument("--teacher", help="the teacher's run directory")
    p.add_argument("--student", help="the student's run directory (its latest checkpoint starts the run)")
    p.add_argument("--task", default=d.task)
    p.add_argument("--difficulty", type=int, default=None)
    p.add_argument("--out", required=True, help="run directory (runs/NAME)")
    p.add_argument("--steps", type=int, help=f"optimizer steps (default {d.train.steps})")
    p.add_argument("--minutes", type=float, default=0.0, help="wall-clock budget of the run (lr follows it)")
    p.add_argument("--prompts-per-step", type=int, default=d.prompts_per_step)
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--lr", type=float, default=d.train.lr)
    p.add_argument("--warmup", type=int, default=d.train.warmup_steps)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ckpt-every", type=int, default=d.ckpt_every)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")


def run(args: argparse.Namespace) -> int:
    budget = args.minutes * 60 if args.minutes else None
    if args.resume:
        s = train_distill(args.out, None, resume=True, device=args.device, steps=args.steps, budget_s=budget)
    else:
        d = DistillConfig()
        train = TrainConfig(**{**d.train.to_dict(), "lr": args.lr, "warmup_steps": args.warmup, "seed": args.seed,
                               "steps": args.steps or d.train.steps})
        cfg = DistillConfig(teacher=args.teacher or "", student=args.student or "", task=args.task,
                            difficulty=args.difficulty, prompts_per_step=args.prompts_per_step,
                            max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            ckpt_every=args.ckpt_every, budget_s=budget or 0.0, train=train)
        s = train_distill(args.out, cfg, device=args.device)
    loss = f"{s['loss']:.4f}" if s["loss"] is not None else "-"
    print(f"done: step {s['step']}, reverse KL {loss}, {s['samples_seen']} student samples; run: {s['run_dir']}")
    return 0
