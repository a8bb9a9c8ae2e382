"""Why on-policy distillation learns little in `nanoseek r1`'s 2-minute arm: throughput and learning rate at
equal wall-clock time (--seconds) or, where the machine's load varies between runs, equal steps (--steps).

For each learning rate given, runs `train_distill` (r1's on-policy arm settings: 32 prompts x 1 sample per step,
T = 1.0, warmup 10, no weight decay, the r1 arm's cosine over the time budget) from the same student base with
the same teacher for the same budget, one after the other in this process, then evaluates each result like r1
(held-out split, pass@1 at T=0.6 / top-p 0.95 and T=1.0 over --eval-samples samples, greedy). Prints, per
learning rate: steps reached, student samples and completion tokens trained on per second, reverse KL of the
first and last 10 steps, and the held-out accuracies. With --sft-run (an r1 SFT arm's run directory) it also
prints that run's rows and completion tokens per second from its metrics, the number the on-policy arm is
compared with.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nanoseek.evaluate import evaluate
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.checkpoint import load_run_model
from nanoseek.train.common import TrainConfig
from nanoseek.train.distill import DistillConfig, train_distill
from nanoseek.train.metrics import read_metrics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--student", required=True)
    ap.add_argument("--lrs", default="5e-4,2e-3,5e-3", help="comma-separated learning rates")
    ap.add_argument("--seconds", type=float, default=120.0, help="wall-clock budget of each run")
    ap.add_argument("--steps", type=int, default=0, help="> 0: a fixed step count per run instead of the budget "
                    "(equal steps ~ equal time at one machine load; use it when the load varies between runs)")
    ap.add_argument("--difficulty", type=int, default=1)
    ap.add_argument("--eval-n", type=int, default=200)
    ap.add_argument("--eval-samples", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--sft-run", default=None, help="an r1 SFT arm run directory, for its rows/s")
    ap.add_argument("--out", default=None, help="where the runs go (default: a temporary folder)")
    args = ap.parse_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="distill_budget_"))
    tok = Tokenizer.load(Path(args.student) / "tokenizer.json")
    rows = []
    for lr in [float(x) for x in args.lrs.split(",")]:
        train = TrainConfig(lr=lr, steps=args.steps or 1_000_000, warmup_steps=10, weight_decay=0.0, seed=args.seed,
                            keep_last=1, bias_gamma=0.0)
        cfg = DistillConfig(teacher=args.teacher, student=args.student, task="arithmetic", difficulty=args.difficulty,
                            prompts_per_step=32, max_new_tokens=64, temperature=1.0, budget_s=0.0 if args.steps else args.seconds,
                            ckpt_every=1000, train=train)
        t0 = time.time()
        res = train_distill(root / f"lr{lr:g}", cfg, quiet=True)
        wall = time.time() - t0
        m = read_metrics(root / f"lr{lr:g}" / "metrics.jsonl")
        model, _, _ = load_run_model(root / f"lr{lr:g}")
        ev = evaluate(model, tok, "arithmetic", args.eval_n, args.eval_samples, 64, seed=1234,
                      difficulty=args.difficulty).to_dict()
        tokens = sum(r["response_len_mean"] * 32 for r in m)
        rows.append({"lr": lr, "steps": res["step"], "seconds": res["elapsed_s"], "wall_s": round(wall, 1),
                     "samples_per_s": res["samples_seen"] / res["elapsed_s"], "tokens_per_s": tokens / res["elapsed_s"],
                     "gen_share": sum(r["gen_s"] for r in m) / sum(r["gen_s"] + r["train_s"] for r in m),
                     "kl_first10": statistics.mean(r["reverse_kl"] for r in m[:10]),
                     "kl_last10": statistics.mean(r["reverse_kl"] for r in m[-10:]),
                     "rollout_acc_last10": statistics.mean(r["accuracy"] for r in m[-10:]), **ev})
        print(json.dumps(rows[-1]), flush=True)
    base, _, _ = load_run_model(args.student)
    b = evaluate(base, tok, "arithmetic", args.eval_n, args.eval_samples, 64, seed=1234, difficulty=args.difficulty)
    print(f"student base: pass@1 T=0.6 {b.pass1:.1%}  T=1.0 {b.pass1_t1:.1%}  greedy {b.greedy:.1%}")
    print(f"{'lr':>8} {'steps':>6} {'s':>6} {'samples/s':>10} {'tokens/s':>9} {'gen %':>6} {'KL first10':>11} "
          f"{'KL last10':>10} {'T=0.6':>7} {'T=1.0':>7} {'greedy':>7}")
    for r in rows:
        print(f"{r['lr']:>8g} {r['steps']:>6} {r['seconds']:>6.0f} {r['samples_per_s']:>10.1f} {r['tokens_per_s']:>9.0f} "
              f"{100 * r['gen_share']:>6.0f} {r['kl_first10']:>11.3f} {r['kl_last10']:>10.3f} {r['pass1']:>7.1%} "
              f"{r['pass1_t1']:>7.1%} {r['greedy']:>7.1%}")
    if args.sft_run:
        sm = read_metrics(Path(args.sft_run) / "metrics.jsonl")
        last = sm[-1]
        toks = sum(r["completion_tokens"] for r in sm)
        print(f"SFT arm {args.sft_run}: {last['step']} steps, {last['examples_seen']} rows in {last['elapsed_s']:.0f} s "
              f"= {last['examples_seen'] / last['elapsed_s']:.1f} rows/s, {toks / last['elapsed_s']:.0f} completion "
              f"tokens/s")


if __name__ == "__main__":
    main()
