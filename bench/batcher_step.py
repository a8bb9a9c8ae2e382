"""The server's continuous batcher (engine/batcher.py): milliseconds per decode step with its steps on the lean
decode step (`Batcher(lean_decode=True)`, the default) vs on `Transformer.hidden` (`lean_decode=False`).

N requests of random prompts (8-39 tokens, ragged: every row at its own cache slot) are admitted in the first
step, then every step decodes one token for all rows until each has `--new` tokens (eos ignored). Sides
alternate round by round; medians of the per-step means; the tokens of both sides are checked equal. Models:
the tiny preset (the demo's size) and the 107M model of bench/vs_llamacpp.py, random weights.

    OMP_NUM_THREADS=1 python bench/batcher_step.py --configs tiny:16,tiny:1,107m:1,107m:16
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
from nanoseek.config import ModelConfig  # noqa: E402
from nanoseek.engine.batcher import Batcher, Request  # noqa: E402
from nanoseek.model import Transformer  # noqa: E402


def per_step(model: Transformer, prompts: list[list[int]], new: int, lean: bool) -> tuple[float, list[list[int]]]:
    b = Batcher(model, eos_id=-1, max_slots=len(prompts), lean_decode=lean)
    reqs = [b.submit(Request(p, new, ignore_eos=True)) for p in prompts]
    b.step()  # admission + prefill + the first decode
    t0, steps = time.perf_counter(), 0
    while b.rows:
        b.step()
        steps += 1
    return (time.perf_counter() - t0) / steps, [r.tokens for r in reqs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="tiny:16,tiny:1,107m:1,107m:16", help="model:requests, comma-separated")
    ap.add_argument("--new", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.threads} thread(s), load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs, float32, "
          f"{args.new} new tokens per request, medians of {args.rounds} alternating rounds")
    for item in args.configs.split(","):
        name, n = item.split(":")
        cfg = BIG if name == "107m" else ModelConfig.preset("tiny")
        torch.manual_seed(0)
        model = Transformer(cfg).eval()
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(3, cfg.vocab_size, (int(torch.randint(8, 40, (1,), generator=g)),),
                                 generator=g).tolist() for _ in range(int(n))]
        times: dict[bool, list[float]] = {True: [], False: []}
        toks = {}
        for _ in range(args.rounds):
            for lean in (True, False):
                t, toks[lean] = per_step(model, prompts, args.new, lean)
                times[lean].append(t)
        lean_ms, hid_ms = (statistics.median(times[k]) * 1e3 for k in (True, False))
        print(f"{name:>5} {n:>3} requests: lean {lean_ms:7.2f} ms/step, Transformer.hidden {hid_ms:7.2f} ms/step "
              f"({hid_ms / lean_ms:.2f}x); tokens identical: {toks[True] == toks[False]}", flush=True)


if __name__ == "__main__":
    main()
