"""`nanoseek rl`: GRPO-family RL from verifiable rewards on top of a pretrained run.

    nanoseek rl --init runs/demo/base --out runs/rl --task arithmetic
    nanoseek rl --init runs/imported-sft --out runs/rl     # an imported run: prompts through its chat template
    torchrun --nproc_per_node=2 -m nanoseek.cli rl --init runs/demo/base --out runs/rl_ep --ep 2

The RL options are GRPOConfig's fields (nanoseek.cli_config): on --resume the run's stored config holds,
except --steps, --minutes, --precision and --compile when given.
"""
from __future__ import annotations

import argparse

from nanoseek.cli_config import ConfigCLI, stored_config
from nanoseek.parallel.training import add_ep_arguments
from nanoseek.train.grpo import GRPOConfig, train_grpo

CLI = ConfigCLI(GRPOConfig, section="rl")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--init", required=True, help="run directory of the starting model (e.g. runs/base)")
    p.add_argument("--out", required=True, help="run directory to write (runs/NAME)")
    CLI.add_arguments(p)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--resume", action="store_true")
    add_ep_arguments(p)


def config_from_args(a: argparse.Namespace) -> GRPOConfig:
    """The run's GRPOConfig: defaults (or --config-file) and the given options; on --resume the stored one."""
    stored = stored_config(a.out, GRPOConfig, "rl") if a.resume else None
    return CLI.resolve(a, stored).validate()


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if CLI.print_config(args, cfg):
        return 0
    last = train_grpo(args.init, args.out, cfg, resume=args.resume, device=args.device, ep=args.ep,
                      ep_redundant=args.ep_redundant, precision=cfg.precision, compile=cfg.compile)
    if last:
        print(f"done: step {last['step']}, reward {last['reward']:.3f}, accuracy {last['accuracy']:.2f}; "
              f"metrics: {args.out}/metrics.jsonl")
    return 0
