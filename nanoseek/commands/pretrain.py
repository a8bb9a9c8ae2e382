"""`nanoseek pretrain`: pretrain a model on a task corpus into a run directory (one process or torchrun).

    nanoseek pretrain --preset tiny --task arithmetic --steps 600 --out runs/base --minutes 5
    nanoseek pretrain --data ~/texts --preset tiny --minutes 10 --out runs/text   # your own text (nanoseek.text)
    nanoseek pretrain --data ~/texts --balance aux --mtp-depth 0 --out runs/abl   # V3's ablations (issue 29)
    nanoseek pretrain --data ~/texts --optimizer muon --qk-clip-tau 100 --out runs/muon   # Muon + QK-clip
    nanoseek pretrain --out runs/base --resume            # continue exactly where it stopped
    nanoseek pretrain --init runs/text --sparse-attention warmup --index-topk 32 --steps 150 --out runs/warm
    nanoseek pretrain --init runs/warm --sparse-attention sparse --steps 300 --out runs/sparse   # V3.2 sec. 2.1.1
    torchrun --nproc_per_node=2 -m nanoseek.cli pretrain --out runs/ddp ...
    torchrun --nproc_per_node=2 -m nanoseek.cli pretrain --out runs/ep --ep 2    # routed experts sharded
    torchrun --nproc_per_node=2 -m nanoseek.cli pretrain --out runs/pp --pp 2 --pp-schedule dualpipev

A fresh run trains a tokenizer on the task corpus (or on the --data text) when the run directory has none.
With --data, --minutes and no --steps, the lr schedule follows the time budget (steps only a cap), and the
sequence length defaults to the model's max_seq_len. The run options are PretrainConfig's fields (its
TrainConfig and DataConfig included; nanoseek.cli_config). On --resume the stored config.json is
authoritative (the optimizer included); only --steps, --minutes, --precision and --compile may change (changing --steps reshapes the
lr schedule; a run resumes in the precision it started with unless --precision says otherwise).
--init RUN starts a new run from RUN's latest weights and its config.json (options given on top win; the
model is RUN's, with lightning indexers added for --sparse-attention: nanoseek.train.sparse_attention).
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from nanoseek.cli_config import ConfigCLI
from nanoseek.config import PRESETS, ConfigError, ModelConfig
from nanoseek.parallel.training import add_ep_arguments
from nanoseek.train.common import setup_distributed
from nanoseek.train.pretrain import PretrainConfig, dense_equivalent, pretrain

TIME_SCHEDULE_STEP_CAP = 10_000_000  # --data --minutes without --steps: the time budget ends the run

CLI = ConfigCLI(PretrainConfig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="run directory (runs/NAME)")
    p.add_argument("--preset", help=f"model size: {', '.join(PRESETS)} (default: tiny)")
    p.add_argument("--config", help="a model config JSON instead of --preset (vocab_size comes from the tokenizer)")
    CLI.add_arguments(p)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    add_ep_arguments(p)
    p.add_argument("--pp", type=int, default=1, help="pipeline parallelism over this many processes (torchrun; "
                   "= the number of processes). Not stored: a resume may change it")
    p.add_argument("--pp-schedule", default="1f1b", choices=["1f1b", "zbv", "dualpipev"],
                   help="pipeline schedule (torch.distributed.pipelining); zbv and dualpipev put 2 stages per rank")
    p.add_argument("--pp-microbatches", type=int, default=0, help="micro-batches per step (default: 2 per stage)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")


def resolve_config(args: argparse.Namespace) -> PretrainConfig:
    """The run's full config: from the flags for a fresh run (on top of --config-file when given), from
    config.json (plus --steps / --minutes / --precision / --compile when given) on resume."""
    run_dir = Path(args.out)
    if args.resume:
        if not run_dir.is_dir():
            raise ConfigError(f"run directory {run_dir} does not exist; nothing to resume")
        cfg = CLI.resolve(args, PretrainConfig.load(run_dir))
        depth = CLI.given(args).get("mtp_depth")
        if depth is not None and depth != cfg.model.n_mtp:
            raise ConfigError(f"--mtp-depth {depth} differs from the run's {cfg.model.n_mtp}; a resumed run "
                              "keeps its model")
        cfg.train.validate()
        return cfg
    cfg, given = CLI.resolve(args), CLI.given(args)
    if cfg.stage.init:
        return continued_config(args, cfg.stage.init, given)
    if args.config or args.preset or not args.config_file:  # a --config-file's model holds unless replaced
        model = ModelConfig.from_json(args.config) if args.config else ModelConfig.preset(args.preset or "tiny")
        cfg.model = dense_equivalent(model) if cfg.dense else model
    if cfg.mtp_depth is not None:
        cfg.model = dataclasses.replace(cfg.model, n_mtp=cfg.mtp_depth).validate()
    data = cfg.data
    if data.is_text and not args.config_file:  # text defaults, unless given (a --config-file holds its own)
        if "train.seq_len" not in given:
            cfg.train = dataclasses.replace(cfg.train, seq_len=cfg.model.max_seq_len)
        if cfg.train.minutes > 0 and "train.steps" not in given:
            cfg.train, cfg.time_schedule = dataclasses.replace(cfg.train, steps=TIME_SCHEDULE_STEP_CAP), True
    cfg.train.validate()
    if data.is_text:
        from nanoseek.text.sources import discover

        data.split_settings()
        discover(data.data, data.exclude)  # a missing path or an empty directory fails here, before any file is written
        return cfg
    from nanoseek.tasks import get_task

    get_task(data.task).check_difficulty(data.difficulty)  # bad task names / difficulties fail here, before any work
    for name, share in (("--flawed-share", data.flawed_share), ("--fact-share", data.fact_share),
                        ("--reflect-share", data.reflect_share), ("--persist-share", data.persist_share)):
        if not 0.0 <= share <= 1.0:
            raise ConfigError(f"{name} must be in [0, 1], got {share}")
    if data.persist_share > 0 and not getattr(get_task(data.task), "search_corpus", False):
        raise ConfigError(f"--persist-share needs a search task (countdown_mod, countdown_search), got {data.task!r}")
    if data.n_docs < 1 or data.n_test_docs < 1:
        raise ConfigError("--n-docs and --n-test-docs must be >= 1")
    return cfg


def continued_config(args: argparse.Namespace, init: str, given: dict) -> PretrainConfig:
    """--init RUN: RUN's config (model, data, training options) with the given options on top, the stage's
    model (sparse_attention.apply_stage); --steps / --minutes as for a fresh run."""
    from nanoseek.train.sparse_attention import apply_stage, continuation

    if args.config or args.preset or args.config_file or args.mtp_depth is not None or "dense" in given:
        raise ConfigError("--init RUN takes the model and options from RUN: drop --preset / --config / "
                          "--config-file / --mtp-depth / --dense")
    if any(k.startswith("data.") for k in given):
        raise ConfigError("--init RUN trains on RUN's data and tokenizer: drop the data options")
    cfg = apply_stage(CLI.apply(args, continuation(PretrainConfig.load(init), init)))
    if cfg.data.is_text and cfg.train.minutes > 0 and "train.steps" not in given:
        cfg.train, cfg.time_schedule = dataclasses.replace(cfg.train, steps=TIME_SCHEDULE_STEP_CAP), True
    if cfg.stage.mode and (args.pp > 1 or cfg.train.compile):
        raise ConfigError("--sparse-attention does not combine with --pp or --compile yet")
    cfg.train.validate()
    return cfg


def run(args: argparse.Namespace) -> int:
    cfg = resolve_config(args)
    if CLI.print_config(args, cfg):
        return 0
    dist = setup_distributed(args.device)
    try:
        s = pretrain(args.out, cfg, resume=args.resume, dist=dist, ep=args.ep, ep_redundant=args.ep_redundant,
                     pp=args.pp, pp_schedule=args.pp_schedule, pp_microbatches=args.pp_microbatches)
    finally:
        dist.close()
    if dist.is_main and s["loss"] is not None:
        ev = "-" if s["eval_loss"] is None else f"{s['eval_loss']:.4f}"
        bpb = f", held-out {s['val_bpb']:.4f} bits/byte" if s.get("val_bpb") is not None else ""
        print(f"done: step {s['step']}, train loss {s['loss']:.4f}, held-out CE {ev}{bpb}, "
              f"{s['tokens_per_s']:,.0f} tokens/s; report: {Path(args.out) / 'report.md'}")
    elif dist.is_main:
        print(f"nothing to do: the run is already at step {s['step']} of {cfg.train.steps}")
    return 0
