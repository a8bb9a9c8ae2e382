"""`nanoseek traces`: rejection sampling of verified-correct traces from a run (nanoseek.train.traces).

    nanoseek traces --run runs/demo/rl --task arithmetic --problems 2000 --samples 4 --out runs/traces.jsonl
    nanoseek traces --run runs/demo/rl --keep shortest --out runs/short.jsonl
"""
from __future__ import annotations

import argparse

from nanoseek import sandbox
from nanoseek.train.traces import KEEP, TracesConfig, rejection_sample


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = TracesConfig()
    p.add_argument("--run", required=True, help="the teacher's run directory")
    p.add_argument("--task", default=d.task)
    p.add_argument("--difficulty", type=int, default=None)
    p.add_argument("--problems", type=int, default=d.problems, help="train-split problems")
    p.add_argument("--samples", type=int, default=d.samples, help="completions per problem (K)")
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--keep", default=d.keep, choices=list(KEEP),
                   help="every distinct correct completion, or only the shortest one per problem")
    p.add_argument("--split", default=d.split, help="only train: traces never come from the test split")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", required=True, help="output JSONL")
    sandbox.add_unsafe_argument(p)


def run(args: argparse.Namespace) -> int:
    sandbox.check_for_task(args.task, args.unsafe_no_sandbox)  # no sandbox: refuse before any work
    cfg = TracesConfig(run=args.run, task=args.task, problems=args.problems, samples=args.samples,
                       temperature=args.temperature, top_p=args.top_p, keep=args.keep, split=args.split,
                       difficulty=args.difficulty, max_new_tokens=args.max_new_tokens, seed=args.seed, out=args.out)
    rejection_sample(cfg)
    return 0
