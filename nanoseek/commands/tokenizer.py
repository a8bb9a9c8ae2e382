"""`nanoseek tokenizer train`: fit the byte-level BPE tokenizer on the task corpus (or on your text with
`--data PATH`, the GPT-4 style split: nanoseek.text.prepare) and save tokenizer.json.

    nanoseek tokenizer train --data ~/texts --vocab-size 4096 --out runs/text/tokenizer.json

The training text is the pretraining corpus itself (`nanoseek.corpus.corpus_texts`, train split), so the
merges fit exactly what the model will read. Several tasks may be given (`--task arithmetic,countdown`)
so one tokenizer serves all of them.
"""
from __future__ import annotations

import argparse
import time

from nanoseek.config import ConfigError
from nanoseek.corpus import build_corpus, corpus_texts
from nanoseek.tasks import TASKS
from nanoseek.tokenizer import Tokenizer


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    t = sub.add_parser("train", help="train a tokenizer on the task corpus and save tokenizer.json")
    t.add_argument("--task", default="arithmetic",
                   help=f"task name, or several separated by commas; known: {', '.join(TASKS)}")
    t.add_argument("--vocab-size", type=int, default=None,
                   help="upper bound; a small corpus may give fewer (default 512 for --task, 4096 for --data)")
    t.add_argument("--data", action="append", default=None, metavar="PATH",
                   help="train on this text instead of a task corpus (file, directory or glob; repeatable)")
    t.add_argument("--text-field", default="text", help="JSONL / parquet field holding the text (--data)")
    t.add_argument("--max-chars", type=int, default=20_000_000,
                   help="characters of --data sampled for training (an even, hash-drawn sample)")
    t.add_argument("--out", required=True, help="output file (…/tokenizer.json) or folder")
    t.add_argument("--docs", type=int, default=10000, help="corpus documents per task")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--difficulty", type=int, default=None, help="task difficulty 1..5 (default: the task's)")


def run_text(args: argparse.Namespace) -> int:
    """Train on --data and report bytes per token on the held-out units (never seen by the trainer)."""
    from nanoseek.text.prepare import DEFAULT_TEXT_VOCAB, train_text_tokenizer
    from nanoseek.text.shards import SplitSettings, split_pieces, unit_hash
    from nanoseek.text.sources import ReadStats, discover, kind_of, read_documents

    settings = SplitSettings(text_field=args.text_field).check()
    discover(args.data)  # bad paths fail before any work
    t0 = time.perf_counter()
    tok = train_text_tokenizer(args.data, args.vocab_size or DEFAULT_TEXT_VOCAB, settings, args.max_chars)
    trained_s = time.perf_counter() - t0
    path = tok.save(args.out)
    n_bytes = n_tokens = 0
    stats = ReadStats()
    for f in discover(args.data):
        for doc in read_documents(f, settings.text_field, stats):
            for unit in split_pieces(doc, settings.piece_chars) if kind_of(f) == "text" else [doc]:
                if unit_hash(unit) < settings.val_share and n_bytes < 5_000_000:
                    n_bytes += len(unit.encode("utf-8", "surrogatepass"))
                    n_tokens += len(tok.encode(unit))
    print(f"trained in {trained_s:.1f}s on {stats.documents:,} documents ({stats.bytes / 1e6:.1f} MB; skipped: "
          f"{stats.skip_line()}); vocab size {tok.vocab_size}")
    if n_tokens:
        print(f"held-out text: {n_bytes:,} bytes -> {n_tokens:,} tokens, {n_bytes / n_tokens:.2f} bytes/token")
    print(f"saved {path}")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.data:
        return run_text(args)
    args.vocab_size = args.vocab_size or 512
    tasks = [name.strip() for name in args.task.split(",") if name.strip()]
    if not tasks:
        raise ConfigError("--task needs at least one task name")
    if args.docs <= 0:
        raise ConfigError(f"--docs must be positive, got {args.docs}")
    t0 = time.perf_counter()
    texts: list[str] = []
    for name in tasks:
        texts += corpus_texts(name, args.docs, args.seed, difficulty=args.difficulty)
    tok = Tokenizer.train(texts, vocab_size=args.vocab_size)
    path = tok.save(args.out)
    n_tokens = sum(len(tok.encode(t)) for t in texts)
    print(f"trained on {len(texts):,} documents ({', '.join(tasks)}) in {time.perf_counter() - t0:.1f}s")
    print(f"vocab size {tok.vocab_size} (asked for at most {args.vocab_size}); "
          f"{n_tokens / len(texts):.1f} tokens/document, {sum(map(len, texts)) / n_tokens:.2f} chars/token")
    for name in tasks:
        prompt, completion = build_corpus(name, 1, args.seed, flawed_share=0.0, difficulty=args.difficulty,
                                          fact_share=0.0)[0]
        ids = tok.document_ids(prompt, completion)
        print(f"example ({name}, {len(ids)} tokens): {'|'.join(tok.token_strings(ids))}")
    print(f"saved {path}")
    return 0
