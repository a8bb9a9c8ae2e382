"""`nanoseek export --run RUN --hf DIR`: a run as a transformers directory (weights, config.json, and its
tokenizer files with the chat template; nanoseek.hf_export). An imported run, or one fine-tuned / RL'd from it,
carries the checkpoint's own tokenizer, chat template and generation_config.json back.

    nanoseek export --run runs/sft --hf exported/sft
    nanoseek export --run runs/rl --hf exported/rl --dtype bfloat16 --max-shard-mb 4000
"""
from __future__ import annotations

import argparse

from nanoseek.hf_import import DTYPES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run directory (config.json, checkpoints/, tokenizer files)")
    p.add_argument("--hf", required=True, metavar="DIR", help="new transformers directory; must not exist")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--dtype", choices=list(DTYPES), default="auto", help="weights dtype (auto: the run's)")
    p.add_argument("--max-shard-mb", type=int, default=0, help="split the weights into shards of at most this "
                   "size (0 = one model.safetensors)")


def run(args: argparse.Namespace) -> int:
    from nanoseek.config import ConfigError
    from nanoseek.hf_export import export_run

    if args.max_shard_mb < 0:
        raise ConfigError(f"--max-shard-mb must be >= 0, got {args.max_shard_mb}")
    export_run(args.run, args.hf, step=args.step, dtype=args.dtype,
               max_shard_bytes=args.max_shard_mb * 2**20 or None)
    return 0
