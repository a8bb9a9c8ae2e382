"""`nanoseek pretrain`: pretrain a model on a task corpus into a run directory (one process or torchrun).

    nanoseek pretrain --preset tiny --task arithmetic --steps 600 --out runs/base --minutes 5
    nanoseek pretrain --data ~/texts --preset tiny --minutes 10 --out runs/text   # your own text (nanoseek.text)
    nanoseek pretrain --data ~/texts --balance aux --mtp-depth 0 --out runs/abl   # V3's ablations (issue 29)
    nanoseek pretrain --out runs/base --resume            # continue exactly where it stopped
    torchrun --nproc_per_node=2 -m nanoseek.cli pretrain --out runs/ddp ...
    torchrun --nproc_per_node=2 -m nanoseek.cli pretrain --out runs/ep --ep 2    # routed experts sharded
    torchrun --nproc_per_node=2 -m nanoseek.cli pretrain --out runs/pp --pp 2 --pp-schedule dualpipev

A fresh run trains a tokenizer on the task corpus (or on the --data text) when the run directory has none.
With --data, --minutes and no --steps, the lr schedule follows the time budget (steps only a cap), and the
sequence length defaults to the model's max_seq_len. On --resume the stored
config.json is authoritative; only --steps, --minutes and --precision may change (changing --steps reshapes the
lr schedule; a run resumes in the precision it started with unless --precision says otherwise).
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from nanoseek.config import PRESETS, ConfigError, ModelConfig
from nanoseek.data import PACKERS
from nanoseek.parallel.training import add_ep_arguments
from nanoseek.train.common import BALANCE_MODES, TrainConfig, setup_distributed
from nanoseek.train.precision import PUBLIC as PRECISIONS
from nanoseek.train.pretrain import DataConfig, PretrainConfig, dense_equivalent, pretrain

TIME_SCHEDULE_STEP_CAP = 10_000_000  # --data --minutes without --steps: the time budget ends the run

# flag -> TrainConfig field, for the knobs exposed on the command line
TRAIN_FLAGS = {"steps": "steps", "minutes": "minutes", "seed": "seed", "batch_size": "batch_size", "lr": "lr",
               "seq_len": "seq_len", "grad_accum": "grad_accum", "warmup": "warmup_steps",
               "eval_interval": "eval_interval", "eval_batches": "eval_batches", "ckpt_interval": "ckpt_interval",
               "log_interval": "log_interval", "keep_last": "keep_last", "balance": "balance",
               "aux_alpha": "aux_alpha", "bias_gamma": "bias_gamma", "balance_alpha": "balance_alpha"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    p.add_argument("--out", required=True, help="run directory (runs/NAME)")
    p.add_argument("--preset", default="tiny", help=f"model size: {', '.join(PRESETS)}")
    p.add_argument("--config", help="a model config JSON instead of --preset (vocab_size comes from the tokenizer)")
    p.add_argument("--dense", action="store_true", help="dense model with the preset's activated parameter count")
    p.add_argument("--mtp-depth", type=int, default=None, metavar="D",
                   help="multi-token prediction modules (0 = off; default: the preset's). The main model is the same "
                        "for every D, so MTP on/off compares at equal main-model FLOPs (V3 Table 4)")
    p.add_argument("--data", action="append", default=None, metavar="PATH",
                   help="train on your own text instead of --task: a file, directory (recursive) or glob; repeatable. "
                        "Plain UTF-8 files are one document each, .jsonl/.json rows and .parquet columns take "
                        "--text-field")
    p.add_argument("--exclude", action="append", default=None, metavar="GLOB",
                   help="leave out --data files whose path matches this fnmatch pattern (repeatable)")
    p.add_argument("--text-field", default=DataConfig.text_field, help="JSONL / parquet field holding the text")
    p.add_argument("--val-share", type=float, default=DataConfig.val_share,
                   help="share of --data units (rows, ~8 KB pieces of text files) held out, chosen by a stable hash")
    p.add_argument("--shard-dir", default="", help="where --data token shards are kept (default RUN/shards; "
                   "reused while the files and tokenizer are unchanged)")
    p.add_argument("--tokenizer", default="", help="an existing tokenizer.json for --data (default: train one)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="tokenizer vocabulary to train (default 512 for --task, 4096 for --data)")
    p.add_argument("--task", default=DataConfig.task)
    p.add_argument("--n-docs", type=int, default=DataConfig.n_docs, help="training documents")
    p.add_argument("--n-test-docs", type=int, default=DataConfig.n_test_docs, help="held-out documents")
    p.add_argument("--difficulty", type=int, default=None, help="task difficulty (default: the task's)")
    p.add_argument("--flawed-share", type=float, default=DataConfig.flawed_share,
                   help="share of worked solutions with one deliberate slip")
    p.add_argument("--fact-share", type=float, default=DataConfig.fact_share,
                   help="share of documents that are one-operation arithmetic facts (always correct)")
    p.add_argument("--reflect-share", type=float, default=DataConfig.reflect_share,
                   help="share of worked solutions with one check line `a+b=r. check: a+b=r'.` (arithmetic only)")
    p.add_argument("--packing", default=DataConfig.packing, choices=list(PACKERS),
                   help="rows are cuts of one document stream (stream, default) or start at a document start "
                        "(aligned)")
    p.add_argument("--steps", type=int, help=f"optimizer steps, the lr schedule's length (default {d.steps}; "
                   "on --resume the stored value)")
    p.add_argument("--minutes", type=float, help="wall-clock limit of this process; 0 = none (default 0)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="global sequences per micro-batch")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum)
    p.add_argument("--seq-len", type=int, default=None,
                   help=f"tokens per training row (default {d.seq_len}; with --data the model's max_seq_len)")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup", type=int, default=d.warmup_steps)
    p.add_argument("--eval-interval", type=int, default=d.eval_interval)
    p.add_argument("--eval-batches", type=int, default=d.eval_batches)
    p.add_argument("--ckpt-interval", type=int, default=d.ckpt_interval)
    p.add_argument("--log-interval", type=int, default=d.log_interval)
    p.add_argument("--keep-last", type=int, default=d.keep_last)
    p.add_argument("--balance", default=d.balance, choices=list(BALANCE_MODES),
                   help="expert load balancing: bias = V3's auxiliary-loss-free bias update (default), aux = the "
                        "conventional auxiliary loss it replaced (--aux-alpha), none = neither")
    p.add_argument("--aux-alpha", type=float, default=d.aux_alpha,
                   help=f"weight of the --balance aux loss (default {d.aux_alpha:g}, Wang et al. 2024's baseline)")
    p.add_argument("--bias-gamma", type=float, default=d.bias_gamma,
                   help=f"bias update speed of --balance bias (default {d.bias_gamma:g}, V3's)")
    p.add_argument("--balance-alpha", type=float, default=d.balance_alpha,
                   help=f"weight of V3's sequence-wise balance loss, in every --balance mode (default {d.balance_alpha:g})")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    add_ep_arguments(p)
    p.add_argument("--precision", choices=PRECISIONS, help="fp32 (default), bf16 (BF16 compute, FP32 master "
                   "weights) or fp8 (V3's fine-grained FP8 GEMMs, BF16 AdamW moments); on --resume the stored one")
    p.add_argument("--pp", type=int, default=1, help="pipeline parallelism over this many processes (torchrun; "
                   "= the number of processes). Not stored: a resume may change it")
    p.add_argument("--pp-schedule", default="1f1b", choices=["1f1b", "zbv", "dualpipev"],
                   help="pipeline schedule (torch.distributed.pipelining); zbv and dualpipev put 2 stages per rank")
    p.add_argument("--pp-microbatches", type=int, default=0, help="micro-batches per step (default: 2 per stage)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the blocks' training forward (docs/speed.md: ~1 min of compiling first); "
                        "on --resume the stored choice unless given")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")


def resolve_config(args: argparse.Namespace) -> PretrainConfig:
    """The run's full config: from the flags for a fresh run, from config.json (plus --steps/--minutes) on resume."""
    run_dir = Path(args.out)
    if args.resume:
        if not run_dir.is_dir():
            raise ConfigError(f"run directory {run_dir} does not exist; nothing to resume")
        cfg = PretrainConfig.load(run_dir)
        if args.mtp_depth is not None and args.mtp_depth != cfg.model.n_mtp:
            raise ConfigError(f"--mtp-depth {args.mtp_depth} differs from the run's {cfg.model.n_mtp}; a resumed run "
                              "keeps its model")
        changes = {k: v for k, v in (("steps", args.steps), ("minutes", args.minutes), ("compile", args.compile))
                   if v is not None}
        cfg.train = dataclasses.replace(cfg.train, **changes).validate()
        if args.precision is not None:
            cfg.precision = args.precision
        return cfg
    model = ModelConfig.from_json(args.config) if args.config else ModelConfig.preset(args.preset)
    if args.dense:
        model = dense_equivalent(model)
    if args.mtp_depth is not None:
        if args.mtp_depth < 0:
            raise ConfigError(f"--mtp-depth must be >= 0, got {args.mtp_depth}")
        model = dataclasses.replace(model, n_mtp=args.mtp_depth).validate()
    given = {field: getattr(args, flag) for flag, field in TRAIN_FLAGS.items() if getattr(args, flag) is not None}
    given["compile"] = bool(args.compile)
    text = bool(args.data)
    time_schedule = text and args.minutes is not None and args.minutes > 0 and args.steps is None
    if time_schedule:
        given["steps"] = TIME_SCHEDULE_STEP_CAP
    if text and args.seq_len is None:
        given["seq_len"] = model.max_seq_len
    train = TrainConfig(**given).validate()
    data = DataConfig(task=args.task, n_docs=args.n_docs, n_test_docs=args.n_test_docs, difficulty=args.difficulty,
                      flawed_share=args.flawed_share, fact_share=args.fact_share, packing=args.packing,
                      reflect_share=args.reflect_share, vocab_size=args.vocab_size, data=list(args.data or []),
                      text_field=args.text_field, exclude=list(args.exclude or []), val_share=args.val_share, shard_dir=args.shard_dir,
                      tokenizer=args.tokenizer)
    if text:
        from nanoseek.text.sources import discover

        data.split_settings()
        discover(data.data, data.exclude)  # a missing path or an empty directory fails here, before any file is written
        return PretrainConfig(model=model, train=train, data=data, dense=args.dense,
                              precision=args.precision or "fp32", time_schedule=time_schedule)
    from nanoseek.tasks import get_task

    get_task(data.task).check_difficulty(data.difficulty)  # bad task names / difficulties fail here, before any work
    for name, share in (("--flawed-share", data.flawed_share), ("--fact-share", data.fact_share),
                        ("--reflect-share", data.reflect_share)):
        if not 0.0 <= share <= 1.0:
            raise ConfigError(f"{name} must be in [0, 1], got {share}")
    if data.n_docs < 1 or data.n_test_docs < 1:
        raise ConfigError("--n-docs and --n-test-docs must be >= 1")
    return PretrainConfig(model=model, train=train, data=data, dense=args.dense, precision=args.precision or "fp32")


def run(args: argparse.Namespace) -> int:
    cfg = resolve_config(args)
    dist = setup_distributed(args.device)
    try:
        s = pretrain(args.out, cfg, resume=args.resume, dist=dist, ep=args.ep, ep_redundant=args.ep_redundant,
                     pp=args.pp, pp_schedule=args.pp_schedule, pp_microbatches=args.pp_microbatches)
    finally:
        dist.close()
    if dist.is_main and s["loss"] is not None:
        ev = "-" if s["eval_loss"] is None else f"{s['eval_loss']:.4f}"
        print(f"done: step {s['step']}, train loss {s['loss']:.4f}, held-out CE {ev}, "
              f"{s['tokens_per_s']:,.0f} tokens/s; report: {Path(args.out) / 'report.md'}")
    elif dist.is_main:
        print(f"nothing to do: the run is already at step {s['step']} of {cfg.train.steps}")
    return 0
