"""`nanoseek export`: a run's checkpoint out of nanoseek, as a transformers directory (`--hf DIR`: weights,
config.json and its tokenizer files with the chat template; nanoseek.hf_export) or as a GGUF file for llama.cpp
(`--gguf FILE`: the deepseek2 architecture; nanoseek.gguf_export). An imported run, or one fine-tuned / RL'd from
it, carries the checkpoint's own tokenizer, chat template and generation_config.json back to `--hf`. The options
are ExportConfig's fields (nanoseek.cli_config).

    nanoseek export --run runs/sft --hf exported/sft
    nanoseek export --run runs/rl --hf exported/rl --dtype bfloat16 --max-shard-mb 4000
    nanoseek export --run runs/demo/rl --gguf demo.gguf                 # f32: llama.cpp decodes as nanoseek does
    nanoseek export --run runs/demo/rl --gguf demo-q8.gguf --dtype q8_0
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from nanoseek.cli_config import ConfigCLI, knob
from nanoseek.config import ConfigError

GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0")
HF_DTYPES = ("auto", "float32", "bfloat16", "float16")  # nanoseek.hf_import.DTYPES
DTYPES = HF_DTYPES + GGUF_DTYPES


@dataclass
class ExportConfig:
    """One run's checkpoint as a transformers directory or a GGUF file."""

    run: str = knob("", help="run directory to export (runs/NAME)", metavar="RUN")
    hf: str = knob("", help="new transformers directory; must not exist", metavar="DIR")
    gguf: str = knob("", help="the GGUF file to write (llama.cpp)", metavar="FILE")
    dtype: str = knob("", help="weights: --hf auto (the run's) / float32 / bfloat16 / float16; --gguf f32 (exact) or "
                      "f16 / bf16 / q8_0 for the 2-D weights (norms, router and bias stay f32, as llama.cpp's "
                      "converter does). Default: auto / f32", choices=DTYPES)
    step: int | None = knob(None, help="checkpoint step (default: the latest)")
    max_shard_mb: int = knob(0, help="--hf: split the weights into shards of at most this size "
                             "(0 = one model.safetensors)")


CLI = ConfigCLI(ExportConfig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    CLI.add_arguments(p)


def run(args: argparse.Namespace) -> int:
    cfg = CLI.resolve(args)
    if CLI.print_config(args, cfg):
        return 0
    if not cfg.run or bool(cfg.hf) == bool(cfg.gguf):
        raise ConfigError("export needs --run RUN and one of --hf DIR or --gguf FILE")
    if cfg.max_shard_mb < 0:
        raise ConfigError(f"--max-shard-mb must be >= 0, got {cfg.max_shard_mb}")
    if cfg.hf:
        if cfg.dtype and cfg.dtype not in HF_DTYPES:
            raise ConfigError(f"--hf takes --dtype {' / '.join(HF_DTYPES)}, got {cfg.dtype!r}")
        from nanoseek.hf_export import export_run

        export_run(cfg.run, cfg.hf, step=cfg.step, dtype=cfg.dtype or "auto",
                   max_shard_bytes=cfg.max_shard_mb * 2**20 or None)
        return 0
    if cfg.dtype and cfg.dtype not in GGUF_DTYPES:
        raise ConfigError(f"--gguf takes --dtype {' / '.join(GGUF_DTYPES)}, got {cfg.dtype!r}")
    if cfg.max_shard_mb:
        raise ConfigError("--max-shard-mb is for --hf (a GGUF is one file)")
    from nanoseek.gguf_export import export_run as export_gguf  # the gguf package only when exporting

    export_gguf(cfg.run, cfg.gguf, cfg.dtype or "f32", cfg.step)
    return 0
