"""`nanoseek export`: a run's checkpoint as a GGUF file for llama.cpp (nanoseek.gguf_export). The options are
GGUFExportConfig's fields (nanoseek.cli_config).

    nanoseek export --run runs/demo/rl --gguf demo.gguf                 # f32: llama.cpp decodes as nanoseek does
    nanoseek export --run runs/demo/rl --gguf demo-q8.gguf --dtype q8_0
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from nanoseek.cli_config import ConfigCLI, knob
from nanoseek.config import ConfigError

DTYPES = ("f32", "f16", "bf16", "q8_0")


@dataclass
class GGUFExportConfig:
    """One run's checkpoint as one GGUF file."""

    run: str = knob("", help="run directory to export (runs/NAME)", metavar="RUN")
    gguf: str = knob("", help="the GGUF file to write", metavar="FILE")
    dtype: str = knob("f32", help="weight type: f32 (exact), or f16 / bf16 / q8_0 for the 2-D weights (norms, "
                      "router and bias stay f32, as llama.cpp's converter does)", choices=DTYPES)
    step: int | None = knob(None, help="checkpoint step (default: the latest)")


CLI = ConfigCLI(GGUFExportConfig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    CLI.add_arguments(p)


def run(args: argparse.Namespace) -> int:
    cfg = CLI.resolve(args)
    if CLI.print_config(args, cfg):
        return 0
    if not cfg.run or not cfg.gguf:
        raise ConfigError("export needs --run RUN and --gguf FILE")
    from nanoseek.gguf_export import export_run  # the gguf package only when exporting

    export_run(cfg.run, cfg.gguf, cfg.dtype, cfg.step)
    return 0
