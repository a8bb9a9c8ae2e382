"""Does a one-row matmul use a second thread? (issue 30: batch-1 decode on 2 threads vs llama.cpp.)

One row times a matrix too big for the caches (default 32000 x 640 float32, 82 MB, like an LM head), timed as
torch does it today (`x @ W^T` with W (N, K), and `x @ Wt` with Wt a contiguous (K, N) copy: the lean step's
batch-1 layout) and as a `bmm` over `threads` row-chunks of W stacked (T, N/T, K), which torch parallelises over
the batch dimension. Sides alternate, medians of rounds, GB/s of weight streamed. Run on a quiet machine:
`python bench/gemv_threads.py` (prints the operating point). Simplification: one shape per run (`--n`, `--k`).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def _time(fn, reps: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=32000)
    ap.add_argument("--k", type=int, default=640)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    n, k = args.n, args.k
    w = torch.randn(n, k)
    wt = w.t().contiguous()
    x = torch.randn(1, k)
    gb = n * k * 4 / 1e9
    print(f"operating point: {n} x {k} float32 ({gb * 1e3:.0f} MB), load average {os.getloadavg()[0]:.2f} on "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}; medians of {args.rounds} alternating rounds x {args.reps}")
    for threads in (1, 2):
        torch.set_num_threads(threads)
        chunks = torch.stack(list(w.chunk(threads))).contiguous()  # (T, N/T, K)
        ref = x @ w.t()
        out = torch.bmm(chunks, x.t().expand(threads, k, 1)).reshape(1, n)
        assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4)
        sides = {"x @ W^T": lambda: x @ w.t(), "x @ Wt (K, N)": lambda: x @ wt,
                 f"bmm over {threads} chunks": lambda: torch.bmm(chunks, x.t().expand(threads, k, 1))}
        times: dict[str, list[float]] = {s: [] for s in sides}
        for _ in range(args.rounds):
            for s, fn in sides.items():
                times[s].append(_time(fn, args.reps))
        base = statistics.median(times["x @ W^T"])
        row = " | ".join(f"{s} {gb / statistics.median(v):.1f} GB/s ({base / statistics.median(v):.2f}x)"
                         for s, v in times.items())
        print(f"{threads} thread(s): {row}")


if __name__ == "__main__":
    main()
