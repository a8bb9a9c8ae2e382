"""`nanoseek import --hf DIR --out runs/NAME`: a transformers DeepseekV3 checkpoint directory (weights, its own
tokenizer, chat template and generation config) becomes a nanoseek run that generate / sample / chat / serve /
eval use unchanged (nanoseek.hf_import)."""
from __future__ import annotations

import argparse

from nanoseek.hf_import import DTYPES, import_checkpoint


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hf", required=True, help="transformers checkpoint directory (config.json, *.safetensors, "
                                                "tokenizer.json, tokenizer_config.json)")
    p.add_argument("--out", required=True, help="new run directory (runs/NAME); must not exist")
    p.add_argument("--dtype", choices=list(DTYPES), default="auto",
                   help="weights dtype in the run (auto: the checkpoint's; FP8 is dequantized to bf16/fp32)")


def run(args: argparse.Namespace) -> int:
    import_checkpoint(args.hf, args.out, dtype=DTYPES[args.dtype])
    return 0
