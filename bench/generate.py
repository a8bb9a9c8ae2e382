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


def bench_speculative(run: str, new: int, rounds: int, n_prompts: int = 16) -> None:
    """Batch-1 decoding of held-out task prompts, greedy, plain vs MTP speculative (same outputs)."""
    from nanoseek.evaluate import test_problems
    from nanoseek.tokenizer import Tokenizer
    from nanoseek.train.checkpoint import load_run_model

    model, cfg, _ = load_run_model(run)
    tok = Tokenizer.load(Path(run) / "tokenizer.json")
    task = cfg.get("rl", {}).get("task") or cfg.get("data", {}).get("task", "arithmetic")
    prompts = [tok.prompt_ids(p.prompt) for p in test_problems(task, n_prompts, seed=7)]
    engine = Engine(model, tok)
    plain_t, spec_t, n_tok, same = [], [], 0, True
    engine.generate(prompts[:1], new), engine.generate(prompts[:1], new, speculative=True)  # warm-up
    engine.spec_stats = type(engine.spec_stats)()
    for _ in range(rounds):
        t0 = time.perf_counter()
        plain = [engine.generate([p], new)[0] for p in prompts]
        t1 = time.perf_counter()
        spec = [engine.generate([p], new, speculative=True)[0] for p in prompts]
        t2 = time.perf_counter()
        plain_t.append(t1 - t0)
        spec_t.append(t2 - t1)
        n_tok = sum(len(o.tokens) for o in plain)
        same &= all(a.tokens == b.tokens for a, b in zip(plain, spec))
    mp, ms = statistics.median(plain_t), statistics.median(spec_t)
    st = engine.spec_stats
    print(f"{run}: {n_prompts} held-out {task} prompts, batch 1, greedy, up to {new} new tokens, "
          f"{torch.get_num_threads()} threads")
    print(f"plain       {n_tok / mp:8.1f} tok/s")
    print(f"speculative {n_tok / ms:8.1f} tok/s   acceptance {st.acceptance:.1%} "
          f"({st.accepted}/{st.drafted} drafts), identical outputs: {same}")
    print(f"speedup {mp / ms:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--check", action="store_true", help="also check both give the same tokens")
    ap.add_argument("--spec", metavar="RUN_DIR", help="instead: MTP speculative vs plain decoding at batch 1 "
                                                      "on a trained run's held-out prompts")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: tiny models are overhead-bound)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.spec:
        return bench_speculative(args.spec, args.new, args.rounds)
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
