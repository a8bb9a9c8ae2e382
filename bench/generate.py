"""Generation throughput: nanoseek Engine vs transformers `generate` on the same weights.

The tiny preset is exported with `to_hf` and loaded by transformers; both decode greedily with the same
prompts (32 random tokens each) for exactly 64 new tokens (eos disabled) at batch 1, 16 and 64.
Rounds alternate between the two and the median of each is reported with the ratio ours / transformers.
Optionally (--spec RUN_DIR) measures MTP speculative vs plain decoding at batch 1 on a trained run.
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nanoseek.config import ModelConfig  # noqa: E402
from nanoseek.engine import Engine  # noqa: E402
from nanoseek.hf import to_hf  # noqa: E402
from nanoseek.model import Transformer  # noqa: E402


def time_ours(engine: Engine, prompts: list[list[int]], new: int) -> float:
    t0 = time.perf_counter()
    out = engine.generate(prompts, max_new_tokens=new)
    dt = time.perf_counter() - t0
    assert all(len(o.tokens) == new for o in out)
    return len(prompts) * new / dt


def time_hf(hf, prompts: list[list[int]], new: int) -> float:
    ids = torch.tensor(prompts)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                          do_sample=False, eos_token_id=None, pad_token_id=0)
    dt = time.perf_counter() - t0
    assert out.shape[1] == ids.shape[1] + new
    return len(prompts) * new / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--check", action="store_true", help="also check both give the same tokens")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny")
    model = Transformer(cfg).eval()
    for p in model.parameters():  # a non-degenerate model: random weights at a readable scale
        if p.dim() > 1:
            p.data.normal_(0, 0.05)
    tmp = tempfile.mkdtemp()
    to_hf(model, tmp, include_mtp=False)
    hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, attn_implementation="sdpa").eval()
    engine = Engine(model, eos_id=-1)
    print(f"tiny preset, float32, CPU, {torch.get_num_threads()} threads, prompt {args.prompt_len}, "
          f"{args.new} new tokens, greedy")
    print(f"{'batch':>5} {'ours tok/s':>11} {'hf tok/s':>10} {'ratio':>7}")
    for b in [int(x) for x in args.batches.split(",")]:
        g = torch.Generator().manual_seed(b)
        prompts = torch.randint(3, cfg.vocab_size, (b, args.prompt_len), generator=g).tolist()
        if args.check:
            ours = [o.tokens for o in engine.generate(prompts, max_new_tokens=args.new)]
            with torch.no_grad():
                theirs = hf.generate(torch.tensor(prompts), max_new_tokens=args.new, do_sample=False,
                                     eos_token_id=None, pad_token_id=0)[:, args.prompt_len:].tolist()
            same = sum(a == t for a, t in zip(ours, theirs))
            print(f"      identical greedy outputs: {same}/{b}")
        time_ours(engine, prompts[:1], 4)
        time_hf(hf, prompts[:1], 4)  # warm-up
        o, h = [], []
        for _ in range(args.rounds):
            o.append(time_ours(engine, prompts, args.new))
            h.append(time_hf(hf, prompts, args.new))
        mo, mh = statistics.median(o), statistics.median(h)
        print(f"{b:>5} {mo:>11.0f} {mh:>10.0f} {mo / mh:>6.2f}x")


if __name__ == "__main__":
    main()
