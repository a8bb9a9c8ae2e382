"""Decode time per token, dense vs DeepSeek Sparse Attention, at long context on one CPU thread.

One model (the bench/dsa_train.py shape: 3 layers, dim 96, 4 heads, latents 48, rope 16, vocab 4096) with and
without indexers (4 heads x 32, index_topk = --topk): one decode step (absorbed attention on the fused weights,
then the output head) after a cache of S tokens, for S in --contexts. The cache is filled with random latents (a
16K prefill would cost minutes and does not change a decode step's work). Dense and sparse steps alternate,
medians of --reps. Also printed: attention multiply-adds per token and layer from the closed forms
    dense:  H * (2 r + d_rope) * S
    sparse: n_idx * d_idx * S  (index scores)  +  H * (2 r + d_rope) * k
and the cache numbers per token and layer. Usage:
    .venv/bin/python bench/dsa_decode.py --out docs/sparse_decode.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from nanoseek.config import ModelConfig
from nanoseek.io import atomic_write_text
from nanoseek.model import Transformer


def model_pair(max_len: int, topk: int, n_heads: int = 4) -> tuple[Transformer, Transformer]:
    """(dense, sparse) twins of the same weights; n_heads > 4 widens only MLA's heads (V3 has 128)."""
    base = dict(vocab_size=4096, dim=96, inter_dim=256, n_layers=3, n_dense_layers=3, n_routed_experts=0,
                n_heads=n_heads,
                q_lora_rank=48, kv_lora_rank=48, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16,
                max_seq_len=max_len, original_seq_len=max_len, n_mtp=0, init_std=0.02)
    torch.manual_seed(0)
    sparse = Transformer(ModelConfig(**base, index_topk=topk, index_n_heads=4, index_head_dim=32)).eval()
    dense = Transformer(ModelConfig(**base)).eval()
    dense.load_state_dict({k: v for k, v in sparse.state_dict().items() if ".indexer." not in k})
    for m in (dense, sparse):
        m.prepare_inference(True)
    return dense, sparse


@torch.no_grad()
def step_time(model: Transformer, cache: torch.Tensor, S: int) -> float:
    tok = torch.tensor([[7]])
    t0 = time.perf_counter()
    model.logits(model.hidden(tok, None, None, cache, S, absorb=True))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="2048,4096,8192,16384")
    ap.add_argument("--topk", type=int, default=512)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--out", default="docs/sparse_decode.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    contexts = [int(c) for c in args.contexts.split(",")]
    dense, sparse = model_pair(max(contexts) + 1, args.topk)
    cfg = sparse.cfg
    H, r, rope, k = cfg.n_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim, args.topk
    rows = []
    for S in contexts:
        caches = {}
        for name, m in (("dense", dense), ("sparse", sparse)):
            g = torch.Generator().manual_seed(S)
            caches[name] = torch.randn(cfg.n_layers, 1, S + 1, m.cfg.kv_cache_numbers_per_token_layer, generator=g)
        times: dict[str, list[float]] = {"dense": [], "sparse": []}
        for _ in range(args.reps):
            for name, m in (("dense", dense), ("sparse", sparse)):
                times[name].append(step_time(m, caches[name], S))
        d, s = statistics.median(times["dense"]), statistics.median(times["sparse"])
        macs_dense = H * (2 * r + rope) * S
        macs_sparse = cfg.index_n_heads * cfg.index_head_dim * S + H * (2 * r + rope) * min(k, S)
        row = {"context": S, "topk": k, "dense_ms": 1e3 * d, "sparse_ms": 1e3 * s, "speedup": d / s,
               "attn_macs_per_layer_dense": macs_dense, "attn_macs_per_layer_sparse": macs_sparse}
        rows.append(row)
        print(f"S={S:6d} k={k}: dense {1e3 * d:7.2f} ms  sparse {1e3 * s:7.2f} ms  speedup {d / s:5.2f}x  "
              f"attention MACs/layer {macs_dense:,} vs {macs_sparse:,}", flush=True)
    out = {"rows": rows, "threads": 1, "reps": args.reps,
           "cache_numbers_per_token_layer": {"dense": dense.cfg.kv_cache_numbers_per_token_layer,
                                             "sparse": cfg.kv_cache_numbers_per_token_layer}}
    atomic_write_text(args.out, json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
