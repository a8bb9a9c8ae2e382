"""`nanoseek generate`: complete one or more prompts with the engine (latent cache, batched, optional MTP
speculative decoding); prints each completion and the decoding speed."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from nanoseek.engine import Engine
from nanoseek.hf_tokenizer import load_tokenizer
from nanoseek.train.checkpoint import load_run_model


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run directory (runs/NAME)")
    p.add_argument("--prompt", action="append", required=True, help="user message (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--speculative", action="store_true", help="MTP self-speculative decoding")


def load_engine(run: str) -> Engine:
    model, _, _ = load_run_model(run)
    return Engine(model, load_tokenizer(Path(run)))


def run(args: argparse.Namespace) -> int:
    engine = load_engine(args.run)
    prompts = [engine.tokenizer.prompt_ids(p) for p in args.prompt]
    t0 = time.perf_counter()
    outs = engine.generate(prompts, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed,
                           args.stop, speculative=args.speculative)
    dt = time.perf_counter() - t0
    for p, o in zip(args.prompt, outs):
        print(f"> {p}\n{o.text}\n[{len(o.tokens)} tokens, finish: {o.finish_reason}]")
    n = sum(len(o.tokens) for o in outs)
    extra = f", MTP acceptance {engine.spec_stats.acceptance:.0%}" if args.speculative else ""
    print(f"{n} tokens in {dt:.2f}s ({n / dt:,.0f} tokens/s{extra})")
    return 0
