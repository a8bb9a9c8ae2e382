"""Verifier throughput: proof checks with the warm Coq pool vs one `coqc` per proof, and code / HumanEval / math
checks per second through the sandbox. Both proof paths run the same checks (tactic filter, Qed, Print
Assumptions) in the same sandbox with the same parallelism; rounds are interleaved and medians reported.

    python bench/verifiers.py [--proofs 40] [--coqc-proofs 8] [--rounds 3] [--workers 2]

Run it alone (`flock /tmp/nanoseek-heavy.lock ...` on a shared machine): figures measured beside other jobs
are noisy.
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nanoseek import sandbox  # noqa: E402
from nanoseek.tasks.code import CodeTask, parallel_map  # noqa: E402
from nanoseek.tasks.proof import COQ_LIMITS, LIBRARIES, CoqPool, ProofTask, validate_script  # noqa: E402


def coqc_check(statement: str, script: str) -> bool:
    """The baseline: a fresh coqc (libraries loaded from scratch) for one proof, in the same sandbox."""
    if validate_script(script) is not None:
        return False
    src = (f"{LIBRARIES}\nTheorem nsk_t : {statement}\nProof.\n{script}\nQed.\nPrint Assumptions nsk_t.\n")
    r = sandbox.run_once(["sh", "-c", "cat > p.v && coqc -q p.v"], src.encode(), COQ_LIMITS)
    lines = [ln.strip() for ln in r.stdout.decode("utf-8", "replace").splitlines()
             if ln.strip() and not ln.startswith("Fetching opaque proofs")]
    return r.returncode == 0 and lines[-1:] == ["Closed under the global context"]


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--proofs", type=int, default=40)
    ap.add_argument("--coqc-proofs", type=int, default=8)
    ap.add_argument("--code", type=int, default=40)
    ap.add_argument("--humaneval", type=int, default=20)
    ap.add_argument("--math", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    print(f"sandbox: {sandbox.probe()}")
    rng = random.Random(0)
    ptask = ProofTask()
    problems = [ptask.sample(rng, d) for d in range(1, 6) for _ in range(args.proofs // 5)]
    jobs = [(p.meta["statement"], p.answer) for p in problems]
    pool = CoqPool(args.workers)
    pool.check(jobs[:1])  # start the workers (start-up is paid once per run, not per batch)
    t_start, _ = timed(lambda: CoqPool(args.workers).check(jobs[:1]))
    pool_s, coqc_s = [], []
    for _ in range(args.rounds):
        dt, ok = timed(lambda: pool.check(jobs))
        assert all(ok), "a reference proof failed in the pool"
        pool_s.append(dt / len(jobs))
        sub = jobs[:args.coqc_proofs]
        dt, ok = timed(lambda: parallel_map(lambda j: coqc_check(*j), sub, args.workers))
        assert all(ok), "a reference proof failed under coqc"
        coqc_s.append(dt / len(sub))
    pool.close()
    p_med, c_med = statistics.median(pool_s), statistics.median(coqc_s)
    print(f"\nproof checks ({args.workers} in parallel, medians of {args.rounds} rounds)")
    print(f"  warm pool  : {1 / p_med:6.2f} proofs/s  ({p_med * 1000:6.0f} ms/proof over batches of {len(jobs)}; "
          f"pool start-up {t_start:.1f} s once)")
    print(f"  coqc/proof : {1 / c_med:6.2f} proofs/s  ({c_med * 1000:6.0f} ms/proof over {args.coqc_proofs})")
    print(f"  ratio      : {c_med / p_med:6.1f}x")

    ctask = CodeTask()
    cps = [ctask.sample(rng, d) for d in range(1, 6) for _ in range(args.code // 5)]
    crates = []
    for _ in range(args.rounds):
        dt, ok = timed(lambda: ctask.check_batch(cps, [p.answer for p in cps]))
        assert all(ok)
        crates.append(len(cps) / dt)
    print(f"\ncode checks: {statistics.median(crates):6.1f} checks/s (one sandboxed process per check, "
          f"{len(cps)} per batch)")
    try:
        from nanoseek.tasks.humaneval import HumanEvalTask
        he = HumanEvalTask()
        hps = he.test_set()[:args.humaneval]
        dt, ok = timed(lambda: he.check_batch(hps, [p.answer for p in hps]))
        print(f"humaneval  : {len(hps) / dt:6.1f} checks/s (record + replay: two sandboxed runs per check), "
              f"{sum(ok)}/{len(hps)} canonical solutions pass")
    except Exception as e:  # noqa: BLE001 -- optional dependency
        print(f"humaneval  : skipped ({e})")
    from nanoseek.tasks.math_word import MathPool, MathWordTask
    mpool = MathPool(args.workers)
    mtask = MathWordTask(pool=mpool)
    mps = [mtask.sample(rng, d) for d in range(1, 6) for _ in range(args.math // 5)]
    mtask.check_batch(mps[:1], [mps[0].answer])
    mrates = []
    for _ in range(args.rounds):
        dt, ok = timed(lambda: mtask.check_batch(mps, [p.answer for p in mps]))
        assert all(ok)
        mrates.append(len(mps) / dt)
    mpool.close()
    print(f"math checks: {statistics.median(mrates):6.1f} checks/s (warm math-verify workers)")


if __name__ == "__main__":
    main()
