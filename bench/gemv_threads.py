"""Does a one-row matmul use a second thread? (issue 30: batch-1 decode on 2 threads vs llama.cpp.)

One row times each of `--count` matrices (default 64 of 1024 x 768 float32, 201 MB in all: more than the 32 MB L3,
so every weight comes from DRAM, as in a decode step) in four layouts: `x @ W^T` with W (N, K) (nn.Linear's
order), `x @ Wt` with Wt a contiguous (K, N) copy (the lean step's one-thread batch-1 layout, `decode._kn`), and
one `bmm` over T blocks, row blocks (T, N/T, K) times x^T (`decode._blocks`, the lean step's layout on T threads)
or column blocks (T, K, N/T). torch runs a one-row matmul on one thread whatever `set_num_threads` says; a bmm
splits its batch over the threads. Sides alternate, medians of rounds, GB/s of weight streamed. Run on a quiet
machine: `python bench/gemv_threads.py [--n 8192 --count 8]` (prints the operating point). Simplification: one
shape per run.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--k", type=int, default=768)
    ap.add_argument("--count", type=int, default=64, help="matrices streamed per pass (their total > L3)")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    n, k, count = args.n, args.k, args.count
    gb = count * n * k * 4 / 1e9
    print(f"operating point: {count} matrices of {n} x {k} float32 ({gb * 1e3:.0f} MB streamed per pass), load "
          f"average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs, torch {torch.__version__}; medians of "
          f"{args.rounds} alternating rounds")
    ws = [torch.randn(n, k) for _ in range(count)]
    x = torch.randn(1, k)
    ref = x @ ws[0].t()
    for threads in (1, 2):
        torch.set_num_threads(threads)
        kn = [w.t().contiguous() for w in ws]
        rows = [w.reshape(threads, n // threads, k).contiguous() for w in ws]
        cols = [w.t().reshape(k, threads, n // threads).transpose(0, 1).contiguous() for w in ws]
        xt, xe = x.t().expand(threads, k, 1), x.expand(threads, 1, k)
        assert torch.allclose(torch.bmm(rows[0], xt).view(1, n), ref, rtol=1e-4, atol=1e-4)
        assert torch.allclose(torch.bmm(xe, cols[0]).view(1, n), ref, rtol=1e-4, atol=1e-4)
        sides = {"x @ W^T": lambda: [x @ w.t() for w in ws], "x @ Wt (K, N)": lambda: [x @ w for w in kn],
                 f"bmm {threads} row blocks": lambda: [torch.bmm(w, xt) for w in rows],
                 f"bmm {threads} column blocks": lambda: [torch.bmm(xe, w) for w in cols]}
        times: dict[str, list[float]] = {s: [] for s in sides}
        for fn in sides.values():
            fn()
        for _ in range(args.rounds):
            for s, fn in sides.items():
                t = time.perf_counter()
                fn()
                times[s].append(time.perf_counter() - t)
        base = statistics.median(times["x @ W^T"])
        row = " | ".join(f"{s} {gb / statistics.median(v):.1f} GB/s ({base / statistics.median(v):.2f}x)"
                         for s, v in times.items())
        print(f"{threads} thread(s): {row}")


if __name__ == "__main__":
    main()
