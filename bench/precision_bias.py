"""Is a precision's gradient error noise or a bias? (issue 33; DeepSeek-V3 report sec. 3.3.)

At fixed weights (a run's checkpoint) and for a few training batches b, the error of a precision's gradient
against the fp32 gradient, e_b = g_P(b) - g_fp32(b), over the transformer layers' parameters:

* |e_b| / |g_b|: its size;
* cos(e_b, e_b') for two batches: rounding noise changes from batch to batch (low cosine), a bias repeats
  (high cosine; compare with cos(g_b, g_b'), how much the gradients themselves repeat);
* cos(e_b, g_b): a negative value means the error cancels part of the gradient (a slowdown, not noise).

`--bf16 NAMES` runs the FP8 linears whose module name contains one of the comma-separated NAMES in BF16
instead (an ablation that locates the bias; "attn" = every attention projection).

    python bench/precision_bias.py runs/seed11_fp32 --step 300 --batches 3
    python bench/precision_bias.py runs/seed11_fp32 --step 300 --bf16 attn --bf16 attn.wkv_a --bf16 ffn

Simplification: gradients of main + mtp_lambda * mtp loss (the balance term is 1e-4 of it and left out).
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nanoseek.data import eval_batches  # noqa: E402
from nanoseek.model import Transformer  # noqa: E402
from nanoseek.model.fp8 import Linear  # noqa: E402
from nanoseek.tokenizer import Tokenizer  # noqa: E402
from nanoseek.train import precision as prec  # noqa: E402
from nanoseek.train import pretrain as pt  # noqa: E402
from nanoseek.train.checkpoint import load_model_weights  # noqa: E402


def layer_grads(run: Path, step: int, precision: str, batches: list, bf16: tuple[str, ...] = ()) -> list[torch.Tensor]:
    """The flattened gradient of the transformer layers' parameters for each batch, in `precision`."""
    cfg = pt.PretrainConfig.load(run)
    model = prec.configure_model(Transformer(prec.model_config(cfg.model, precision)), precision).train()
    load_model_weights(run / "checkpoints" / f"step_{step}", model)
    for name, m in model.named_modules():
        if isinstance(m, Linear) and any(k in name for k in bf16):
            m.fp8 = False  # plain F.linear: BF16 under the autocast
    out = []
    for x, y in batches:
        model.zero_grad(set_to_none=True)
        with prec.autocast(precision):
            parts = model(x, y)[1]
        (parts.main + cfg.train.mtp_lambda * parts.mtp).backward()
        out.append(torch.cat([q.grad.flatten().double() for n, q in model.named_parameters()
                              if q.grad is not None and n.startswith("layers.")]))
    return out


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def error_stats(got: list[torch.Tensor], ref: list[torch.Tensor]) -> tuple[list[float], list[float], list[float]]:
    """(|e_b|/|g_b| per batch, cos(e_b, e_b') per pair, cos(e_b, g_b) per batch)."""
    err = [a - b for a, b in zip(got, ref)]
    pairs = itertools.combinations(range(len(err)), 2)
    return ([float(e.norm() / g.norm()) for e, g in zip(err, ref)], [cos(err[i], err[j]) for i, j in pairs],
            [cos(e, g) for e, g in zip(err, ref)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a pretrain run directory with checkpoints/step_N")
    ap.add_argument("--step", type=int, required=True)
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--bf16", action="append", default=[], help="comma-separated module-name parts kept in BF16")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = pt.PretrainConfig.load(args.run)
    rows, _ = pt.build_rows(Tokenizer.load(args.run / "tokenizer.json"), cfg.data, cfg.train.seq_len, cfg.train.seed)
    batches = list(eval_batches(rows[1000:], cfg.train.batch_size, args.batches, 0, 1))  # training rows
    ref = layer_grads(args.run, args.step, "fp32", batches)
    g_pairs = [cos(ref[i], ref[j]) for i, j in itertools.combinations(range(len(ref)), 2)]
    print(f"cos(g_b, g_b') of the fp32 gradients: {' '.join(f'{c:.2f}' for c in g_pairs)}")
    print("| precision | kept in BF16 | abs(e)/abs(g) | cos(e_b, e_b') | cos(e_b, g_b) |")
    print("|---|---|---|---|---|")
    variants = [("bf16", ()), ("fp8", ())] + [("fp8", tuple(s.split(","))) for s in args.bf16]
    for p, keep in variants:
        size, rep, align = error_stats(layer_grads(args.run, args.step, p, batches, keep), ref)
        fmt = lambda xs: " ".join(f"{x:.2f}" for x in xs)  # noqa: E731
        print(f"| {p} | {', '.join(keep) or '-'} | {fmt(size)} | {fmt(rep)} | {fmt(align)} |", flush=True)


if __name__ == "__main__":
    main()
