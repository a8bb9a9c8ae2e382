"""Batch-1 decode on T threads: the lean step's row-block layout (`decode._blocks`, one bmm per product) against
the one-thread GEMV layout (`decode._kn`, what batch 1 read before) at the same thread count, one process.

The ~100M random-weight MoE of bench/vs_llamacpp.py (`BIG`), one 32-token prompt, greedy, --new tokens; each
round times both sides (order alternating) as decode tokens/s = (new - 1) / (time(new) - time(1)); medians over
--rounds, the ratio, and whether the tokens are identical and how far the log-probs are apart. Run quietly:

    python bench/batch1_threads.py --threads 2
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
from bench.vs_llamacpp import BIG  # noqa: E402
from nanoseek.engine import Engine, decode  # noqa: E402
from nanoseek.model import Transformer  # noqa: E402


def random_big_model(threads: int) -> Transformer:
    """`BIG` with N(0, 0.02) weights (seed 0), torch on `threads` threads (shared with bench/batched_packed.py)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = Transformer(BIG).eval()
    for p in model.parameters():
        if p.dim() > 1:
            p.data.normal_(0, 0.02)
    return model


def timed(engine: Engine, prompt: list[int], new: int):
    t = time.perf_counter()
    out = engine.generate([prompt], max_new_tokens=new)[0]
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    model = random_big_model(args.threads)
    prompt = torch.randint(1, BIG.vocab_size, (32,)).tolist()
    sides = {"one-thread layout": Engine(model, eos_id=-1), "row blocks": Engine(model, eos_id=-1)}
    print(f"operating point: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M-parameter random MoE, batch 1, "
          f"{args.threads} threads, 32-token prompt, {args.new} new tokens greedy, medians of {args.rounds} "
          f"alternating rounds, load average {os.getloadavg()[0]:.2f}, torch {torch.__version__}")
    rates: dict[str, list[float]] = {s: [] for s in sides}
    outs = {}
    for eng in sides.values():
        timed(eng, prompt, 4)  # builds the fused weights and the lean layers
    # the old side: its LeanLayers always build the one-thread layout, whatever the thread count
    old = sides["one-thread layout"]._lean_layers()
    real_gemv = decode.LeanLayers.gemv
    old.gemv = lambda threads=1: real_gemv(old, 1)
    for r in range(args.rounds):
        for name in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
            t_one, _ = timed(sides[name], prompt, 1)
            t_all, outs[name] = timed(sides[name], prompt, args.new)
            rates[name].append((args.new - 1) / (t_all - t_one))
    a, b = (statistics.median(v) for v in rates.values())
    x, y = outs.values()
    diff = max(abs(p - q) for p, q in zip(x.logprobs, y.logprobs))
    print(f"decode tokens/s: one-thread layout {a:.1f} | row blocks {b:.1f} ({b / a:.2f}x); tokens identical: "
          f"{x.tokens == y.tokens}, max |log-prob difference| {diff:.1e}")


if __name__ == "__main__":
    main()
