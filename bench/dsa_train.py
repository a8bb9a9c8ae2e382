"""DeepSeek Sparse Attention trained as V3.2 did (report sec. 2.1.1), in miniature, on real text token shards.

1. pretrain a small dense model (MLA with a query latent, dense FFNs) for --dense-steps;
2. for k in (L/8, L/16): add fresh indexers (add_indexers), dense warm-up (only the indexers, KL to the main
   attention) for --warmup-steps, recording the indexer's recall of the dense attention mass at k; then the
   sparse stage (everything trained, attention over the top-k) for --steps;
3. the baseline: the dense model continued for the same --steps through the same code (train_stage "sparse"
   with index_topk = L, where nothing is dropped): same data, optimizer and learning rate;
4. held-out loss (and bits per token) of every branch on the same validation rows.

Writes a JSON of every figure to --out. Uses one thread. Usage:
    .venv/bin/python bench/dsa_train.py --shards /work/main/runs/lm/base/shards --out docs/sparse_attention.json
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from nanoseek.config import ModelConfig
from nanoseek.io import atomic_write_text
from nanoseek.model import Transformer
from nanoseek.train.sparse_attention import add_indexers, batches, indexer_recall, train_stage


def rows(path: Path, L: int, limit: int | None = None) -> torch.Tensor:
    tokens = np.fromfile(path, dtype=np.uint16).astype(np.int64)
    n = (len(tokens) - 1) // L
    if limit:
        n = min(n, limit)
    idx = np.arange(n)[:, None] * L + np.arange(L + 1)[None]
    return torch.from_numpy(tokens[idx])


@torch.no_grad()
def val_loss(model: Transformer, val: torch.Tensor, bs: int = 8) -> float:
    model.eval()
    tot = 0.0
    for i in range(0, len(val), bs):
        r = val[i:i + bs]
        logits = model(r[:, :-1])
        tot += torch.nn.functional.cross_entropy(logits.flatten(0, 1), r[:, 1:].flatten(), reduction="sum").item()
    return tot / (val.size(0) * (val.size(1) - 1))


def dense_train(model: Transformer, data, steps: int, lr: float, warmup: int = 50) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup)
                                              * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0)))))
    model.train()
    losses = []
    it = iter(data)
    for _ in range(steps):
        r = next(it)
        _, parts = model(r[:, :-1], r[:, 1:])
        opt.zero_grad(set_to_none=True)
        parts.main.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(parts.main.item())
    model.eval()
    return losses


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", default="/work/main/runs/lm/base/shards")
    ap.add_argument("--out", default="docs/sparse_attention.json")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--dense-steps", type=int, default=1200)
    ap.add_argument("--warmup-steps", type=int, default=150)
    ap.add_argument("--steps", type=int, default=200, help="sparse stage / dense continuation steps")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--val-rows", type=int, default=48)
    ap.add_argument("--dense-init", default="", help="a state_dict file: loaded if present, else written after "
                                                     "the dense pretraining")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    L = args.seq_len
    train = rows(Path(args.shards) / "train.bin", L)
    val = rows(Path(args.shards) / "val.bin", L, args.val_rows)
    cfg = ModelConfig(vocab_size=4096, dim=96, inter_dim=256, n_layers=3, n_dense_layers=3, n_routed_experts=0,
                      n_heads=4, q_lora_rank=48, kv_lora_rank=48, qk_nope_head_dim=16, qk_rope_head_dim=16,
                      v_head_dim=16, max_seq_len=L, original_seq_len=L, n_mtp=0, init_std=0.02)
    out: dict = {"seq_len": L, "config": cfg.to_dict(), "train_rows": len(train), "val_rows": len(val),
                 "args": vars(args), "threads": 1}
    t0 = time.perf_counter()
    dense = Transformer(cfg)
    if args.dense_init and Path(args.dense_init).exists():
        dense.load_state_dict(torch.load(args.dense_init))
        log = [float("nan")]
    else:
        log = dense_train(dense, batches(train, args.batch_size, seed=1), args.dense_steps, args.lr)
        if args.dense_init:
            torch.save(dense.state_dict(), args.dense_init)
    out["dense_pretrain"] = {"steps": args.dense_steps, "final_train_loss": float(np.mean(log[-50:])),
                             "val_loss": val_loss(dense, val), "seconds": time.perf_counter() - t0}
    print("dense pretrain", out["dense_pretrain"], flush=True)
    probe = val[:8, :-1]
    t0 = time.perf_counter()
    base = add_indexers(dense, index_topk=L, index_n_heads=4, index_head_dim=32)  # k = L: dense attention
    cont = train_stage(base, "sparse", batches(train, args.batch_size, seed=2), args.steps, lr=args.lr / 3,
                       indexer_lr=1e-3)
    out["dense_continued"] = {"steps": args.steps, "val_loss": val_loss(base, val),
                              "final_train_loss": float(np.mean([r["main"] for r in cont[-50:]])),
                              "seconds": time.perf_counter() - t0}
    print("dense continued", out["dense_continued"], flush=True)
    out["sparse"] = {}
    for k in (L // 8, L // 16):
        model = add_indexers(dense, index_topk=k, index_n_heads=4, index_head_dim=32)
        curve = [{"step": 0, "recall": indexer_recall(model, probe, k)}]
        t0 = time.perf_counter()
        chunk = max(args.warmup_steps // 5, 1)
        wlog: list[dict] = []
        data = batches(train, args.batch_size, seed=3)
        for done in range(chunk, args.warmup_steps + 1, chunk):
            wlog += train_stage(model, "warmup", data, chunk, lr=1e-2)
            curve.append({"step": done, "recall": indexer_recall(model, probe, k), "kl": wlog[-1]["indexer"]})
            print(f"k={k} warm-up", curve[-1], flush=True)
        warm_s = time.perf_counter() - t0
        sparse_before = val_loss(model, val)
        t0 = time.perf_counter()
        slog = train_stage(model, "sparse", batches(train, args.batch_size, seed=2), args.steps, lr=args.lr / 3,
                           indexer_lr=1e-3)
        res = {"k": k, "warmup_curve": curve, "warmup_seconds": warm_s,
               "val_loss_sparse_after_warmup": sparse_before, "val_loss_after_sparse_stage": val_loss(model, val),
               "recall_after_sparse_stage": indexer_recall(model, probe, k),
               "sparse_stage_seconds": time.perf_counter() - t0,
               "sparse_stage_final_train_loss": float(np.mean([r["main"] for r in slog[-50:]]))}
        out["sparse"][str(k)] = res
        print(f"k={k}", {a: b for a, b in res.items() if a != "warmup_curve"}, flush=True)
        atomic_write_text(args.out, json.dumps(out, indent=2) + "\n")
    atomic_write_text(args.out, json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
