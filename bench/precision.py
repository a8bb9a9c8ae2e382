"""Mixed-precision pretraining against the V3 report's claim (sec. 3.3, fig. 10: FP8 relative loss error below
0.25% of BF16 training), on a CPU: fp32 vs bf16 vs fp8 (fine-grained) vs fp8-tensor (per-tensor ablation).

Every run of one config and seed starts from the same weights and sees the same batches (pretrain() with the
same seed and a shared tokenizer), so the loss gap between precisions is the precision's effect (plus the
divergence any perturbation causes). Reported per run pair: the relative gap of the smoothed training loss
(moving average over `--window` steps, averaged over the last 20% of steps) and of the held-out loss (final
evaluation), bf16 against fp32 and fp8 / fp8-tensor against bf16; the plot is the report's fig. 10 layout
(loss curves, the relative gap below).

    python bench/precision.py train --config tiny --precisions fp32,bf16,fp8,fp8-tensor --seeds 0 --steps 150
    python bench/precision.py report            # table + docs/img/precision.png from the runs on disk
    python bench/precision.py memory            # saved-for-backward bytes per step, measured and by formula

Run each `train` under `flock /tmp/nanoseek-heavy.lock` and keep it under 15 minutes (split by precision or
seed: runs already on disk are skipped).
"""
from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nanoseek.config import ModelConfig  # noqa: E402
from nanoseek.train import precision as prec  # noqa: E402
from nanoseek.train import pretrain as pt  # noqa: E402
from nanoseek.train.common import TrainConfig, setup_distributed  # noqa: E402
from nanoseek.train.metrics import read_metrics  # noqa: E402

OUT = Path("runs/bench_precision")
# mid: 16 routed experts, top-4, 4 groups of which 2 are kept (group-limited), dimension 256 (real 128-tiles)
MID = {"dim": 256, "inter_dim": 512, "moe_inter_dim": 128, "n_layers": 4, "n_dense_layers": 1, "n_heads": 4,
       "n_routed_experts": 16, "n_shared_experts": 1, "n_activated_experts": 4, "n_expert_groups": 4,
       "n_limited_groups": 2, "kv_lora_rank": 128, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16,
       "v_head_dim": 32, "max_seq_len": 256, "original_seq_len": 256, "n_mtp": 1}
REFERENCE = {"bf16": ["fp32"], "fp8": ["bf16", "fp32"], "fp8-tensor": ["bf16", "fp32"], "fp32-ulp": ["fp32"]}
# the control: fp32 training from initial weights each moved by one ulp (a random half up, the rest down), so its
# gap to fp32 is what trajectory divergence alone produces from the smallest perturbation there is
CONTROL = "fp32-ulp"
VARIANTS = (*prec.PRECISIONS, CONTROL)


def model_config(name: str) -> ModelConfig:
    return ModelConfig.preset("tiny") if name == "tiny" else ModelConfig(**MID)


def run_config(name: str, precision: str, seed: int, steps: int, batch: int, seq_len: int) -> pt.PretrainConfig:
    train = TrainConfig(steps=steps, seed=seed, batch_size=batch, seq_len=seq_len, warmup_steps=max(1, steps // 15),
                        lr=4e-3 if name == "tiny" else 2e-3, eval_interval=max(1, steps // 5), eval_batches=8,
                        ckpt_interval=0, keep_last=1)
    return pt.PretrainConfig(model=model_config(name), train=train, data=pt.DataConfig(n_docs=20_000, n_test_docs=500),
                             precision=precision)


def train(args) -> None:
    dist = setup_distributed("cpu")
    for seed in args.seeds:
        tok = args.out / args.config / f"tokenizer_seed{seed}.json"
        for p in args.precisions:
            run = args.out / args.config / f"{p}_seed{seed}"
            if (run / "report.md").exists():
                print(f"skip {run} (done)")
                continue
            shutil.rmtree(run, ignore_errors=True)
            run.mkdir(parents=True)
            if tok.exists():
                shutil.copy(tok, run / "tokenizer.json")
            precision = "fp32" if p == CONTROL else p
            with one_ulp_init(seed, enable=p == CONTROL):
                s = pt.pretrain(run, run_config(args.config, precision, seed, args.steps, args.batch, args.seq_len),
                                dist=dist)
            if not tok.exists():
                shutil.copy(run / "tokenizer.json", tok)
            print(f"{args.config} {p} seed {seed}: loss {s['loss']:.4f} eval {s['eval_loss']:.4f} "
                  f"{s['tokens_per_s']:,.0f} tok/s", flush=True)


@contextlib.contextmanager
def one_ulp_init(seed: int, enable: bool):
    """While active, every model pretrain() builds has each initial weight moved by one ulp (nextafter towards
    +inf or -inf, a seeded coin per element) before the optimizer sees it: relative change ~6e-8."""
    if not enable:
        yield
        return
    configure = pt.prec.configure_model

    def nudged(model, precision):
        g = torch.Generator().manual_seed(10_000 + seed)
        with torch.no_grad():
            for q in model.parameters():
                up = torch.rand(q.shape, generator=g) < 0.5
                q.copy_(torch.nextafter(q, torch.where(up, torch.inf, -torch.inf)))
        return configure(model, precision)

    pt.prec.configure_model = nudged
    try:
        yield
    finally:
        pt.prec.configure_model = configure


def smooth(xs: list[float], w: int) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x - (xs[i - w] if i >= w else 0.0)
        out.append(acc / min(i + 1, w))
    return out


def load_runs(root: Path) -> dict:
    """{config: {precision: {seed: (train losses by step, final held-out loss)}}} of the finished runs."""
    runs: dict = {}
    for d in sorted(root.glob("*/*_seed*")):
        if not (d / "report.md").exists():
            continue
        p, seed = d.name.rsplit("_seed", 1)
        rows = read_metrics(d / "metrics.jsonl")
        main = [r["main"] for r in rows]
        ev = [r["eval_loss"] for r in rows if "eval_loss" in r]
        runs.setdefault(d.parent.name, {}).setdefault(p, {})[int(seed)] = (main, ev[-1], rows[-1]["tokens_per_s"])
    return runs


def report(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = load_runs(args.out)
    configs = [c for c in ("tiny", "mid") if c in runs]
    fig, axes = plt.subplots(2, len(configs), figsize=(6 * len(configs), 7), squeeze=False,
                             gridspec_kw={"height_ratios": [2, 1]})
    print("| config | precision | vs | seeds | steps | smoothed train loss | gap (last 20%) | held-out | gap | tok/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for j, name in enumerate(configs):
        for p in VARIANTS:
            if p not in runs[name]:
                continue
            seeds = sorted(runs[name][p])
            curves = [smooth(runs[name][p][s][0], args.window) for s in seeds]
            n = min(len(c) for c in curves)
            mean = [statistics.fmean(c[i] for c in curves) for i in range(n)]
            axes[0][j].plot(range(1, n + 1), mean, label=p, lw=1)
            tail = slice(int(0.8 * n), n)
            train_final = statistics.fmean(mean[tail])
            ev = statistics.fmean(runs[name][p][s][1] for s in seeds)
            tps = statistics.median(runs[name][p][s][2] for s in seeds)
            for ref in REFERENCE.get(p, [None]):
                row(name, p, ref, seeds, n, train_final, ev, tps, runs, args, axes[1][j])
        axes[0][j].set_title(f"{name}: smoothed training loss (window {args.window}, mean of seeds)")
        axes[0][j].set_ylim(top=min(axes[0][j].get_ylim()[1], 3.0))
        axes[0][j].legend()
        axes[1][j].axhline(0.25, color="k", ls=":", lw=0.8)
        axes[1][j].axhline(-0.25, color="k", ls=":", lw=0.8)
        axes[1][j].set_ylabel("relative gap (%)")
        axes[1][j].set_xlabel("step")
        axes[1][j].set_ylim(-3, 3)
        axes[1][j].legend(fontsize=8)
    fig.tight_layout()
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=110)
    print(f"plot: {args.plot}")


def row(name, p, ref, seeds, n, train_final, ev, tps, runs, args, ax) -> None:
    """One table line: p against ref, per seed, and its gap curve (first common seed) on ax."""
    common = [s for s in seeds if ref in runs[name] and s in runs[name][ref]]
    gap_t = gap_e = "-"
    if common:
        gaps, egaps = [], []
        for s in common:
            a, b = smooth(runs[name][p][s][0], args.window), smooth(runs[name][ref][s][0], args.window)
            m = min(len(a), len(b))
            rel = [(a[i] - b[i]) / b[i] for i in range(m)]
            gaps.append(statistics.fmean(rel[int(0.8 * m):]))
            egaps.append((runs[name][p][s][1] - runs[name][ref][s][1]) / runs[name][ref][s][1])
            if s == common[0]:
                ax.plot(range(1, m + 1), [100 * r for r in rel], label=f"{p} vs {ref}", lw=1)
        gap_t = " / ".join(f"{100 * g:+.2f}%" for g in gaps)
        gap_e = " / ".join(f"{100 * g:+.2f}%" for g in egaps)
    print(f"| {name} | {p} | {ref or '-'} | {len(seeds)} | {n} | {train_final:.4f} | {gap_t} | {ev:.4f} | "
          f"{gap_e} | {tps:,.0f} |")


def fixed(args) -> None:
    """The precision's own error, without trajectory divergence: the final weights of each fp32 run, scored on
    its held-out rows in every precision (relative held-out loss error against fp32) and one training batch's
    gradient (cosine similarity and relative norm error against the fp32 gradient)."""
    from nanoseek.data import eval_batches
    from nanoseek.model import Transformer
    from nanoseek.tokenizer import Tokenizer
    from nanoseek.train.checkpoint import latest_checkpoint, load_model_weights

    print("| config | seed | precision | held-out CE | rel. error vs fp32 | grad cosine | grad norm rel. error |")
    print("|---|---|---|---|---|---|---|")
    for d in sorted(args.out.glob("*/fp32_seed*")):
        if not (d / "report.md").exists():
            continue
        cfg = pt.PretrainConfig.load(d)
        _, test_rows = pt.build_rows(Tokenizer.load(d / "tokenizer.json"), cfg.data, cfg.train.seq_len, cfg.train.seed)
        batches = list(eval_batches(test_rows, cfg.train.batch_size, cfg.train.eval_batches, 0, 1))
        ref = None
        for p in prec.PRECISIONS:
            model = prec.configure_model(Transformer(prec.model_config(cfg.model, p)), p).train()
            load_model_weights(latest_checkpoint(d / "checkpoints"), model)
            model.eval()
            with torch.no_grad(), prec.autocast(p):
                ce = statistics.fmean(model(x, y)[1].main.item() for x, y in batches)
            model.train()
            with prec.autocast(p):
                loss = model(*batches[0])[1].main
            loss.backward()
            g = torch.cat([q.grad.flatten() for q in model.parameters() if q.grad is not None]).double()
            ref = ref or (ce, g)
            cos = float(torch.nn.functional.cosine_similarity(g, ref[1], dim=0))
            print(f"| {d.parent.name} | {d.name.rsplit('_seed', 1)[1]} | {p} | {ce:.4f} | {100 * (ce - ref[0]) / ref[0]:+.3f}% | "
                  f"{cos:.5f} | {100 * (g.norm() / ref[1].norm() - 1):+.2f}% |")


def memory(args) -> None:
    """Bytes saved for backward by one training forward (unique storages, parameters and autocast's cached
    weight copies excluded), by dtype, next to the formula for the Linear inputs: sum over the model's FP8-able
    linears of tokens_in x in_features x bytes (fp32 4, bf16 2, fp8 1 + 4/128 for the 1x128 scales)."""
    from nanoseek.model import Transformer
    from nanoseek.model.fp8 import Linear

    print("| config | precision | saved total (MiB) | fp32 | bf16 | fp8 | Linear inputs: formula (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for name in ("tiny", "mid"):
        for p in prec.PRECISIONS[:3]:
            torch.manual_seed(0)
            model = prec.configure_model(Transformer(prec.model_config(model_config(name), p)), p).train()
            ids = torch.randint(0, model.cfg.vocab_size, (args.batch, args.seq_len + 1))
            params = {q.untyped_storage().data_ptr() for q in model.parameters()}
            shapes = {tuple(q.shape) for q in model.parameters() if q.dim() == 2}
            seen, by_dtype, lin_in = set(), {}, []
            hooks = [m.register_forward_pre_hook(lambda mod, a: lin_in.append(a[0].numel())) for m in model.modules()
                     if isinstance(m, Linear)]

            def pack(t):
                ptr = t.untyped_storage().data_ptr()
                weight_copy = t.dtype == torch.bfloat16 and tuple(t.shape) in shapes
                if ptr not in seen and ptr not in params and not weight_copy:
                    seen.add(ptr)
                    by_dtype[t.dtype] = by_dtype.get(t.dtype, 0) + t.untyped_storage().nbytes()
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), prec.autocast(p):
                _, parts = model(ids[:, :-1], ids[:, 1:])
            for h in hooks:
                h.remove()
            per = {"fp32": 4, "bf16": 2}.get(p, 1 + 4 / 128)
            mib = 2 ** 20
            print(f"| {name} | {p} | {sum(by_dtype.values()) / mib:.1f} | {by_dtype.get(torch.float32, 0) / mib:.1f} | "
                  f"{by_dtype.get(torch.bfloat16, 0) / mib:.1f} | {by_dtype.get(torch.float8_e4m3fn, 0) / mib:.1f} | "
                  f"{sum(lin_in) * per / mib:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=["train", "report", "memory", "fixed"])
    ap.add_argument("--config", default="tiny", choices=["tiny", "mid"])
    ap.add_argument("--precisions", default="fp32,bf16,fp8,fp8-tensor")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--window", type=int, default=20)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--plot", type=Path, default=Path("docs/img/precision.png"))
    args = ap.parse_args()
    args.precisions = [p if p == CONTROL else prec.check(p) for p in args.precisions.split(",")]
    args.seeds = [int(s) for s in args.seeds.split(",")]
    {"train": train, "report": report, "memory": memory, "fixed": fixed}[args.mode](args)


if __name__ == "__main__":
    main()
