"""Decoding on the same weights and threads: nanoseek's Engine vs llama.cpp (the model exported with
`nanoseek export --gguf`, f32, run through llama.cpp's C API: bench/llamacpp_runner.py).

Two models: a trained run (--run; its checkpoint as is) and a ~100M-parameter MoE with random weights (where the
matrices dominate the step, not the Python overhead). For each, at batch 1, 16 and 64 (llama.cpp: that many
parallel sequences in one context, one KV stream each; nanoseek: one batched `Engine.generate`), both sides
decode greedily from the same prompts (--prompt-len random tokens) for exactly --new tokens, eos ignored:
- generate tokens/s = B * new / time(prefill + new tokens);
- prefill tokens/s  = B * prompt_len / time(prefill + 1 token) (llama.cpp: the prefill batch alone);
- decode tokens/s   = B * (new - 1) / (time(new tokens) - time(1 token)): the per-token steps alone.
llama.cpp runs with its defaults (f16 KV cache, flash attention auto) unless --exact (f32 end to end).
Each round times nanoseek then llama.cpp (or the reverse, alternating by round); medians over --rounds are
printed with the ratio nanoseek / llama.cpp and the operating point (threads, load average, versions). At batch 1
on the trained run, llama.cpp's 64 greedy tokens are checked against nanoseek's (printed, not asserted).

    .venv/bin/python bench/vs_llamacpp.py --run runs/demo/rl            # on a quiet machine, 2 threads each
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.llamacpp_runner import LlamaCpp  # noqa: E402
from nanoseek.config import ModelConfig  # noqa: E402
from nanoseek.engine import Engine  # noqa: E402
from nanoseek.gguf_export import write_gguf  # noqa: E402
from nanoseek.model import Transformer  # noqa: E402
from nanoseek.tokenizer import Tokenizer  # noqa: E402

# ~100M parameters, V3's shape in miniature: MLA with q/kv low rank, 1 dense + 7 MoE layers of 8 routed
# experts (2 active, 4 groups / 2 kept) + 1 shared
BIG = ModelConfig(vocab_size=8192, dim=768, inter_dim=2048, moe_inter_dim=512, n_layers=8, n_dense_layers=1,
                  n_heads=12, n_routed_experts=8, n_shared_experts=1, n_activated_experts=2, n_expert_groups=4,
                  n_limited_groups=2, q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32,
                  v_head_dim=64, max_seq_len=512, original_seq_len=512, n_mtp=0, init_std=0.02)


def ours_time(engine: Engine, prompts: list[list[int]], new: int) -> tuple[float, list[list[int]]]:
    t0 = time.perf_counter()
    out = engine.generate(prompts, max_new_tokens=new)
    dt = time.perf_counter() - t0
    assert all(len(o.tokens) == new for o in out)
    return dt, [o.tokens for o in out]


def theirs_time(llm: LlamaCpp, prompts: list[list[int]], new: int) -> tuple[float, float, list[list[int]]]:
    """(prefill seconds, prefill + new tokens seconds, tokens)."""
    llm.reset()
    t0 = time.perf_counter()
    logits = llm.prefill(prompts)
    t_pre = time.perf_counter() - t0
    out = [[] for _ in prompts]
    for k in range(new):
        nxt = logits.argmax(-1).tolist()
        for o, t in zip(out, nxt):
            o.append(t)
        if k < new - 1:
            logits = llm.step(nxt)
    return t_pre, time.perf_counter() - t0, out


def bench_model(name: str, model: Transformer, tok_file: Path, batches: list[int], prompt_len: int, new: int,
                rounds: int, threads: int, check: bool, exact: bool = False) -> list[dict]:
    model.eval()
    engine = Engine(model, eos_id=-1)
    g = torch.Generator().manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        path = write_gguf(model, tok_file, Path(d) / "m.gguf", verbose=False)
        for B in batches:
            prompts = torch.randint(10, model.cfg.vocab_size, (B, prompt_len), generator=g).tolist()
            llm = LlamaCpp(str(path), n_threads=threads, n_seq=B, n_ctx_seq=prompt_len + new, exact=exact)
            try:
                ours_time(engine, prompts, 2)  # warm both
                theirs_time(llm, prompts, 2)
                o_full, o_one, t_full, t_pre = [], [], [], []
                same = None
                for r in range(rounds):
                    sides = ["ours", "theirs"] if r % 2 == 0 else ["theirs", "ours"]
                    for side in sides:
                        if side == "ours":
                            o_one.append(ours_time(engine, prompts, 1)[0])
                            dt, ours_tok = ours_time(engine, prompts, new)
                            o_full.append(dt)
                        else:
                            t_pre.append(theirs_time(llm, prompts, 1)[0])
                            _, dt, their_tok = theirs_time(llm, prompts, new)
                            t_full.append(dt)
                    if check and r == 0:
                        same = sum(a == b for a, b in zip(ours_tok, their_tok)) / B
            finally:
                llm.close()
            m = statistics.median
            row = {"model": name, "B": B,
                   "gen_ours": B * new / m(o_full), "gen_theirs": B * new / m(t_full),
                   "pre_ours": B * prompt_len / m(o_one), "pre_theirs": B * prompt_len / m(t_pre),
                   "dec_ours": B * (new - 1) / max(m(o_full) - m(o_one), 1e-9),
                   "dec_theirs": B * (new - 1) / max(m(t_full) - m(t_pre), 1e-9), "same": same}
            rows.append(row)
            print(f"{name:>12} B={B:<3} generate {row['gen_ours']:8.1f} vs {row['gen_theirs']:8.1f} tok/s "
                  f"({row['gen_ours'] / row['gen_theirs']:.2f}x) | decode {row['dec_ours']:8.1f} vs "
                  f"{row['dec_theirs']:8.1f} ({row['dec_ours'] / row['dec_theirs']:.2f}x) | prefill "
                  f"{row['pre_ours']:8.1f} vs {row['pre_theirs']:8.1f} ({row['pre_ours'] / row['pre_theirs']:.2f}x)"
                  + (f" | greedy rows identical: {same:.0%}" if same is not None else ""), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", help="a trained run (its latest checkpoint); omitted: the 100M model only")
    ap.add_argument("--no-big", action="store_true", help="skip the ~100M random-weight model")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--exact", action="store_true", help="llama.cpp in f32 end to end (f32 KV cache, no flash "
                    "attention) instead of its defaults (f16 KV cache, flash attention auto)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from bench.llamacpp_runner import _Binding

    binding = _Binding().name
    print(f"operating point: {args.threads} threads each (torch.set_num_threads / llama.cpp n_threads), "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
          f"torch {torch.__version__}, {binding}; prompts {args.prompt_len} tokens, {args.new} new, greedy, "
          f"medians of {args.rounds} alternating rounds; llama.cpp "
          + ("f32 KV cache, no flash attention" if args.exact else "defaults (f16 KV cache, flash attention auto)")
          + "; nanoseek f32 (its latent cache in f32); ratios nanoseek / llama.cpp")
    if args.run:
        from nanoseek.train.checkpoint import load_run_model

        model, _, step = load_run_model(args.run)
        n = model.cfg.param_counts()["total"]
        print(f"trained run {step} ({n / 1e6:.1f}M parameters, MTP not used by either side)")
        bench_model("trained", model, Path(args.run) / "tokenizer.json", args.batches, args.prompt_len, args.new,
                    args.rounds, args.threads, check=True, exact=args.exact)
    if not args.no_big:
        torch.manual_seed(0)
        model = Transformer(BIG)
        print(f"random-weight MoE: {BIG.param_counts()['total'] / 1e6:.0f}M parameters "
              f"({BIG.param_counts()['active'] / 1e6:.0f}M active)")
        with tempfile.TemporaryDirectory() as d:
            tok = Tokenizer.train(["the quick brown fox 0123456789"] * 4, vocab_size=300)
            tok_file = tok.save(Path(d) / "tokenizer.json")
            bench_model("100M-random", model, tok_file, args.batches, args.prompt_len, args.new, args.rounds,
                        args.threads, check=False, exact=args.exact)


if __name__ == "__main__":
    main()
