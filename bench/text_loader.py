"""Training tokens/s with `--data` (rows memory-mapped from token shards) against `--task` (rows in memory) at the
same shapes: the loader must never be the bottleneck (issue 26).

One process, one model preset, the same batch and sequence length; the two sides alternate step blocks (A B A B
...) so drift in the machine's speed hits both alike; each side's tokens/s is the median over blocks. Also the
loader alone: microseconds to fetch one batch from each kind of rows.

    python bench/text_loader.py                       # tiny preset, batch 16 x 256, stdlib text, 2 threads
    python bench/text_loader.py --rounds 7 --steps 20 --json out.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanoseek.config import ModelConfig  # noqa: E402
from nanoseek.data import Loader, TokenRows, pack_documents  # noqa: E402
from nanoseek.model import Transformer  # noqa: E402
from nanoseek.train.common import Dist, TrainConfig, build_optimizer  # noqa: E402
from nanoseek.train.pretrain import train_step  # noqa: E402


def task_rows(seq_len: int, vocab: int, n_tokens: int) -> torch.Tensor:
    """Packed rows of a task corpus's shape (random ids stand in for the arithmetic corpus: the model's cost
    does not depend on which ids it reads)."""
    g = torch.Generator().manual_seed(0)
    docs, total = [], 0
    while total < n_tokens:
        n = int(torch.randint(20, 60, (1,), generator=g))
        docs.append(torch.randint(10, vocab, (n,), generator=g).tolist())
        total += n + 1
    return pack_documents(docs, seq_len, eos_id=1)


def text_rows(seq_len: int, data: list[str], exclude: list[str], vocab: int, work: Path) -> TokenRows:
    from nanoseek.text.prepare import train_text_tokenizer
    from nanoseek.text.shards import build_shards

    tok_file = work / "tokenizer.json"
    train_text_tokenizer(data, vocab, max_chars=2_000_000, exclude=exclude).save(tok_file)
    shards = build_shards(data, tok_file, work / "shards", vocab, exclude=exclude, progress=None)
    return TokenRows(shards.stream("train"), seq_len)


def main(argv: list[str] | None = None) -> int:
    from nanoseek.recipes.lm import stdlib_sources

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--steps", type=int, default=10, help="steps per block")
    p.add_argument("--rounds", type=int, default=5, help="blocks per side")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", action="append", help="text corpus (default: the Python stdlib sources)")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    data, exclude = (a.data, []) if a.data else stdlib_sources()
    with tempfile.TemporaryDirectory() as tmp:
        rows = {"task": task_rows(a.seq_len, a.vocab, 2_000_000),
                "data": text_rows(a.seq_len, data, exclude, a.vocab, Path(tmp))}
        cfg = ModelConfig.preset(a.preset, vocab_size=a.vocab, max_seq_len=max(a.seq_len, 256))
        tcfg = TrainConfig(batch_size=a.batch_size, seq_len=a.seq_len)
        dist = Dist()
        sides = {}
        for name, r in rows.items():
            torch.manual_seed(0)
            model = Transformer(cfg)
            sides[name] = (model, build_optimizer(model, tcfg), Loader(r, a.batch_size, seed=0))
        fetch_us = {}
        for name, (_, _, loader) in sides.items():
            t0 = time.perf_counter()
            for _ in range(200):
                loader.next_batch()
            fetch_us[name] = (time.perf_counter() - t0) / 200 * 1e6
        for model, opt, loader in sides.values():  # warm-up step, not timed
            train_step(model, opt, loader, tcfg, dist)
        rates: dict[str, list[float]] = {k: [] for k in sides}
        tokens = a.steps * a.batch_size * a.seq_len
        for _ in range(a.rounds):
            for name, (model, opt, loader) in sides.items():
                t0 = time.perf_counter()
                for _ in range(a.steps):
                    train_step(model, opt, loader, tcfg, dist)
                rates[name].append(tokens / (time.perf_counter() - t0))
    med = {k: statistics.median(v) for k, v in rates.items()}
    ratio = med["data"] / med["task"]
    print(f"operating point: preset {a.preset}, batch {a.batch_size} x {a.seq_len}, vocab {a.vocab}, "
          f"{a.threads} thread(s), {a.rounds} alternating blocks of {a.steps} steps per side")
    for k in sides:
        print(f"  --{k:<5} {med[k]:>9,.0f} tokens/s (median; blocks {', '.join(f'{x:,.0f}' for x in rates[k])}); "
              f"one batch fetched in {fetch_us[k]:.0f} us")
    print(f"--data / --task tokens/s: {ratio:.3f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"tokens_per_s": med, "blocks": rates, "fetch_us": fetch_us,
                                            "ratio": ratio, "args": vars(a)}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
