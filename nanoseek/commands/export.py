"""`nanoseek export`: a run's checkpoint as a GGUF file for llama.cpp (nanoseek.gguf_export). The options are
GGUFExportConfig's fields (nanoseek.cli_config).

    nanoseek export --run runs/demo/rl --gguf demo.gguf                 # f32: llama.cpp decodes as nanoseek does
    nanoseek export --run runs/demo/rl --gguf demo-q8.gguf --dtype q8_0
"""
from __future__ import annotations

import argparse

from nanoseek.cli_config import ConfigCLI
from nanoseek.gguf_export import GGUFExportConfig, export_run

CLI = ConfigCLI(GGUFExportConfig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    CLI.add_arguments(p)


def run(args: argparse.Namespace) -> int:
    cfg = CLI.resolve(args)
    if CLI.print_config(args, cfg):
        return 0
    export_run(cfg)
    return 0
