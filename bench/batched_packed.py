"""Batched decode: the lean step's matrices in oneDNN's packed layout (`decode._packed`, `LeanLayers.packed`)
against MKL's `F.linear` / `_grouped_mm` on the plain layouts (what batches ran before), one process.

The ~100M random-weight MoE of bench/vs_llamacpp.py (`BIG`), B rows of 32 random prompt tokens, greedy, --new
tokens; each round times both sides (order alternating) as decode tokens/s = B (new - 1) / (time(new) - time(1));
medians over --rounds, the ratio, whether the tokens are identical and how far the log-probs are apart. Run quietly:

    python bench/batched_packed.py --threads 2 --batches 16 64
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.batch1_threads import random_big_model  # noqa: E402
from bench.vs_llamacpp import BIG  # noqa: E402
from nanoseek.engine import Engine  # noqa: E402


def timed(engine: Engine, prompts: list[list[int]], new: int):
    t = time.perf_counter()
    out = engine.generate(prompts, max_new_tokens=new)
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    model = random_big_model(args.threads)
    sides = {"plain (MKL)": Engine(model, eos_id=-1), "packed (oneDNN)": Engine(model, eos_id=-1)}
    print(f"operating point: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M-parameter random MoE, "
          f"{args.threads} threads, 32-token prompts, {args.new} new tokens greedy, medians of {args.rounds} "
          f"alternating rounds, load average {os.getloadavg()[0]:.2f}, torch {torch.__version__}")
    for B in args.batches:
        prompts = torch.randint(1, BIG.vocab_size, (B, 32)).tolist()
        for eng in sides.values():
            timed(eng, prompts, 2)  # builds the fused weights and the lean layers
        plain = sides["plain (MKL)"]._lean_layers()
        plain.packed = lambda plain=plain: (list(plain), None)  # the old batched path: no packing
        rates: dict[str, list[float]] = {s: [] for s in sides}
        outs = {}
        for r in range(args.rounds):
            for name in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
                t_one, _ = timed(sides[name], prompts, 1)
                t_all, outs[name] = timed(sides[name], prompts, args.new)
                rates[name].append(B * (args.new - 1) / (t_all - t_one))
        a, b = (statistics.median(v) for v in rates.values())
        x, y = outs.values()
        same = sum(p.tokens == q.tokens for p, q in zip(x, y))
        diff = max(abs(u - v) for p, q in zip(x, y) if p.tokens == q.tokens for u, v in zip(p.logprobs, q.logprobs))
        print(f"B={B:3d} decode tokens/s: plain {a:.1f} | packed {b:.1f} ({b / a:.2f}x); rows with identical tokens "
              f"{same}/{B}, max |log-prob difference| on those {diff:.1e}")


if __name__ == "__main__":
    main()
