"""Where one nanoseek GRPO step spends its time, at the demo's operating point.

The demo base (`--init`), the demo's task and difficulty (`DemoConfig`), G 8, 16 prompts, up to 64 new tokens,
the bench's other settings (bench/grpo_vs_trl.py: lr 1e-4, beta 0, micro-batch 64, float32 CPU). Runs
`--warmup` unprofiled steps, then one step under `torch.profiler` and prints (1) a Python-level breakdown of
that step (rollout split into generation and scoring, update with its backward and optimizer step; the
rest of the update is the forward and the no-grad expert-load forward of skipped rows) from `record_function` ranges, and (2) the top ops by self CPU time. Used by docs/grpo_bench.md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nanoseek.commands.demo import DemoConfig
from nanoseek.engine import Engine
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.checkpoint import load_run_model
from nanoseek.train.common import Dist
from nanoseek.train.grpo import GRPOConfig, ProblemSampler, make_optimizer, policy_update, rollout_groups
from nanoseek.train.rl_math import group_advantages


def main() -> None:
    demo = DemoConfig()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--init", required=True, help="nanoseek run directory (the demo base)")
    ap.add_argument("--task", default=demo.task)
    ap.add_argument("--difficulty", type=int, default=demo.difficulty)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--no-skip", dest="skip", action="store_false", help="disable zero-advantage skipping")
    ap.add_argument("--top", type=int, default=20)
    args = ap.parse_args()
    model, _, _ = load_run_model(args.init)
    model = model.float()
    tok = Tokenizer.load(Path(args.init) / "tokenizer.json")
    cfg = GRPOConfig(group_size=8, prompts_per_step=16, max_new_tokens=64, lr=1e-4, mu=1, micro_batch=64,
                     task=args.task, difficulty=args.difficulty, temperature=args.temperature,
                     steps=args.warmup + 1).validate()
    engine, sampler, dist = Engine(model, tok), ProblemSampler(cfg), Dist()
    optimizer = make_optimizer(model, cfg)

    def step(i: int) -> dict:
        with record_function("## rollout (generate + score)"):
            rollouts, st = rollout_groups(engine, sampler, cfg, cfg.prompts_per_step, i, seed=i)
        adv = group_advantages(torch.tensor([r.reward for r in rollouts]), cfg.group_size)
        with record_function("## update"):
            upd = policy_update(model, None, optimizer, rollouts, adv, cfg, dist, first=True,
                                skip_zero_advantage=args.skip)
        return {"zero_adv": int((adv == 0).sum()), "rows": len(rollouts), "rows_trained": upd["rows_trained"],
                "len": sum(st["len"]) / len(st["len"]), "reward": sum(st["reward"]) / len(st["reward"])}

    for i in range(1, args.warmup + 1):
        step(i)
    # label the update's phases without touching the trainer: wrap the methods it calls
    wraps = [(engine, "generate", "## rollout: engine.generate"), (sampler.task, "score_batch", "## rollout: score"),
             (torch.Tensor, "backward", "## update: backward"), (optimizer, "step", "## update: optimizer step")]
    for obj, name, label in wraps:
        fn = getattr(obj, name)

        def wrapped(*a, _fn=fn, _label=label, **kw):
            with record_function(_label):
                return _fn(*a, **kw)
        setattr(obj, name, wrapped)
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        info = step(args.warmup + 1)
    wall = time.perf_counter() - t0
    print(f"one step: {wall:.2f} s under the profiler; {torch.get_num_threads()} threads; task {args.task} difficulty "
          f"{args.difficulty} T {args.temperature}; zero-advantage rows {info['zero_adv']}/{info['rows']} "
          f"(trained {info['rows_trained']}); mean completion {info['len']:.1f} tokens; reward {info['reward']:.3f}")
    events = {e.key: e for e in prof.key_averages() if e.key.startswith("##")}
    total = sum(events[k].cpu_time_total for k in events if k in ("## rollout (generate + score)", "## update"))
    print("Python-level breakdown (CPU time inside each range, profiler on):")
    for k in ("## rollout (generate + score)", "## rollout: engine.generate", "## rollout: score", "## update",
              "## update: backward", "## update: optimizer step"):
        if k in events:
            t = events[k].cpu_time_total
            print(f"  {k[3:]:<28} {t / 1e6:7.3f} s  {100 * t / total:5.1f}%")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=40))


if __name__ == "__main__":
    main()
