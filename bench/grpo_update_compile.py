"""The GRPO update alone, eager vs `--compile`, on the same real rollouts: seconds per `policy_update`.

One batch of rollouts per round is drawn from the model (the demo's operating point by default: the demo's task and
difficulty, G 8, 16 prompts, <= 64 new tokens, temperature 1.0); then two copies of the same weights, one eager and
one with `Transformer.compile_training()`, each take `policy_update` on that batch (every row trained:
skip_zero_advantage=False), alternating which goes first. The first `--warmup` rounds (the compile, and the
recompile a new shape class may need) are not counted; medians over the rest, ratio eager / compiled. The
losses of the two copies' first update are compared (they start from the same weights on the same batch).
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nanoseek.recipes.demo import DemoConfig
from nanoseek.engine import Engine
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.checkpoint import load_run_model
from nanoseek.train.common import Dist
from nanoseek.train.grpo import GRPOConfig, ProblemSampler, make_optimizer, policy_update, rollout_groups
from nanoseek.train.rl_math import group_advantages


def main() -> None:
    demo = DemoConfig()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--init", required=True, help="nanoseek run directory (e.g. runs/demo/base)")
    ap.add_argument("--rounds", type=int, default=6, help="measured rounds")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--task", default=demo.task)
    ap.add_argument("--difficulty", type=int, default=demo.difficulty)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _, step_dir = load_run_model(args.init)
    model = model.float()
    tok = Tokenizer.load(Path(args.init) / "tokenizer.json")
    cfg = GRPOConfig(task=args.task, difficulty=args.difficulty, steps=args.warmup + args.rounds).validate()
    sides = {"eager": copy.deepcopy(model), "compiled": copy.deepcopy(model)}
    sides["compiled"].compile_training()
    opts = {k: make_optimizer(m, cfg) for k, m in sides.items()}
    engine, sampler, dist = Engine(model, tok), ProblemSampler(cfg), Dist()
    times: dict[str, list[float]] = {k: [] for k in sides}
    first_loss: dict[str, float] = {}
    load0 = os.getloadavg()
    for r in range(args.warmup + args.rounds):
        rollouts, _ = rollout_groups(engine, sampler, cfg, cfg.prompts_per_step, r + 1, seed=r)
        adv = group_advantages(torch.tensor([x.reward for x in rollouts]), cfg.group_size)
        for k in (list(sides) if r % 2 == 0 else list(reversed(sides))):
            t0 = time.perf_counter()
            out = policy_update(sides[k], None, opts[k], rollouts, adv, cfg, dist, first=True, skip_zero_advantage=False)
            dt = time.perf_counter() - t0
            first_loss.setdefault(k, out["loss"])
            if r >= args.warmup:
                times[k].append(dt)
            else:
                print(f"warm-up round {r + 1}: {k} {dt:.2f} s", flush=True)
    load1 = os.getloadavg()
    me, mc = statistics.median(times["eager"]), statistics.median(times["compiled"])
    print(f"model {args.init} ({step_dir.name}); task {args.task} difficulty {args.difficulty}, {cfg.prompts_per_step} "
          f"prompts x G {cfg.group_size}, <= {cfg.max_new_tokens} new tokens; every row trained; float32 CPU, "
          f"{torch.get_num_threads()} thread(s); load average {load0[0]:.1f} before, {load1[0]:.1f} after")
    print(f"first update's loss: eager {first_loss['eager']:.7f}, compiled {first_loss['compiled']:.7f}")
    print("per round (s) eager:   ", " ".join(f"{x:.3f}" for x in times["eager"]))
    print("per round (s) compiled:", " ".join(f"{x:.3f}" for x in times["compiled"]))
    print(f"update median: eager {me:.3f} s, compiled {mc:.3f} s: {me / mc:.2f}x")


if __name__ == "__main__":
    main()
