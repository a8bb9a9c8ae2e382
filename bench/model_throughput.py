"""Training throughput: nanoseek vs transformers' DeepseekV3ForCausalLM on the same configs and weights.

Each config is exported with `to_hf` and loaded by transformers (attn_implementation="sdpa" and its default
experts implementation, printed: `grouped_mm` in transformers 5.x, sort-based grouped GEMMs over stacked expert
weights). One training step = forward + backward + AdamW step (torch.optim.AdamW, the same settings on both
sides), float32, on the CPU, batch x seq random tokens. Both sides optimize the same loss, the main next-token
cross-entropy from the logits: ours via `model.logits(model.hidden(ids))` (MTP off and frozen; transformers has
no MTP training), theirs via `model(ids, use_cache=False).logits` (its default would fill a KV cache in every
training forward, which ours does not). Our MoE still computes its balance-loss statistics in training mode
(not added to the loss), which is our cost, not theirs.

Configs (`--configs`, default all): `tiny` and `small` (presets); `mid192`: 4 layers, dim 192, 16 routed
experts top-4 in 4 groups (2 kept); `mid256`: the same at dim 256; `wide32`: 6 layers, dim 256, 32 experts
top-6 in 8 groups (3 kept), 2 shared, a q LoRA -- added after the speed work, never tuned for.

Rounds alternate between the two sides (and which goes first); the median over rounds of each side's
tokens/s is reported with the ratio ours / transformers, from wall-clock time and, beside it, from this
process's CPU time (`time.process_time`: less sensitive to other processes on a shared machine, though not to
their use of the memory bus). MFU = model FLOPs per token (nanoseek.train.metrics.model_flops_per_token, closed
form) x tokens/s over this machine's peak FP32 matmul rate measured in the same process (best of a few 1024^3
GEMMs on the same threads).

`--compile` adds a third side, `compiled`: a copy of ours (same weights) with `Transformer.compile_training()`
(regional torch.compile of the blocks, dynamic shapes, the MoE dispatch eager); its warm-up step includes the
compile, printed as `compile s` (the first step's seconds minus an eager step's; with a warm inductor cache in
/tmp it is much shorter than cold). transformers is not compiled here (not tried: its MoE forward loops over
experts with data-dependent shapes, and a whole-model compile of it would not be the regional one we use).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nanoseek.config import ModelConfig
from nanoseek.hf import to_hf
from nanoseek.model import Transformer
from nanoseek.train.metrics import model_flops_per_token, peak_matmul_flops

_MID = {"dim": 256, "inter_dim": 512, "moe_inter_dim": 128, "n_layers": 4, "n_dense_layers": 1, "n_heads": 4,
        "n_routed_experts": 16, "n_shared_experts": 1, "n_activated_experts": 4, "n_expert_groups": 4,
        "n_limited_groups": 2, "kv_lora_rank": 128, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16,
        "v_head_dim": 32, "max_seq_len": 256, "original_seq_len": 256}
CONFIGS = {
    "tiny": lambda: ModelConfig.preset("tiny"),
    "small": lambda: ModelConfig.preset("small"),
    "mid192": lambda: ModelConfig(**{**_MID, "dim": 192, "inter_dim": 384, "moe_inter_dim": 96, "n_heads": 3}),
    "mid256": lambda: ModelConfig(**_MID),
    "wide32": lambda: ModelConfig(**{**_MID, "n_layers": 6, "n_routed_experts": 32, "n_activated_experts": 6,
                                     "n_expert_groups": 8, "n_limited_groups": 3, "n_shared_experts": 2,
                                     "moe_inter_dim": 64, "q_lora_rank": 96}),
}


def ours_loss(model: Transformer, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = model.logits(model.hidden(ids))
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def hf_loss(model, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # use_cache=False: the config's default (True) makes every training forward fill a DynamicCache with each
    # layer's keys and values, work that nanoseek's training forward does not do
    logits = model(input_ids=ids, use_cache=False).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def run_steps(loss_fn, model, opt, batches, steps: int) -> tuple[float, float]:
    """Run `steps` training steps; return (tokens/s by wall clock, tokens/s by this process's CPU time)."""
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(steps):
        ids, targets = batches[i % len(batches)]
        loss = loss_fn(model, ids, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    tokens = steps * batches[0][0].numel()
    return tokens / dt, tokens / dc


def profile(name, loss_fn, model, opt, batches, steps: int = 3) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    with tprofile(activities=[ProfilerActivity.CPU]) as prof:
        run_steps(loss_fn, model, opt, batches, steps)
    print(f"\n--- profile: {name} ({steps} steps) ---")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def build(name: str, batch: int, seq: int, compiled: bool = False):
    """(config, {side: (loss_fn, model, optimizer)}, batches, transformers' experts implementation)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = CONFIGS[name]()
    if seq > cfg.max_seq_len:
        sys.exit(f"--seq {seq} exceeds {name}'s max_seq_len {cfg.max_seq_len}")
    ours = Transformer(cfg).train()
    with tempfile.TemporaryDirectory() as d:
        to_hf(ours, d, include_mtp=False)
        hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="sdpa").train()
    for n, p in ours.named_parameters():
        if n.startswith("mtp."):
            p.requires_grad_(False)  # untrained here either way (no gradient); keeps AdamW's work equal
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(4):
        stream = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=g)
        batches.append((stream[:, :-1], stream[:, 1:]))
    with torch.no_grad():
        a, b = ours_loss(ours, *batches[0]).item(), hf_loss(hf, *batches[0]).item()
    assert abs(a - b) < 1e-4 * abs(b), f"{name}: the two models disagree ({a} vs {b}); the comparison is meaningless"
    trainable = [p for p in ours.parameters() if p.requires_grad]
    sides = {"nanoseek": (ours_loss, ours, torch.optim.AdamW(trainable, lr=1e-3)),
             "transformers": (hf_loss, hf, torch.optim.AdamW(hf.parameters(), lr=1e-3))}
    if compiled:
        comp = copy.deepcopy(ours)
        comp.compile_training()
        sides["compiled"] = (ours_loss, comp, torch.optim.AdamW([p for p in comp.parameters() if p.requires_grad],
                                                                lr=1e-3))
    return cfg, sides, batches, getattr(hf.config, "_experts_implementation", "?")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from {', '.join(CONFIGS)}")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3, help="timed training steps per round and side")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch default)")
    ap.add_argument("--profile", action="store_true", help="also print a torch.profiler table for each side")
    ap.add_argument("--compile", action="store_true", help="also time ours under torch.compile (a third side)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        sys.exit(f"unknown config(s) {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
    peak = peak_matmul_flops()
    print(f"float32, CPU, {torch.get_num_threads()} thread(s), batch {args.batch} x seq {args.seq}, {args.rounds} "
          f"rounds x {args.steps} steps per side (medians), measured peak FP32 matmul {peak / 1e9:.1f} GFLOP/s")
    print(f"{'config':<8}{'params':>8}{'MFLOP/tok':>10}{'ours tok/s':>11}{'hf tok/s':>10}{'ratio':>7}"
          f"{'cpu ratio':>10}{'ours MFU':>9}{'hf MFU':>8}  range ours | hf (tok/s)")
    if args.compile:
        print("compiled: nanoseek under torch.compile (tok/s, ratio to transformers, MFU, compile s)")
    for name in names:
        cfg, sides, batches, impl = build(name, args.batch, args.seq, args.compile)
        first: dict[str, float] = {}
        for k, side in sides.items():
            t0 = time.perf_counter()
            run_steps(*side, batches, 1)
            first[k] = time.perf_counter() - t0
            run_steps(*side, batches, args.warmup)
        wall: dict[str, list[float]] = {k: [] for k in sides}
        cpu: dict[str, list[float]] = {k: [] for k in sides}
        for r in range(args.rounds):
            for k in (list(sides) if r % 2 == 0 else list(reversed(sides))):
                w, c = run_steps(*sides[k], batches, args.steps)
                wall[k].append(w)
                cpu[k].append(c)
        flops = model_flops_per_token(cfg, args.seq)
        n_params = sum(p.numel() for p in sides["nanoseek"][1].parameters() if p.requires_grad)
        mo, mh = statistics.median(wall["nanoseek"]), statistics.median(wall["transformers"])
        co, ch = statistics.median(cpu["nanoseek"]), statistics.median(cpu["transformers"])
        print(f"{name:<8}{n_params / 1e6:>7.2f}M{flops / 1e6:>10.2f}{mo:>11.0f}{mh:>10.0f}{mo / mh:>6.2f}x"
              f"{co / ch:>9.2f}x{100 * mo * flops / peak:>8.1f}%{100 * mh * flops / peak:>7.1f}%  "
              f"{min(wall['nanoseek']):.0f}-{max(wall['nanoseek']):.0f} | "
              f"{min(wall['transformers']):.0f}-{max(wall['transformers']):.0f}  (hf experts: {impl})", flush=True)
        if args.compile:
            mc = statistics.median(wall["compiled"])
            cc = statistics.median(cpu["compiled"])
            eager_step = batches[0][0].numel() / mo
            print(f"{'':<8}compiled {mc:>7.0f} tok/s  {mc / mh:.2f}x transformers ({cc / ch:.2f}x cpu), "
                  f"{mc / mo:.2f}x eager ours, MFU {100 * mc * flops / peak:.1f}%, compile "
                  f"{first['compiled'] - eager_step:.0f} s, range {min(wall['compiled']):.0f}-"
                  f"{max(wall['compiled']):.0f}", flush=True)
        if args.profile:
            for k, side in sides.items():
                profile(f"{name} {k}", *side, batches)


if __name__ == "__main__":
    main()
