"""`nanoseek aha` (= `make aha`): the R1-Zero "aha" in miniature on Countdown search (issue 28; the recipe:
nanoseek.recipes.aha, docs/long_reasoning.md). The options are AhaConfig's fields (nanoseek.cli_config).

    nanoseek aha                                # every stage at its defaults, runs/aha/
    nanoseek aha --until diagnostic             # stop after a stage; rerun the same command to continue
    nanoseek aha --out runs/aha_s1 --seed 1     # another seed
    nanoseek aha --seeds-report runs/aha runs/aha_s1 --out docs/aha
    nanoseek aha --reflection [--out DIR --seed N --until STAGE --smoke]   # issue 14's arithmetic reflection
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from nanoseek.cli_config import ConfigCLI
from nanoseek.config import ConfigError
from nanoseek.recipes.aha import STAGES, AhaConfig, console, run_aha
from nanoseek.recipes.aha_report import seeds_report

CLI = ConfigCLI(AhaConfig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    CLI.add_arguments(p)
    p.add_argument("--until", metavar="STAGE", help=f"stop after this stage ({', '.join(STAGES)})")
    p.add_argument("--smoke", action="store_true", help="a seconds-long run of every stage (for tests); options "
                   "given apply on top")
    p.add_argument("--seeds-report", nargs="+", metavar="RUN", help="only write --out/seeds.md: tables over these "
                   "aha runs (one per seed) and their RL curves")
    p.add_argument("--reflection", action="store_true", help="issue 14's arithmetic-reflection pipeline instead "
                   "(nanoseek.recipes.aha_reflection; takes --out (default runs/aha_reflection), --seed, --until, "
                   "--smoke, --seeds-report)")


def _reflection(args: argparse.Namespace) -> int:
    from nanoseek.recipes import aha_reflection as old

    given = CLI.given(args)
    out = given.get("out", "runs/aha_reflection")
    seed = given.get("seed", 0)
    if set(given) - {"out", "seed"}:
        raise ConfigError(f"--reflection takes only --out/--seed/--until/--smoke/--seeds-report, got "
                          f"{', '.join(sorted(set(given) - {'out', 'seed'}))}")
    if args.seeds_report:
        console.print(f"wrote {old.seeds_report([Path(r) for r in args.seeds_report], Path(out))}")
        return 0
    if args.until is not None and args.until not in old.STAGES:
        raise ConfigError(f"--until must be one of {', '.join(old.STAGES)}, got {args.until!r}")
    cfg = old.AhaConfig.smoke(out, seed) if args.smoke else old.AhaConfig(out=out, seed=seed)
    old.run_aha(cfg, args.until)
    return 0


def run(args: argparse.Namespace) -> int:
    if args.reflection:
        return _reflection(args)
    cfg = CLI.resolve(args, rebase=(lambda c: AhaConfig.smoke(c.out, c.seed)) if args.smoke else None)
    if CLI.print_config(args, cfg):
        return 0
    t0 = time.time()
    if args.seeds_report:
        console.print(f"wrote {seeds_report([Path(r) for r in args.seeds_report], Path(cfg.out))}")
        return 0
    run_aha(cfg, args.until)
    console.print(f"[dim]this invocation: {time.time() - t0:.0f} s[/dim]")
    return 0
