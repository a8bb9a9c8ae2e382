"""Prefill time, dense vs DeepSeek Sparse Attention, at long context on one CPU thread.

The bench/dsa_decode.py model pair (3 layers, dim 96, 4 heads (--heads: more), latents 48, rope 16, vocab
4096; the sparse twin adds indexers of 4 heads x 32, index_topk = --topk): one prefill of S random tokens into
an empty cache, as the engine does it (`model.hidden(ids, cache=cache, start=0)`, then the last position's logits). Dense: MLA's naive
path, PyTorch's fused causal SDPA over the decompressed keys. Sparse: per chunk of 256 queries the index scores
over the causally visible keys, a top-k, and attention in MLA's absorbed (MQA) form over the k gathered latents
(MLA._attend_gathered). Dense and sparse runs alternate, medians of --reps. Also printed: attention multiply-adds
per layer from the closed forms (T = S tokens, causal, C = 256-query chunks)
    dense:  H (d_qk + d_v) T (T + 1) / 2
    sparse: n_idx d_idx sum_chunks(chunk x visible keys)  +  H (2 r + d_rope) sum_t min(k, t)
            + H d_nope r T (query absorption) + H r d_v T (value up-projection)
Usage:
    .venv/bin/python bench/dsa_prefill.py --out docs/sparse_prefill.json
    .venv/bin/python bench/dsa_prefill.py --heads 32 --out docs/sparse_prefill_h32.json
    .venv/bin/python bench/dsa_prefill.py --plot docs/img/dsa_time.png --plot-also docs/sparse_prefill_h32.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dsa_decode import model_pair  # noqa: E402

from nanoseek.io import atomic_write_text  # noqa: E402
from nanoseek.model import Transformer  # noqa: E402
from nanoseek.model.attention import MLA  # noqa: E402


@torch.no_grad()
def prefill_time(model: Transformer, ids: torch.Tensor) -> float:
    cache = torch.zeros(model.cfg.n_layers, 1, ids.size(1), model.cfg.kv_cache_numbers_per_token_layer)
    t0 = time.perf_counter()
    model.logits(model.hidden(ids, cache=cache, start=0)[:, -1:])
    return time.perf_counter() - t0


def attention_macs(cfg, T: int, k: int, chunk: int) -> tuple[int, int]:
    H, r, rope = cfg.n_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    dense = H * (cfg.qk_nope_head_dim + rope + cfg.v_head_dim) * T * (T + 1) // 2
    index = cfg.index_n_heads * cfg.index_head_dim * sum(min(chunk, T - c) * min(T, c + chunk)
                                                         for c in range(0, T, chunk))
    sparse = (index + H * (2 * r + rope) * sum(min(k, t) for t in range(1, T + 1))
              + H * cfg.qk_nope_head_dim * r * T + H * r * cfg.v_head_dim * T)
    return dense, sparse


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="2048,4096,8192,16384")
    ap.add_argument("--topk", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--heads", type=int, default=4, help="MLA heads (4 = the bench/dsa_train.py model; V3: 128)")
    ap.add_argument("--out", default="docs/sparse_prefill.json")
    ap.add_argument("--plot", default="", help="PNG of time vs context: these prefill rows and, with "
                    "--decode-json, bench/dsa_decode.py's rows")
    ap.add_argument("--decode-json", default="docs/sparse_decode.json")
    ap.add_argument("--plot-also", default="", help="another run's prefill JSON drawn beside (e.g. --heads 32)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    contexts = [int(c) for c in args.contexts.split(",")]
    dense, sparse = model_pair(max(contexts) + 1, args.topk, args.heads)
    chunk = MLA.gather_chunk
    rows = []
    for S in contexts:
        ids = torch.randint(0, sparse.cfg.vocab_size, (1, S), generator=torch.Generator().manual_seed(S))
        times: dict[str, list[float]] = {"dense": [], "sparse": []}
        for _ in range(args.reps):
            for name, m in (("dense", dense), ("sparse", sparse)):
                times[name].append(prefill_time(m, ids))
        d, s = statistics.median(times["dense"]), statistics.median(times["sparse"])
        macs_d, macs_s = attention_macs(sparse.cfg, S, args.topk, chunk)
        rows.append({"context": S, "topk": args.topk, "heads": args.heads, "dense_s": d, "sparse_s": s,
                     "speedup": d / s,
                     "attn_macs_per_layer_dense": macs_d, "attn_macs_per_layer_sparse": macs_s})
        print(f"H={args.heads} S={S:6d} k={args.topk}: dense {d:7.3f} s  sparse {s:7.3f} s  speedup {d / s:5.2f}x  "
              f"attention MACs/layer {macs_d / 1e9:.2f}G vs {macs_s / 1e9:.2f}G", flush=True)
    atomic_write_text(args.out, json.dumps({"rows": rows, "threads": 1, "reps": args.reps, "chunk": chunk},
                                           indent=2) + "\n")
    if args.plot:
        also = json.loads(Path(args.plot_also).read_text())["rows"] if args.plot_also else None
        plot(rows, args.decode_json, args.plot, also)


def plot(rows: list[dict], decode_json: str, path: str, also: list[dict] | None = None) -> None:
    """Prefill seconds (and decode ms per token, when its JSON exists) against context, dense vs sparse."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nanoseek.io import atomic_write

    panels = [("prefill", rows, "s", "prefill time (s)")]
    if decode_json and Path(decode_json).exists():
        panels.append(("decode", json.loads(Path(decode_json).read_text())["rows"], "ms", "decode step (ms)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
    for ax, (name, pts, unit, ylabel) in zip(axes[0], panels):
        xs = [r["context"] for r in pts]
        for kind in ("dense", "sparse"):
            ax.plot(xs, [r[f"{kind}_{unit}"] for r in pts], marker="o", label=f"{kind}, {pts[0].get('heads', 4)} heads")
            if name == "prefill" and also:
                ax.plot([r["context"] for r in also], [r[f"{kind}_s"] for r in also], marker="s", ls="--",
                        label=f"{kind}, {also[0]['heads']} heads")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{name}, top-k {pts[0]['topk']}, 1 thread")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


if __name__ == "__main__":
    main()
