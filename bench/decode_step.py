"""Decode speed before vs after, in one process: nanoseek's batched greedy decoding at batch 1 / 16 / 64 on the
tiny preset and a ~100M-parameter config (bench/configs/decode_100m.json), random weights; `--configs 107m`: the
107M model of bench/vs_llamacpp.py (low-rank queries; a `before` whose lean step cannot run it decodes through
`Transformer.hidden`).

Sides (each an `Engine.generate` of exactly --new tokens after a --prompt-len prompt, eos disabled):
  before    the lean decode step as of --before-ref (engine/decode.py loaded from git: the session's start)
  after     the lean decode step now (eager)
  compiled  the lean step now through torch.compile (`Engine(compile_decode=True)`; with --compile only; its
            compile time is printed, and its graphs are compiled before the timed rounds)
Rounds alternate between the sides; each side's median over --rounds is printed as decode tokens/s (wall) and
CPU ms per generated token (process CPU time: the steadier figure on a shared machine), with the ratios to
`before`. All sides are checked to give the same tokens (log-prob max difference printed).

--profile: instead, torch.profiler of one decode step per side, config and batch (slot prompt + 16): ops per
step, and where the CPU time goes: matmuls (linear / mm / bmm / baddbmm outside the MoE), MoE (gate + expert
dispatch + expert matmuls), other ops (norms, rope, softmax, cache writes, embedding), and Python / dispatch
overhead (the step's wall time minus its ops' time). Markdown table, for docs/decode_profile.md.

Quiet rerun (the integrator): `flock /tmp/nanoseek-bench.lock python bench/decode_step.py --compile`.
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from nanoseek.config import ModelConfig  # noqa: E402
from nanoseek.engine import Engine, decode  # noqa: E402
from nanoseek.engine import engine as engine_mod  # noqa: E402
from nanoseek.model import Transformer  # noqa: E402

CONFIGS = {"tiny": lambda: ModelConfig.preset("tiny"),
           "100m": lambda: ModelConfig.from_json(ROOT / "bench" / "configs" / "decode_100m.json"),
           "107m": lambda: __import__("bench.vs_llamacpp", fromlist=["BIG"]).BIG}  # the llama.cpp bench's (q_lora)
MATMUL = {"aten::linear", "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul"}


def _module_at(ref: str, rel: str, name: str) -> types.ModuleType | None:
    """File `rel` as of git `ref` loaded as module `name` (None: the file does not exist at ref)."""
    got = subprocess.run(["git", "-C", str(ROOT), "show", f"{ref}:{rel}"], capture_output=True, text=True)
    if got.returncode != 0:
        return None
    path = Path(tempfile.mkdtemp()) / f"{name}.py"
    path.write_text(got.stdout)
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def load_before(ref: str) -> types.ModuleType:
    """engine/decode.py as of git `ref`, as a module of its own (imports resolve to today's model code), using
    engine/decode_static.py (its MoE dispatch) as of `ref` too where that file exists there."""
    mod = _module_at(ref, "nanoseek/engine/decode.py", "decode_before")
    real = torch.library.custom_op
    # the old file registers today's custom op name again: keep its functions, not the registration
    torch.library.custom_op = lambda *a, **k: (lambda fn: types.SimpleNamespace(register_fake=lambda f: f))
    try:
        static = _module_at(ref, "nanoseek/engine/decode_static.py", "decode_static_before")
    finally:
        torch.library.custom_op = real
    if static is not None and hasattr(mod, "decode_static"):
        mod.decode_static = static
    return mod


class Side:
    """One way of decoding: an Engine plus the decode module its batched loop uses."""

    def __init__(self, name: str, model: Transformer, module, **engine_kw):
        self.name, self.module = name, module
        self.engine = Engine(model, eos_id=-1, **engine_kw)
        self.engine._workspace = module.Workspace()

    def generate(self, prompts: list[list[int]], new: int):
        engine_mod.decode = self.module
        try:
            return self.engine.generate(prompts, max_new_tokens=new)
        finally:
            engine_mod.decode = decode


def before_module(old: types.ModuleType) -> types.SimpleNamespace:
    """The old module behind today's engine call (which passes one more argument: the compile backend)."""
    return types.SimpleNamespace(supported=old.supported, build_layers=lambda model, *a: old.build_layers(model),
                                 Workspace=old.Workspace,
                                 LeanDecoder=lambda *a: old.LeanDecoder(*a[:8]), old=old)


def make_model(name: str) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(CONFIGS[name]()).eval()
    with torch.no_grad():
        for p in model.parameters():  # a non-degenerate model: random weights at a readable scale
            if p.dim() > 1:
                p.normal_(0, 0.05 if name == "tiny" else 0.02)
    return model


def timed(side: Side, prompts, new) -> tuple[float, float]:
    c0, t0 = time.process_time(), time.perf_counter()
    out = side.generate(prompts, new)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert all(len(o.tokens) == new for o in out)
    return wall, cpu


def bench(args, sides_for) -> None:
    load = open("/proc/loadavg").read().split()[:3]
    print(f"float32, CPU, {torch.get_num_threads()} thread(s), prompt {args.prompt_len}, {args.new} new tokens, "
          f"greedy, {args.rounds} rounds alternating, medians; load average {' '.join(load)} at start")
    for cname in args.configs.split(","):
        model = make_model(cname)
        sides = sides_for(model)
        print(f"\n{cname}: {model.num_params() / 1e6:.1f}M parameters")
        print(f"{'batch':>5} {'side':>9} {'tok/s':>9} {'cpu ms/tok':>11} {'x before':>9} {'x cpu':>7}  "
              f"same tokens, max |dlogp|, range tok/s")
        for b in [int(x) for x in args.batches.split(",")]:
            g = torch.Generator().manual_seed(b)
            prompts = torch.randint(3, model.cfg.vocab_size, (b, args.prompt_len), generator=g).tolist()
            ref = sides[0].generate(prompts, args.new)
            check = {}
            for s in sides:  # warm-up (the compiled side compiles here) and the exactness check
                t0 = time.perf_counter()
                out = s.generate(prompts, args.new)
                warm = time.perf_counter() - t0
                same = sum(a.tokens == r.tokens for a, r in zip(out, ref))
                dl = max((abs(p - q) for a, r in zip(out, ref) for p, q in zip(a.logprobs, r.logprobs)), default=0.0)
                check[s.name] = (same, dl, warm)
            res = {s.name: [] for s in sides}
            for _ in range(args.rounds):
                for s in sides:
                    res[s.name].append(timed(s, prompts, args.new))
            base_w = statistics.median(w for w, _ in res[sides[0].name])
            base_c = statistics.median(c for _, c in res[sides[0].name])
            for s in sides:
                w = statistics.median(x for x, _ in res[s.name])
                c = statistics.median(x for _, x in res[s.name])
                toks = [b * args.new / x for x, _ in res[s.name]]
                same, dl, warm = check[s.name]
                extra = f", first call {warm:.1f} s" if s.name == "compiled" else ""
                print(f"{b:>5} {s.name:>9} {b * args.new / w:>9.0f} {c / (b * args.new) * 1e3:>11.3f} "
                      f"{base_w / w:>8.2f}x {base_c / c:>6.2f}x  {same}/{b}, {dl:.1e}, "
                      f"{min(toks):.0f}-{max(toks):.0f}{extra}")
    print(f"\nload average {' '.join(open('/proc/loadavg').read().split()[:3])} at end")


def profile_step(side: Side, prompts, new: int, slot_after: int = 16, steps: int = 10) -> dict:
    """torch.profiler of `steps` repeats of one decode step (the `slot_after`-th of a generate call, rewriting
    the same slot: same values); returns `breakdown`."""
    from torch.profiler import ProfilerActivity, profile, record_function

    mod = side.module.old if hasattr(side.module, "old") else side.module
    cls = mod.LeanDecoder
    real_step, real_moe = cls.step, cls._moe
    out: dict = {}
    calls = [0]

    def moe(self, *a):
        with record_function("moe"):
            return real_moe(self, *a)

    def step(self, tok, s):
        calls[0] += 1
        if calls[0] != slot_after:
            return real_step(self, tok, s)
        for _ in range(3):
            real_step(self, tok, s)  # warm
        walls = []
        for _ in range(5):  # the step's own CPU time, unprofiled (the profiler adds microseconds per op)
            t0 = time.thread_time()
            for _ in range(steps):
                real_step(self, tok, s)
            walls.append((time.thread_time() - t0) * 1e6 / steps)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                with record_function("step"):
                    logits = real_step(self, tok, s)
        out.update(breakdown(prof, steps, statistics.median(walls)))
        return logits

    cls.step, cls._moe = step, moe
    try:
        side.generate(prompts, new)
    finally:
        cls.step, cls._moe = real_step, real_moe
    return out


def breakdown(prof, steps: int, total: float) -> dict:
    """Split a profiled step into ops per step (top-level aten calls, the MoE's included; on the compiled side
    the compiled graph's calls and the ops it calls out to) and CPU microseconds of matmuls (outside the MoE),
    the MoE (gate, dispatch and expert matmuls), other ops, and the rest (Python and dispatch between ops).
    Robust to a shared machine: every op name's time is its median duration times its count (a preempted
    call does not count at its stretched length); `total` is the unprofiled step's CPU time."""
    events = prof.events()
    compiled = any(e.name.startswith("Torch-Compiled Region") for e in events)

    def parent_op(e):
        p = e.cpu_parent
        while p is not None and not p.name.startswith(("aten::", "nanoseek::", "## Call CompiledFxGraph")):
            p = p.cpu_parent
        return p

    by_cat: dict[str, dict[str, list[float]]] = {}
    n_ops = 0
    for e in events:
        if compiled:  # the graph's call (inductor's C++ kernels + wrapper: "other") and what it calls out to
            if e.name.startswith("## Call CompiledFxGraph"):
                cat, t = "other", e.self_cpu_time_total
            elif e.name.startswith(("aten::", "nanoseek::")) and parent_op(e) is not None \
                    and parent_op(e).name.startswith("## Call CompiledFxGraph"):
                cat = "moe" if e.name.startswith("nanoseek::") else "mm" if e.name in MATMUL else "other"
                t = e.cpu_time_total
            elif e.name.startswith("aten::") and parent_op(e) is None:  # outside the graph: the cache writes
                cat, t = "other", e.cpu_time_total
            else:
                continue
        elif e.name.startswith("aten::") and parent_op(e) is None:
            if _under(e, "moe"):
                cat = "moe_mm" if e.name in MATMUL or e.name == "aten::_grouped_mm" else "moe"
            else:
                cat = "mm" if e.name in MATMUL else "other"
            t = e.cpu_time_total
        else:
            continue
        n_ops += 1
        by_cat.setdefault(cat, {}).setdefault(e.name, []).append(t)
    est = {cat: sum(statistics.median(v) * len(v) for v in names.values()) / steps for cat, names in by_cat.items()}
    mm, moe_mm, other = est.get("mm", 0.0), est.get("moe_mm", 0.0), est.get("other", 0.0)
    moe = est.get("moe", 0.0) + moe_mm
    return dict(total=total, ops=n_ops / steps, mm=mm, moe=moe, moe_mm=moe_mm, other=other,
                rest=total - mm - moe - other)


def _under(e, name: str) -> bool:
    p = e.cpu_parent
    while p is not None:
        if p.name == name:
            return True
        p = p.cpu_parent
    return False


def run_profile(args, sides_for) -> None:
    load = open("/proc/loadavg").read().split()[:3]
    print(f"One decode step (slot prompt + 16), microseconds, {torch.get_num_threads()} thread(s), load average "
          f"{' '.join(load)}. step: the median of 5 x 10 unprofiled repeats' thread CPU time; ops: torch.profiler, "
          f"each op name's median duration x its count over 10 repeats (profiler overhead included, ~1 us per op); "
          f"percentages are shares of the ops' time; Python + dispatch: step - ops (negative: "
          f"wall-clock op durations stretched by the load, which the step's CPU time does not count). Medians of "
          f"{args.rounds} such profiles per cell, sides alternating. Compiled side: 'other ops' is the compiled "
          f"graph's own time (inductor's C++ kernels and its wrapper) and the cache writes, MoE the "
          f"nanoseek::lean_moe op, ops counts the graph call and the ops it calls out to\n")
    print("| config | batch | side | ops | step us (CPU) | matmuls (% of op time) | MoE (of which expert matmuls) | "
          "other ops | Python + dispatch |")
    print("|---|---|---|---|---|---|---|---|---|")
    for cname in args.configs.split(","):
        model = make_model(cname)
        sides = sides_for(model)
        for b in [int(x) for x in args.batches.split(",")]:
            g = torch.Generator().manual_seed(b)
            prompts = torch.randint(3, model.cfg.vocab_size, (b, args.prompt_len), generator=g).tolist()
            for s in sides:
                s.generate(prompts, 4)  # compile / warm
            runs: dict[str, list[dict]] = {s.name: [] for s in sides}
            for _ in range(args.rounds):  # sides alternate
                for s in sides:
                    runs[s.name].append(profile_step(s, prompts, 20))
            for s in sides:
                m = {k: statistics.median(r[k] for r in runs[s.name]) for k in runs[s.name][0]}
                t = m["mm"] + m["moe"] + m["other"]

                def pct(v: float) -> str:
                    return f"{v:.0f} ({100 * v / t:.0f}%)"
                print(f"| {cname} | {b} | {s.name} | {m['ops']:.0f} | {m['total']:.0f} | {pct(m['mm'])} | "
                      f"{pct(m['moe'])} ({m['moe_mm']:.0f}) | {pct(m['other'])} | {m['rest']:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="tiny,100m", help=f"comma-separated, of: {', '.join(CONFIGS)}")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: what the engine benches use)")
    ap.add_argument("--before-ref", default="771867e", help="git ref whose engine/decode.py is `before`")
    ap.add_argument("--compile", action="store_true", help="add the compiled side")
    ap.add_argument("--profile", action="store_true", help="profile one step per side instead of timing")
    args = ap.parse_args()
    for c in args.configs.split(","):
        if c not in CONFIGS:
            sys.exit(f"decode_step.py: unknown config {c!r}; choose from {', '.join(CONFIGS)}")
    torch.set_num_threads(args.threads)
    old = before_module(load_before(args.before_ref))

    def sides_for(model):
        sides = [Side("before", model, old), Side("after", model, decode)]
        if args.compile and not decode.absorb_at_runtime(model.cfg):  # the compiled step is absorbed-only
            sides.append(Side("compiled", model, decode, compile_decode=True))
        return sides

    with torch.no_grad():
        (run_profile if args.profile else bench)(args, sides_for)


if __name__ == "__main__":
    main()
