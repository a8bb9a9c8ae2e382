"""`nanoseek <command> ...`: one entry point for every stage.

Each command lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`; this
file only dispatches. User mistakes (ConfigError and friends) print one line and exit non-zero.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from nanoseek.config import ConfigError

# command name -> (module, one-line help). Add one line per new command.
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("nanoseek.commands.info", "parameter table and forward/backward timing of a model preset"),
    "demo": ("nanoseek.commands.demo", "the main job: build a model end to end on this machine"),
    "pretrain": ("nanoseek.commands.pretrain", "pretrain a model on a task corpus or your text (--data; resumable, torchrun-ready)"),
    "sample": ("nanoseek.commands.sample", "continue a prompt with a trained run's model"),
    "cost": ("nanoseek.commands.cost", "serving cost: memory, roofline tokens/s and USD per million tokens"),
    "rl": ("nanoseek.commands.rl", "GRPO-family RL from verifiable rewards on a pretrained run"),
    "eval": ("nanoseek.commands.eval", "held-out pass@1 and greedy accuracy of a run on a task"),
    "generate": ("nanoseek.commands.generate", "complete prompts with the engine (batched, latent cache, MTP speculative)"),
    "chat": ("nanoseek.commands.chat", "interactive terminal chat that shows the model's thinking dimmed"),
    "serve": ("nanoseek.commands.serve", "OpenAI-compatible HTTP API with continuous batching + web chat page"),
    "tokenizer": ("nanoseek.commands.tokenizer", "train the byte-level BPE tokenizer on a task corpus"),
    "sft": ("nanoseek.commands.sft", "supervised fine-tuning on prompt/completion JSONL (completion-only loss)"),
    "traces": ("nanoseek.commands.traces", "rejection sampling: verified-correct traces of a run as SFT data"),
    "distill": ("nanoseek.commands.distill", "on-policy distillation: reverse KL to a teacher on the student's samples"),
    "dpo": ("nanoseek.commands.dpo", "DPO on (chosen, rejected) pairs against a frozen reference (long2short)"),
    "merge": ("nanoseek.commands.merge", "average the weights of runs of one architecture into a new run"),
    "aha": ("nanoseek.commands.aha", "long reasoning in miniature: Countdown search RL, control, long2short"),
    "r1": ("nanoseek.commands.r1", "the R1 pipeline after the demo: distillation vs RL on a dense student"),
    "lm": ("nanoseek.commands.lm", "a language model of real text (default: the Python stdlib): bits per byte"),
    "import": ("nanoseek.commands.import_hf", "a transformers DeepseekV3 checkpoint (+ its tokenizer, chat template) as a run"),
    "export": ("nanoseek.commands.export", "a run as a transformers directory (--hf) or a GGUF file for llama.cpp (--gguf)"),
    "eplb": ("nanoseek.commands.eplb", "expert-parallel GPU balance before/after EPLB from a run's recorded loads"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanoseek", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`nanoseek ... | head`): stop quietly, as other CLIs do
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
