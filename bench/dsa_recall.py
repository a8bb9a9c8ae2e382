"""How much of the dense attention mass a top-k selection can hold, and how much the indexer's does, on a
pretraining run's own held-out rows (DeepSeek-V3.2-Exp sec. 2.1.1: the warm-up trains the indexer toward the
dense attention distribution).

For each run given: per main layer, at each k,
    oracle  = mean over queries t >= k of the dense attention mass (heads' mean) in its k largest entries
              (the ceiling of ANY selection of k keys: what "recall >= 90%" asks of an indexer is bounded by it)
    indexer = the same mass inside the run's indexer's top-k (sparse runs only; attention run dense)
    ratio   = indexer / oracle
and, from the run's metrics.jsonl, its last held-out loss and bits per byte. Rows: the first --rows held-out
rows of the run's corpus (text shards or the task's test split) at the run's seq_len. Usage:
    .venv/bin/python bench/dsa_recall.py runs/text_base runs/text_warm16 --k 16,8 --out docs/sparse_recall.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from nanoseek.io import atomic_write_text
from nanoseek.model import Transformer
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.checkpoint import latest_checkpoint, load_model_weights
from nanoseek.train.metrics import read_metrics
from nanoseek.train.pretrain import PretrainConfig, build_rows
from nanoseek.train.sparse_attention import indexer_recall, oracle_recall


def held_out_rows(run: Path, cfg: PretrainConfig, n: int) -> torch.Tensor:
    """The first n held-out rows (n, seq_len + 1) the run evaluates on."""
    L = cfg.train.seq_len
    if cfg.data.is_text:
        from nanoseek.data import TokenRows
        from nanoseek.text.shards import Shards
        from nanoseek.text.sources import read_json_safely

        root = Path(cfg.data.shard_dir) if cfg.data.shard_dir else run / "shards"
        rows = TokenRows(Shards(root, read_json_safely(root / "manifest.json")).stream("val"), L)
        return rows[:min(n, rows.size(0))]
    return build_rows(Tokenizer.load(run / "tokenizer.json"), cfg.data, L, cfg.train.seed)[1][:n]


def measure(run: Path, ks: list[int], n_rows: int) -> dict:
    cfg = PretrainConfig.load(run)
    model = Transformer(cfg.model).eval()
    load_model_weights(latest_checkpoint(run / "checkpoints"), model)
    ids = held_out_rows(run, cfg, n_rows)[:, :-1]
    last = [r for r in read_metrics(run / "metrics.jsonl") if "eval_loss" in r][-1]
    out = {"run": str(run), "step": last["step"], "index_topk": cfg.model.index_topk, "seq_len": ids.size(1),
           "rows": ids.size(0), "eval_loss": last["eval_loss"], "val_bpb": last.get("val_bpb"), "k": {}}
    torch.manual_seed(0)
    for k in ks:
        row = {"oracle": oracle_recall(model, ids, k)}
        if cfg.model.sparse_attention:
            row["indexer"] = indexer_recall(model, ids, k)
            row["ratio"] = [i / o for i, o in zip(row["indexer"], row["oracle"])]
        out["k"][str(k)] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--k", default="16,8", help="comma-separated top-k sizes")
    ap.add_argument("--rows", type=int, default=16, help="held-out rows measured")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.set_num_threads(1)
    ks = [int(k) for k in args.k.split(",")]
    results = []
    for run in args.runs:
        r = measure(Path(run), ks, args.rows)
        results.append(r)
        bpb = f"  bpb {r['val_bpb']:.4f}" if r["val_bpb"] is not None else ""
        print(f"{run}: step {r['step']}, held-out loss {r['eval_loss']:.4f}{bpb}, index_topk "
              f"{r['index_topk'] or '-'}, L {r['seq_len']}", flush=True)
        for k, row in r["k"].items():
            fmt = lambda xs: " ".join(f"{x:.3f}" for x in xs)  # noqa: E731
            line = f"  k={k:>4}: oracle {fmt(row['oracle'])}"
            if "indexer" in row:
                line += f" | indexer {fmt(row['indexer'])} | ratio {fmt(row['ratio'])}"
            print(line, flush=True)
    if args.out:
        atomic_write_text(args.out, json.dumps({"threads": 1, "rows": args.rows, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
