"""Where a batch-1 decode step's time goes, per op shape: achieved GB/s of each matmul shape of the ~100M
bench model (bench/vs_llamacpp.py's `BIG`: dim 768, q_lora 384, 8 routed experts of 512 + 1 shared, vocab 8192)
against a plain `torch.mv` on this machine, and how CPU `_grouped_mm` rounds by rows per group.

Batch-1 decoding is memory-bound: every weight a token touches is read once per token (llama.cpp's 110 tokens/s
on that model's 58M active parameters moves ~25 GB/s on 2 threads). Measured here:
- `--ops`: per weight shape, time and GB/s of torch.mv, F.linear of 1 / 2 / 4 rows on the (N, K) weight (what
  nn.Linear stores) and on the same matrix stored (K, N) (`F.linear(x, w_kn.t())`, MKL's x @ W GEMV: the
  layout engine/decode.py's batch-1 step reads), and of `_grouped_mm` over 3 of 9 stacked experts with 1 or 2
  rows each (the doubled zero-weight pair of the old batch-1 MoE); weights cycle through copies larger than the
  L3 cache, so every call reads from DRAM;
- `--rounding`: whether `_grouped_mm`'s product of a row changes with the rows of its group (1..8 rows vs 64);
- `--step B`: torch.profiler of one lean decode step at batch B of that model: time per op name (matmuls per
  input shape, with their weight bytes and GB/s at batch 1, GFLOP/s beyond), the step's CPU time; `--shared B`
  the same for `Transformer.hidden`'s decode step (`Engine(lean_decode=False)`).

    OMP_NUM_THREADS=1 python bench/decode_ops.py --ops --rounding --shared 1 --step 1 --step 64 --threads 1
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = {  # (N, K): the 107M model's matrices as the lean step multiplies them
    "expert w13 (2I, dim)": (1024, 768), "expert w2 (dim, I)": (768, 512), "[W_DQ; W_DKV] (ql+r+d, dim)": (672, 768),
    "W_UQ (H(nope+d), ql)": (1152, 384), "W_O (dim, H v)": (768, 768), "dense w13 (2I, dim)": (4096, 768),
    "dense w2 (dim, I)": (768, 2048), "head (V, dim)": (8192, 768), "absorbed W_O (dim, H r)": (768, 3072)}


def timeit(fn, ws: list, reps: int = 20) -> float:
    """Best of 3 means of `reps` calls, cycling through the weight copies `ws` (DRAM-resident)."""
    for w in ws[:2]:
        fn(w)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for i in range(reps):
            fn(ws[i % len(ws)])
        best = min(best, (time.perf_counter() - t0) / reps)
    return best


def ops() -> None:
    print("| weight (N, K) | MB | mv | 1 row (N,K) | 1 row (K,N) | 2 rows (N,K) | 2 rows (K,N) | 4 rows (N,K) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (N, K) in SHAPES.items():
        n = max(2, int(160e6 // (4 * N * K)))
        ws = [torch.randn(N, K) for _ in range(n)]
        kn = [w.t().contiguous() for w in ws]
        mb = 4 * N * K / 1e6
        v = torch.randn(K)
        x = {m: torch.randn(m, K) for m in (1, 2, 4)}
        cells = [timeit(lambda w: torch.mv(w, v), ws), timeit(lambda w: F.linear(x[1], w), ws),
                 timeit(lambda w: F.linear(x[1], w.t()), kn), timeit(lambda w: F.linear(x[2], w), ws),
                 timeit(lambda w: F.linear(x[2], w.t()), kn), timeit(lambda w: F.linear(x[4], w), ws)]
        print(f"| {name} ({N}, {K}) | {mb:.1f} | " + " | ".join(f"{t * 1e6:.0f} us, {mb / 1e3 / t:.1f} GB/s"
                                                             for t in cells) + " |", flush=True)
    E, dim, two_i = 9, 768, 1024
    ws = [torch.randn(E, dim, two_i) for _ in range(6)]
    mb = 3 * 4 * dim * two_i / 1e6
    for rows in (1, 2):
        counts = torch.zeros(E, dtype=torch.int32)
        counts[[0, 4, 8]] = rows
        offs = counts.cumsum(0, dtype=torch.int32)
        x = torch.randn(3 * rows, dim)
        t = timeit(lambda w: torch._grouped_mm(x, w, offs=offs), ws)
        print(f"_grouped_mm, 3 of 9 experts (dim, 2I) x {rows} row(s) each: {t * 1e6:.0f} us, {mb / 1e3 / t:.1f} GB/s")


def rounding() -> None:
    torch.manual_seed(0)
    E, K, N = 4, 768, 1024
    w, x = torch.randn(E, K, N), torch.randn(64, K)
    ref = torch._grouped_mm(x, w, offs=torch.full((E,), 64, dtype=torch.int32))
    one = torch._grouped_mm(x[:1], w, offs=torch.full((E,), 1, dtype=torch.int32))[0]
    print("rows in the group: max |row 0 - row 0 of a 64-row group| / max |row 0 - row 0 of a 1-row group|")
    for m in (1, 2, 3, 4, 5, 8):
        out = torch._grouped_mm(x[:m], w, offs=torch.full((E,), m, dtype=torch.int32))
        print(f"  {m}: {(out[0] - ref[0]).abs().max().item():.1e} / {(out[0] - one).abs().max().item():.1e}")


def step(B: int, shared: bool = False, reps: int = 10) -> None:
    """Profile one decode step at batch B: the lean step, or (shared) `Transformer.hidden(absorb=True)` + logits
    as `Engine(lean_decode=False)` runs it (what the 107M model decoded through before it had a lean step)."""
    from torch.profiler import profile

    from bench.vs_llamacpp import BIG
    from nanoseek.engine import Engine, decode
    from nanoseek.model import Transformer

    torch.manual_seed(0)
    model = Transformer(BIG).eval()
    engine = Engine(model, eos_id=-1)
    prompts = torch.randint(10, BIG.vocab_size, (B, 32)).tolist()
    model.prepare_inference(True)
    if shared:
        s = 33
        cache = engine.new_cache(B, s + 1)
        tok = torch.tensor(prompts)
        with torch.no_grad():
            model.hidden(tok, cache=cache, start=0)
            cache[:, :, 32:] = cache[:, :, 31:32]  # slot 32 as if decoded

        def run():
            return model.logits(model.hidden(tok[:, -1:], None, None, cache, s, absorb=True)[:, -1])
    else:
        grab = {}
        real = decode.LeanDecoder.step

        def spy(self, tok, s, pos=None):
            grab.update(dec=self, tok=tok, s=s)
            return real(self, tok, s, pos)

        decode.LeanDecoder.step = spy
        try:
            engine.generate(prompts, max_new_tokens=3)
        finally:
            decode.LeanDecoder.step = real
        model.prepare_inference(True)
        dec, s = grab["dec"], grab["s"]

        def run():
            return dec.step(grab["tok"], s)
    try:
        with torch.no_grad():
            for _ in range(3):
                run()
            cpu = []
            for _ in range(5):
                t0 = time.thread_time()
                for _ in range(reps):
                    run()
                cpu.append((time.thread_time() - t0) / reps)
            with profile(record_shapes=True) as prof:
                for _ in range(reps):
                    run()
    finally:
        model.prepare_inference(False)
    ev = prof.key_averages(group_by_input_shape=True)
    total = sum(e.self_cpu_time_total for e in ev) / reps
    print(f"\n{'Transformer.hidden' if shared else 'lean step'}, batch {B}, slot {s}: step "
          f"{statistics.median(cpu) * 1e3:.2f} ms CPU (unprofiled median), "
          f"ops' self time {total / 1e3:.2f} ms; matmuls by input shape (weight MB read per call, GB/s):")
    mm = [e for e in ev if e.key in ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm")]
    for e in sorted(mm, key=lambda e: -e.self_cpu_time_total)[:14]:
        shapes = e.input_shapes
        wmb = 4 * torch.Size(shapes[1]).numel() / 1e6 if len(shapes) > 1 and shapes[1] else 0.0
        us = e.self_cpu_time_total / e.count
        flop = 2 * torch.Size(shapes[0]).numel() * (shapes[1][-1] if len(shapes) > 1 and shapes[1] else 0)
        rate = (f"{wmb / 1e3 / (us / 1e6):5.1f} GB/s" if B == 1 else f"{flop / 1e3 / us:5.1f} GFLOP/s") if us else ""
        print(f"  {e.key:12s} x{e.count / reps:4.1f}/step {us:8.0f} us/call {e.self_cpu_time_total / reps / 1e3:6.2f} "
              f"ms/step  {str(shapes[:2]):38s} {wmb:5.1f} MB {rate}")
    names: dict[str, float] = {}
    for e in ev:
        names[e.key] = names.get(e.key, 0.0) + e.self_cpu_time_total / reps
    mm_t = sum(names.pop(k, 0.0) for k in ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm",
                                           "aten::_grouped_mm"))
    print(f"  matmuls {mm_t / 1e3:.2f} ms/step; every other op (nested calls included) {sum(names.values()) / 1e3:.2f} "
          f"ms; largest: " + ", ".join(f"{k} {v:.0f} us" for k, v in sorted(names.items(), key=lambda kv: -kv[1])[:6]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", action="store_true", help="GB/s per weight shape and layout")
    ap.add_argument("--rounding", action="store_true", help="_grouped_mm rounding by rows per group")
    ap.add_argument("--step", type=int, action="append", default=[], help="profile a lean step at this batch")
    ap.add_argument("--shared", type=int, action="append", default=[],
                    help="profile Transformer.hidden's decode step (the path without a lean step) at this batch")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.threads} thread(s), load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs, torch "
          f"{torch.__version__}, float32")
    if args.ops:
        ops()
    if args.rounding:
        rounding()
    for b in args.shared:
        step(b, shared=True)
    for b in args.step:
        step(b)


if __name__ == "__main__":
    main()
