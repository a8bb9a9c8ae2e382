"""`nanoseek lm` (= `make lm`): tokenizer + tiny MoE language model of real text + held-out bits per byte
(the recipe: nanoseek.recipes.lm). Resumable: rerun the same command after Ctrl-C.

    nanoseek lm                                  # the Python standard library's sources, ~15 min on 2 cores
    nanoseek lm --data ~/my_texts --out runs/mine --minutes 30
    nanoseek lm --until data                     # stop after a stage (data, pretrain, eval, samples)
"""
from __future__ import annotations

import argparse
import dataclasses

from nanoseek.recipes.lm import STAGES, LMConfig, run_lm


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = LMConfig()
    p.add_argument("--out", default=d.out, help="recipe directory")
    p.add_argument("--data", action="append", default=None, metavar="PATH",
                   help="corpus (file, directory or glob; repeatable); default: the Python standard library")
    p.add_argument("--exclude", action="append", default=None, metavar="GLOB", help="fnmatch patterns left out")
    p.add_argument("--text-field", default=d.text_field, help="JSONL / parquet field holding the text")
    p.add_argument("--preset", default=d.preset, help="model size preset")
    p.add_argument("--minutes", type=float, default=d.minutes, help="pretraining wall clock")
    p.add_argument("--vocab-size", type=int, default=d.vocab_size)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="0 = the preset's max_seq_len")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--eval-interval", type=int, default=d.eval_interval, help="steps between held-out bpb")
    p.add_argument("--eval-tokens", type=int, default=d.eval_tokens, help="held-out tokens of the final eval")
    p.add_argument("--until", choices=STAGES, help="stop after this stage")


def run(args: argparse.Namespace) -> int:
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(LMConfig) if hasattr(args, f.name)}
    given["data"] = list(args.data or [])
    given["exclude"] = list(args.exclude or [])
    run_lm(LMConfig(**given), args.until)
    return 0
