"""`nanoseek tokenizer train`: fit the byte-level BPE tokenizer on the task corpus and save tokenizer.json.

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
    t.add_argument("--vocab-size", type=int, default=512, help="upper bound; a small corpus may give fewer")
    t.add_argument("--out", required=True, help="output file (…/tokenizer.json) or folder")
    t.add_argument("--docs", type=int, default=10000, help="corpus documents per task")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--difficulty", type=int, default=None, help="task difficulty 1..5 (default: the task's)")


def run(args: argparse.Namespace) -> int:
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
