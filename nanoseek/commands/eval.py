"""`nanoseek eval`: held-out pass@1 (T=0.6/top-p 0.95 and T=1.0, mean over K samples) and greedy accuracy on a
task, or with `--data PATH` bits per byte on text (nanoseek.text.evaluate):

    nanoseek eval --run runs/lm --data ~/held_out_texts --max-bytes 2000000 --json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from nanoseek import sandbox
from nanoseek.evaluate import evaluate
from nanoseek.io import atomic_write_text
from nanoseek.hf_tokenizer import load_tokenizer
from nanoseek.train.checkpoint import load_run_model


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--task", default="arithmetic")
    sandbox.add_unsafe_argument(p)
    p.add_argument("--difficulty", type=int, default=None,
                   help="task difficulty (default: the one the run was trained on, else the task's default)")
    p.add_argument("--n", type=int, default=200, help="held-out problems")
    p.add_argument("--samples", type=int, default=4, help="K samples per problem for pass@1")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--out", help="JSON file to write (default RUN/eval_TASK.json; with --data none unless given)")
    p.add_argument("--data", action="append", default=None, metavar="PATH",
                   help="bits per byte on this text instead of a task (file, directory or glob; repeatable)")
    p.add_argument("--text-field", default="text", help="JSONL / parquet field holding the text (--data)")
    p.add_argument("--max-bytes", type=int, default=10_000_000, help="UTF-8 bytes of --data read at most")
    p.add_argument("--json", action="store_true", help="print one JSON object (--data) instead of a table")


def results_table(rows: dict[str, dict]) -> Table:
    t = Table(title="held-out evaluation")
    for col in ("model", "pass@1 T=0.6", "pass@1 T=1.0", "greedy", "format", "mean len"):
        t.add_column(col, justify="right" if col != "model" else "left")
    for name, r in rows.items():
        t.add_row(name, f"{r['pass1']:.1%}", f"{r['pass1_t1']:.1%}", f"{r['greedy']:.1%}",
                  f"{r['format_rate']:.1%}", f"{r['mean_len']:.1f}")
    return t


def trained_difficulty(run_dir: str | Path, task: str) -> int | None:
    """The difficulty recorded in a run's config.json (RL or pretraining section) when it trained on `task`."""
    path = Path(run_dir) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    for section in ("rl", "data"):
        sec = cfg.get(section) or {}
        if sec.get("task") == task and sec.get("difficulty") is not None:
            return int(sec["difficulty"])
    return None


def run_text(args: argparse.Namespace) -> int:
    from nanoseek.text.evaluate import evaluate_text

    model, _, step_dir = load_run_model(args.run)
    tokenizer = load_tokenizer(args.run)
    res = evaluate_text(model, tokenizer, args.data, args.max_bytes, args.text_field)
    res["run"], res["checkpoint"] = str(args.run), str(step_dir)
    if args.json:
        print(json.dumps(res))
    else:
        print(f"{res['bits_per_byte']:.4f} bits per byte on {res['bytes']:,} bytes ({res['tokens']:,} tokens, "
              f"{res['bytes_per_token']:.2f} bytes/token); byte-unigram entropy {res['byte_unigram_entropy']:.3f} "
              f"bits (ratio {res['bpb_over_entropy']:.3f})")
    if args.out:
        atomic_write_text(Path(args.out), json.dumps(res, indent=2) + "\n")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.data:
        return run_text(args)
    if args.n < 1 or args.samples < 1:
        raise ValueError("--n and --samples must be >= 1")
    sandbox.check_for_task(args.task, args.unsafe_no_sandbox)  # no sandbox: refuse before any work
    model, _, step_dir = load_run_model(args.run)
    tokenizer = load_tokenizer(args.run)
    difficulty = args.difficulty if args.difficulty is not None else trained_difficulty(args.run, args.task)
    res = evaluate(model, tokenizer, args.task, args.n, args.samples, args.max_new_tokens, args.seed,
                   difficulty).to_dict()
    res["run"], res["checkpoint"], res["difficulty"] = str(args.run), str(step_dir), difficulty
    Console().print(results_table({str(args.run): res}))
    out = Path(args.out) if args.out else Path(args.run) / f"eval_{args.task}.json"
    atomic_write_text(out, json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}")
    return 0
