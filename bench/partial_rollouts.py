"""Partial rollouts (Kimi k1.5 arXiv 2501.12599 sec. 2.6.2) against ordinary GRPO: seconds per RL step and
accuracy when response lengths vary widely (issue 14 item 5; docs/long_reasoning.md).

From one run (`--init`, e.g. an `nanoseek aha` RL model), both arms run `--steps` GRPO steps with the aha
settings (G 8 x 16 prompts, T 0.7, lr 1e-4, routing bias frozen) and a high total budget (`--budget`, 192 new
tokens): (a) ordinary GRPO, every step generates each response to its end or the budget; (b)
`--partial-rollout-tokens N`, every step generates at most N new tokens per trajectory and carries the rest.
Rounds alternate the order of the arms and use seed = round; both arms of a round see the same seed. Per arm
and round: median seconds per step (generation + update, from metrics.jsonl), total seconds, generated tokens
per step, the longest response, the truncated share, rollout accuracy of the last half of the steps, and
held-out pass@1 (T=0.6, top-p 0.95) of the final model. Printed: medians over rounds and the ratio
ordinary / partial. The real training code runs (nanoseek.train.grpo.train_grpo), in one thread.
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
from nanoseek.engine import Engine  # noqa: E402
from nanoseek.evaluate import score_batch, test_problems  # noqa: E402
from nanoseek.tasks import get_task  # noqa: E402
from nanoseek.tokenizer import Tokenizer  # noqa: E402
from nanoseek.train.checkpoint import load_run_model  # noqa: E402
from nanoseek.train.grpo import GRPOConfig, train_grpo  # noqa: E402
from nanoseek.train.metrics import read_metrics  # noqa: E402


def arm(init: Path, out: Path, args, partial: int, seed: int) -> dict:
    cfg = GRPOConfig(task="arithmetic", difficulty=args.difficulty, steps=args.steps, group_size=8,
                     prompts_per_step=16, max_new_tokens=args.budget, lr=1e-4, seed=seed, ckpt_every=args.steps,
                     bias_update=False, bias_gamma=0.0, temperature=0.7, partial_rollout_tokens=partial)
    t0 = time.perf_counter()
    train_grpo(init, out, cfg, device="cpu", quiet=True)
    wall = time.perf_counter() - t0
    rows = read_metrics(out / "metrics.jsonl")
    half = rows[len(rows) // 2:]
    model, _, _ = load_run_model(out)
    engine = Engine(model, Tokenizer.load(out / "tokenizer.json"))
    problems = test_problems("arithmetic", args.eval_n, seed=1234, difficulty=args.difficulty)
    acc, _, lens = score_batch(engine, get_task("arithmetic"), problems, 2, args.budget, 0.6, 0.95, 1235)
    return {"s_per_step": statistics.median(r["gen_s"] + r["train_s"] for r in rows),
            "gen_s_per_step": statistics.median(r["gen_s"] for r in rows), "train_wall_s": wall,
            "gen_tokens_per_step": statistics.mean(r.get("gen_tokens", r["response_len_mean"] * 128) for r in rows),
            "max_len": max(r["response_len_max"] for r in rows),
            "truncated": statistics.mean(r["truncated"] for r in rows),
            "rollout_acc_last_half": statistics.mean(r["accuracy"] for r in half),
            "groups_per_step": statistics.mean(r["groups_trained"] for r in rows),
            "heldout_pass1": sum(acc) / len(acc), "heldout_len": sum(lens) / len(lens)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--init", required=True, help="nanoseek run directory (e.g. runs/aha/rl)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--budget", type=int, default=192, help="total new tokens per response (both arms)")
    ap.add_argument("--partial-rollout-tokens", type=int, default=32)
    ap.add_argument("--difficulty", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--eval-n", type=int, default=100)
    ap.add_argument("--json", help="write the per-round results here")
    args = ap.parse_args()
    arms = {"ordinary": 0, f"partial N={args.partial_rollout_tokens}": args.partial_rollout_tokens}
    res: dict[str, list[dict]] = {k: [] for k in arms}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = list(arms) if r % 2 == 0 else list(arms)[::-1]
            for name in order:
                out = Path(tmp) / f"{r}_{arms[name]}"
                res[name].append(arm(Path(args.init), out, args, arms[name], seed=r + 1))
                x = res[name][-1]
                print(f"round {r + 1} {name:>14}: {x['s_per_step']:.2f} s/step, {x['max_len']} max tokens, "
                      f"truncated {x['truncated']:.1%}, rollout acc {x['rollout_acc_last_half']:.1%}, "
                      f"held-out pass@1 {x['heldout_pass1']:.1%}", flush=True)
    med = {k: {m: statistics.median(x[m] for x in v) for m in v[0]} for k, v in res.items()}
    keys = [("s_per_step", "s / step", "{:.2f}"), ("gen_s_per_step", "generation s / step", "{:.2f}"),
            ("gen_tokens_per_step", "tokens generated / step", "{:.0f}"), ("max_len", "longest response", "{:.0f}"),
            ("truncated", "truncated", "{:.1%}"), ("groups_per_step", "groups trained / step", "{:.1f}"),
            ("rollout_acc_last_half", "rollout accuracy (last half)", "{:.1%}"),
            ("heldout_pass1", "held-out pass@1 T=0.6", "{:.1%}"), ("heldout_len", "held-out mean length", "{:.1f}")]
    a, b = list(arms)
    print(f"\nmedians of {args.rounds} rounds, {args.steps} steps each, budget {args.budget} tokens, from {args.init}")
    print(f"| metric | {a} | {b} |\n|---|---|---|")
    for k, label, fmt in keys:
        print(f"| {label} | {fmt.format(med[a][k])} | {fmt.format(med[b][k])} |")
    print(f"\nordinary / partial seconds per step: {med[a]['s_per_step'] / med[b]['s_per_step']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rounds": res, "medians": med}, indent=2) + "\n")


if __name__ == "__main__":
    main()
