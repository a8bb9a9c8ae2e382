"""Where one nanoseek GRPO step spends its time, at the demo's operating point.

The demo base (`--init`), the demo's task and difficulty (`DemoConfig`), G 8, 16 prompts, up to 64 new tokens,
the bench's other settings (bench/grpo_vs_trl.py: lr 1e-4, beta 0, micro-batch 64, float32 CPU). Runs
`--warmup` unprofiled steps, then one step under `torch.profiler` and prints (1) a Python-level breakdown of
that step (rollout split into generation and scoring, update with its backward and optimizer step; the
rest of the update is the forward and the no-grad expert-load forward of skipped rows) from `record_function` ranges,
(2) the update's work counted both ways (`update_work`: per-row forward vs shared-prompt packs) and (3) the top
ops by self CPU time. `--decode-step`: one batched decode step of that batch, main's path vs engine/decode.py's lean
step (ops per step, time per step, top ops). Used by docs/grpo_bench.md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nanoseek.recipes.demo import DemoConfig
from nanoseek.engine import Engine
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.checkpoint import load_run_model
from nanoseek.train.common import Dist
from nanoseek.train.grpo import GRPOConfig, ProblemSampler, make_optimizer, policy_update, rollout_groups
from nanoseek.train.rl_math import group_advantages


def update_work(rollouts, micro_batch: int, cfg) -> dict:
    """Forward multiply-adds of one update over `rollouts`, two ways: per row (before issue 20's packing: rows
    sorted by length, micro-batches of `micro_batch` rows each cut to its longest row, causal attention over
    each row, the head over every position) and packed (now: shared_prefix.py, one prompt per group, dense
    masked attention over each pack, the head only where a completion token is predicted)."""
    from nanoseek.train.shared_prefix import pack, plan_micro_batches

    m = cfg
    attn = m.dim * m.n_heads * m.qk_head_dim + m.dim * (m.kv_lora_rank + m.qk_rope_head_dim) \
        + m.kv_lora_rank * m.n_heads * (m.qk_nope_head_dim + m.v_head_dim) + m.n_heads * m.v_head_dim * m.dim
    dense = 3 * m.dim * m.inter_dim
    moe = m.n_routed_experts * m.dim + 3 * m.dim * m.moe_inter_dim * (m.n_shared_experts + m.n_activated_experts)
    n_moe = m.n_layers - m.n_dense_layers if m.n_routed_experts else 0
    per_token = m.n_layers * attn + (m.n_layers - n_moe) * dense + n_moe * moe  # trunk MACs per input token
    per_score = m.n_layers * m.n_heads * (m.qk_head_dim + m.v_head_dim)  # q.k and p.v per attended entry
    head = m.vocab_size * m.dim
    lens = sorted(len(r.prompt) + len(r.tokens) for r in rollouts)
    old = {"tokens": 0, "head": 0, "scores": 0}
    for s in range(0, len(lens), micro_batch):
        chunk = lens[s:s + micro_batch]
        w = max(chunk) - 1
        old["tokens"] += len(chunk) * w
        old["head"] += len(chunk) * w
        old["scores"] += len(chunk) * w * (w + 1) // 2
    prompts, comps = [r.prompt for r in rollouts], [r.tokens for r in rollouts]
    new = {"tokens": 0, "head": 0, "scores": 0}
    for mb in plan_micro_batches(list(range(len(rollouts))), prompts, comps, micro_batch):
        p = pack(mb, prompts, comps, "cpu")
        R, N = p.ids.shape
        new["tokens"] += R * N
        new["head"] += int(p.src.numel())
        new["scores"] += R * N * N
    for d in (old, new):
        d["macs"] = d["tokens"] * per_token + d["head"] * head + d["scores"] * per_score
    return {"per_row": old, "packed": new,
            "real_tokens": sum(lens) - len(lens), "completion_tokens": sum(len(c) for c in comps)}


def profile_decode_step(model, tok, cfg, top: int, reps: int = 50) -> None:
    """One batched decode step of a real GRPO batch (16 prompts x G 8, prefilled; slot = longest prompt + 10, all
    128 rows live) two ways: `Transformer.hidden(absorb=True)` + logits (main's step, still the fallback path)
    and engine/decode.py's `LeanDecoder.step`. Prints top-level ops per step, median wall time per step
    (`reps` steps each, alternating) and the top ops by self CPU time."""
    import statistics
    from collections import Counter

    from nanoseek.engine import decode

    sampler = ProblemSampler(cfg)
    prompts = [tok.prompt_ids(p.prompt) for _, p in sampler.draw(cfg.prompts_per_step, 1) for _ in range(cfg.group_size)]
    B, P = len(prompts), max(len(p) for p in prompts)
    S = P + cfg.max_new_tokens
    ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts])
    pad = torch.tensor([P - len(p) for p in prompts])
    slots = torch.arange(S)
    key_valid, positions = slots[None] >= pad[:, None], (slots[None] - pad[:, None]).clamp(min=0)
    s = P + 10
    model.eval()
    model.prepare_inference(True)
    with torch.no_grad():
        cache = torch.zeros(model.cfg.n_layers, B, S, model.cfg.kv_cache_numbers_per_token_layer)
        mask = (torch.ones(P, P, dtype=torch.bool).tril()[None] & key_valid[:, None, :P]) | torch.eye(P, dtype=torch.bool)
        model.hidden(ids, positions[:, :P], mask[:, None], cache, 0)
        cache[:, :, P:s + 1] = cache[:, :, P - 1:P]  # stand-in history for the decoded slots: same shapes, real values
        dec = decode.LeanDecoder(model, decode.build_layers(model), cache[:, :, :s], None, S, key_valid, positions)
        step_tok = torch.tensor([p[-1] for p in prompts])
        paths = {"main: Transformer.hidden": lambda: model.logits(model.hidden(
                     step_tok[:, None], positions[:, s:s + 1], key_valid[:, None, None, :s + 1], cache, s, absorb=True)[:, -1]),
                 "lean: LeanDecoder.step": lambda: dec.step(step_tok, s)}
        times = {k: [] for k in paths}
        for _ in range(reps):
            for k, fn in paths.items():
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
        print(f"one decode step: batch {B}, slot {s} (prompts {P} wide, ragged), {torch.get_num_threads()} threads, "
              f"median of {reps} alternating steps")
        for k, fn in paths.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(10):
                    fn()
            n_top = sum(1 for e in prof.events() if e.cpu_parent is None) // 10
            ev = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
            print(f"  {k:<26} {1e3 * statistics.median(times[k]):6.2f} ms/step   {n_top} top-level ops")
            common = Counter(e.name for e in prof.events() if e.cpu_parent is None).most_common(6)
            print("      most frequent: " + ", ".join(f"{n.replace('aten::', '')} x{c // 10}" for n, c in common))
            print("      top self CPU per step (profiler on): " + ", ".join(
                f"{e.key.replace('aten::', '')} {e.self_cpu_time_total / 1e4:.2f} ms"
                for e in ev[:top]))
    model.prepare_inference(False)


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
    ap.add_argument("--decode-step", action="store_true", help="instead: profile one batched decode step, main's "
                                                                  "path vs the lean decoder (issue 20)")
    args = ap.parse_args()
    model, _, _ = load_run_model(args.init)
    model = model.float()
    tok = Tokenizer.load(Path(args.init) / "tokenizer.json")
    cfg = GRPOConfig(group_size=8, prompts_per_step=16, max_new_tokens=64, lr=1e-4, mu=1, micro_batch=64,
                     task=args.task, difficulty=args.difficulty, temperature=args.temperature,
                     steps=args.warmup + 1).validate()
    if args.decode_step:
        return profile_decode_step(model, tok, cfg, min(args.top, 8))
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
                "work": update_work(rollouts, cfg.micro_batch, model.cfg),
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
    w = info["work"]
    print(f"update work over all {info['rows']} rows ({w['real_tokens']} real input tokens, {w['completion_tokens']} "
          f"predicted): forward multiply-adds per row (padded, causal) -> packed (shared prompt, dense mask)")
    for k in ("tokens", "head", "scores", "macs"):
        a, b = w["per_row"][k], w["packed"][k]
        label = {"tokens": "trunk token positions", "head": "LM-head positions", "scores": "attention entries",
                 "macs": "forward MACs (all)"}[k]
        print(f"  {label:<24} {a:>12,} -> {b:>12,}  ({100 * (b - a) / max(a, 1):+.0f}%)")
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
