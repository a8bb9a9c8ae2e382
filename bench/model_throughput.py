"""Training throughput: nanoseek vs transformers' DeepseekV3ForCausalLM on the same config and weights.

The `tiny` preset is exported with `to_hf` and loaded by transformers (attn_implementation="sdpa"). One
training step = forward + backward + AdamW step, float32, on the CPU, batch x seq random tokens. For
fairness both sides optimize the same loss, the main next-token cross-entropy computed the same way from
the logits: ours via `model.logits(model.hidden(ids))` (MTP off; transformers has no MTP training), theirs
via `model(ids).logits`. Our MoE still computes its balance-loss statistics in training mode (not added to
the loss), which is our cost, not theirs. Rounds alternate between the two (and which goes first); the
median tokens/s of each is reported with the ratio ours / transformers.

`--preset mid16` is a config nobody tuned for: 4 layers, dimension 256, 16 routed experts top-4 in 4 groups
(2 kept, group-limited routing). MFU (model FLOPs utilization) = model FLOPs per token x tokens/s over this
machine's peak matmul rate, measured here as the best of a few 1024^3 FP32 GEMMs on the same threads. Model
FLOPs per token = 6 x (activated parameters without the embedding lookup) + the attention scores and
values: 6 x layers x heads x (qk_head_dim + v_head_dim) x seq / 2 (causal), the usual forward + backward count.
"""
from __future__ import annotations

import argparse
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


MID16 = {"dim": 256, "inter_dim": 512, "moe_inter_dim": 128, "n_layers": 4, "n_dense_layers": 1, "n_heads": 4,
         "n_routed_experts": 16, "n_shared_experts": 1, "n_activated_experts": 4, "n_expert_groups": 4,
         "n_limited_groups": 2, "kv_lora_rank": 128, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16,
         "v_head_dim": 32, "max_seq_len": 256, "original_seq_len": 256}


def model_flops_per_token(cfg: ModelConfig, seq: int) -> float:
    active = cfg.param_counts()["active"] - cfg.vocab_size * cfg.dim  # the embedding is a lookup
    attn = 6 * cfg.n_layers * cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq / 2
    return 6 * active + attn


def peak_matmul_flops(n: int = 1024, reps: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def ours_loss(model: Transformer, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = model.logits(model.hidden(ids))
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def hf_loss(model, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def run_steps(loss_fn, model, opt, batches, steps: int) -> float:
    """Run `steps` training steps, return tokens/s."""
    t0 = time.perf_counter()
    for i in range(steps):
        ids, targets = batches[i % len(batches)]
        loss = loss_fn(model, ids, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    dt = time.perf_counter() - t0
    return steps * batches[0][0].numel() / dt


def profile(name, loss_fn, model, opt, batches, steps: int = 3) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    with tprofile(activities=[ProfilerActivity.CPU]) as prof:
        run_steps(loss_fn, model, opt, batches, steps)
    print(f"\n--- profile: {name} ({steps} steps) ---")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10, help="timed training steps per round and model")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--preset", default="tiny", help="a preset name, or mid16 (see the docstring)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch default)")
    ap.add_argument("--profile", action="store_true", help="also print a torch.profiler table for each side")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = ModelConfig(**MID16) if args.preset == "mid16" else ModelConfig.preset(args.preset)
    if args.seq > cfg.max_seq_len:
        sys.exit(f"--seq {args.seq} exceeds the preset's max_seq_len {cfg.max_seq_len}")
    ours = Transformer(cfg).train()
    with tempfile.TemporaryDirectory() as d:
        to_hf(ours, d, include_mtp=False)
        hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="sdpa").train()

    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(4):
        stream = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=g)
        batches.append((stream[:, :-1], stream[:, 1:]))
    with torch.no_grad():
        a, b = ours_loss(ours, *batches[0]).item(), hf_loss(hf, *batches[0]).item()
    print(f"same weights, same loss before training: ours {a:.6f}  transformers {b:.6f}")
    assert abs(a - b) < 1e-4 * abs(b), "the two models disagree; the comparison would be meaningless"

    sides = {"nanoseek": (ours_loss, ours, torch.optim.AdamW(ours.parameters(), lr=1e-3)),
             "transformers": (hf_loss, hf, torch.optim.AdamW(hf.parameters(), lr=1e-3))}
    for fn, model, opt in sides.values():
        run_steps(fn, model, opt, batches, args.warmup)
    results = {name: [] for name in sides}
    for r in range(args.rounds):
        order = list(sides) if r % 2 == 0 else list(reversed(sides))
        for name in order:
            results[name].append(run_steps(*sides[name], batches, args.steps))

    n_params = sum(p.numel() for n, p in ours.named_parameters() if not n.startswith("mtp."))
    print(f"\npreset {args.preset} ({n_params / 1e6:.2f}M params without MTP), batch {args.batch} x seq {args.seq}, "
          f"float32, CPU, {torch.get_num_threads()} threads, {args.rounds} rounds x {args.steps} steps")
    peak = peak_matmul_flops()
    flops = model_flops_per_token(cfg, args.seq)
    print(f"model FLOPs/token {flops / 1e6:.2f}M, measured peak FP32 matmul {peak / 1e9:.1f} GFLOP/s")
    print(f"{'model':<14}{'median tok/s':>14}{'min':>10}{'max':>10}{'ms/step':>10}{'MFU':>8}")
    med = {}
    for name, xs in results.items():
        med[name] = statistics.median(xs)
        ms = args.batch * args.seq / med[name] * 1000
        mfu = med[name] * flops / peak
        print(f"{name:<14}{med[name]:>14.0f}{min(xs):>10.0f}{max(xs):>10.0f}{ms:>10.1f}{100 * mfu:>7.1f}%")
    print(f"ratio ours / transformers: {med['nanoseek'] / med['transformers']:.2f}x")
    if args.profile:
        for name, side in sides.items():
            profile(name, *side, batches)


if __name__ == "__main__":
    main()
