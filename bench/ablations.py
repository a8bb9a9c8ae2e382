"""V3's own ablations in miniature on real text (issue 29), each gap judged against a one-ulp noise floor.

Arms (each `--steps` optimizer steps of `--batch` x `--seq-len` tokens: equal tokens; every arm of one seed sees
the same rows in the same order and starts from torch.manual_seed(seed)):
  bias   `tiny` MoE (8 routed top-2 + 1 shared), MTP depth 1, V3's auxiliary-loss-free bias, AdamW: the reference
  floor  bias with every initial weight moved by one ulp (bench/precision.py's control): what trajectory divergence
         alone does to the result, the noise floor every other gap is compared with
  aux    the batch-wise auxiliary loss instead of the bias (--aux-alpha 1e-3)      V3 Table 5, Wang et al. 2024
  none   no balancing (the sequence-wise loss, 1e-4, stays in every arm)
  mtp0   MTP depth 0 (the main model is the same; bpb is the main model's)       V3 Table 4
  dense  pretrain's dense_equivalent(tiny): a dense SwiGLU with tiny's activated parameters, MTP depth 1
         (compared with bias at equal tokens and at equal wall clock, each curve interpolated at the shorter
         arm's training seconds)                                                  nanochat's MoE-vs-dense
  muon   --optimizer muon (nanoseek.train.optim), same lr and weight decay (Moonlight's RMS matching)
  muon-clip  muon with QK-clip at --qk-clip-tau (not a default arm)               Moonlight, Kimi K2

Every arm records its max attention logit per step (optim.track_max_logit: the same extra QK^T in every arm).
Per seed, a gap between an arm and `bias` COUNTS only when it exceeds |floor - bias| of the same metric on every
seed and has the same sign on every seed. Muon: the tokens it needs to reach AdamW's (bias's) final held-out bpb
(linear interpolation between evaluations; "not reached" if it does not).

    python bench/ablations.py --steps 60 --seeds 3                       # the stdlib corpus of `make lm`
    python bench/ablations.py --data ~/texts --arms bias,floor,aux --steps 200

Reuses bench/text_vs_dense.py (data preparation, held-out bpb and MaxVio, curve interpolation). Writes
OUT/results.json, OUT/ablations.md (the table) and OUT/ablations.png (bpb vs tokens per arm, MaxVio per step,
max logit per step). Arms run one after another; under load the wall-clock comparison is provisional.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import text_vs_dense as tvd  # noqa: E402
from nanoseek.config import ConfigError, ModelConfig  # noqa: E402
from nanoseek.data import Loader  # noqa: E402
from nanoseek.io import atomic_write_text  # noqa: E402
from nanoseek.model import Transformer  # noqa: E402
from nanoseek.model.moe import max_vio  # noqa: E402
from nanoseek.train.common import Dist, TrainConfig, lr_at, set_lr  # noqa: E402
from nanoseek.train.optim import OptimConfig, build_optimizer, track_max_logit  # noqa: E402
from nanoseek.train.pretrain import dense_equivalent, train_step  # noqa: E402

OUT = Path("runs/bench_ablations")
ARMS = ("bias", "floor", "aux", "none", "mtp0", "dense", "muon", "muon-clip")
DEFAULT_ARMS = ARMS[:-1]
# (arm, reference, what the paper says the arm does against the reference)
CLAIMS = (("aux", "bias", "V3 Table 5 / Wang et al.: aux-free (bias) has lower loss and lower MaxVio than aux"),
          ("none", "bias", "balancing matters: no balancing has higher MaxVio"),
          ("mtp0", "bias", "V3 Table 4: MTP (depth 1) improves the main model at equal main-model cost"),
          ("dense", "bias", "MoE vs dense at equal activated parameters (nanochat: MoE loses on wall clock)"),
          ("muon", "bias", "Moonlight: Muon ~2x the compute efficiency of AdamW"),
          ("muon-clip", "muon", "Kimi K2: QK-clip bounds the max logit without hurting loss"))


def one_ulp(model: torch.nn.Module, seed: int) -> None:
    """Move every parameter by one ulp, up or down by a seeded coin (bench/precision.py's one_ulp_init)."""
    g = torch.Generator().manual_seed(10_000 + seed)
    with torch.no_grad():
        for q in model.parameters():
            up = torch.rand(q.shape, generator=g) < 0.5
            q.copy_(torch.nextafter(q, torch.where(up, torch.inf, -torch.inf)))


def arm_setup(name: str, vocab: int, args: argparse.Namespace) -> tuple[ModelConfig, TrainConfig, OptimConfig]:
    model = ModelConfig.preset("tiny", vocab_size=vocab)
    if name == "mtp0":
        model = dataclasses.replace(model, n_mtp=0).validate()
    if name == "dense":
        model = dense_equivalent(model)
    tcfg = TrainConfig(lr=args.lr, steps=args.steps, batch_size=args.batch, seq_len=args.seq_len,
                       warmup_steps=args.warmup, balance={"aux": "aux", "none": "none"}.get(name, "bias")).validate()
    ocfg = OptimConfig(optimizer="muon" if name.startswith("muon") else "adamw", log_max_logit=True,
                       qk_clip_tau=args.qk_clip_tau if name == "muon-clip" else 0.0)
    return model, tcfg, ocfg


def run_arm(name: str, seed: int, train, val, token_bytes: torch.Tensor, args: argparse.Namespace) -> dict:
    """`args.steps` steps of one arm; held-out bpb (and MaxVio) at step 0 and `args.evals` evenly spaced steps."""
    mcfg, tcfg, ocfg = arm_setup(name, int(token_bytes.numel()), args)
    torch.manual_seed(seed)
    model = Transformer(mcfg)
    if name == "floor":
        one_ulp(model, seed)
    opt = build_optimizer(model, tcfg, ocfg)
    track_max_logit(model, ocfg.tracks_logits)
    loader, dist = Loader(train, args.batch, seed), Dist()
    evals = {round(args.steps * (i + 1) / args.evals) for i in range(args.evals)}
    curve = [{"step": 0, "tokens": 0, "train_s": 0.0,
              **tvd.held_out(model, val, token_bytes, args.batch, args.eval_batches)}]
    per_step, train_s, cpu_s = [], 0.0, 0.0
    tokens_per_step = args.batch * args.seq_len
    for step in range(1, args.steps + 1):
        set_lr(opt, lr_at(step - 1, tcfg))
        t0, c0 = time.perf_counter(), time.process_time()
        out = train_step(model, opt, loader, tcfg, dist, qk_clip_tau=ocfg.qk_clip_tau)
        train_s += time.perf_counter() - t0
        cpu_s += time.process_time() - c0
        per_step.append({"step": step, "loss": out["loss"], "main": out["main"], "max_vio": max_vio(out["loads"]),
                         "max_logit": out.get("max_logit")})
        if step in evals:
            curve.append({"step": step, "tokens": step * tokens_per_step, "train_s": round(train_s, 3),
                          **tvd.held_out(model, val, token_bytes, args.batch, args.eval_batches)})
    last = curve[-1]
    print(f"  {name} seed {seed}: {args.steps} steps in {train_s:.0f} s, held-out bpb {last['val_bpb']:.4f}"
          + (f", MaxVio {last['val_max_vio']:.3f}" if "val_max_vio" in last else "")
          + f", max logit {per_step[-1]['max_logit']:.2f}", flush=True)
    vios = [s["max_vio"] for s in per_step[-max(1, args.steps // 4):] if s["max_vio"] is not None]
    return {"arm": name, "seed": seed, "tokens": args.steps * tokens_per_step, "train_s": train_s,
            "cpu_share": cpu_s / (train_s * torch.get_num_threads()), "final_bpb": last["val_bpb"],
            "val_max_vio": last.get("val_max_vio"), "max_vio": sum(vios) / len(vios) if vios else None,
            "max_logit": max(s["max_logit"] for s in per_step), "curve": curve, "per_step": per_step,
            "params": mcfg.param_counts()["active"]}


# ---- verdicts ---------------------------------------------------------------------------------------------------
def at_time(curve: list[dict], seconds: float) -> float:
    """Held-out bpb at `seconds` of training (linear between evaluations)."""
    return tvd.interpolate([{"tokens": p["train_s"], "val_bpb": p["val_bpb"]} for p in curve], seconds)


def tokens_to_reach(curve: list[dict], target: float) -> float | None:
    """The first (interpolated) token count at which the held-out bpb reaches `target`; None if never."""
    for a, b in zip(curve, curve[1:]):
        if b["val_bpb"] <= target:
            if a["val_bpb"] <= target or a["val_bpb"] == b["val_bpb"]:
                return float(a["tokens"])
            return a["tokens"] + (b["tokens"] - a["tokens"]) * (a["val_bpb"] - target) / (a["val_bpb"] - b["val_bpb"])
    return None


def counts(gaps: list[float], floors: list[float]) -> bool:
    """A gap counts when it exceeds the seed's floor on every seed, with one sign on every seed."""
    return (len(gaps) > 0 and all(abs(g) > f for g, f in zip(gaps, floors))
            and (all(g > 0 for g in gaps) or all(g < 0 for g in gaps)))


def compare(runs: list[dict], arm: str, ref: str, metric: str, at=None) -> dict | None:
    """Per seed: metric(arm) - metric(ref) and the floor |metric(floor) - metric(bias)|; `at(run, other)` picks a
    value from a run's curve instead of run[metric] (equal wall clock)."""
    by = {(r["arm"], r["seed"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs if (arm, r["seed"]) in by and (ref, r["seed"]) in by
                    and ("floor", r["seed"]) in by and ("bias", r["seed"]) in by})
    gaps, floors = [], []
    for s in seeds:
        a, b = by[(arm, s)], by[(ref, s)]
        fa, fb = by[("floor", s)], by[("bias", s)]
        va, vb = (at(a, b), at(b, a)) if at else (a[metric], b[metric])
        fva, fvb = (at(fa, fb), at(fb, fa)) if at else (fa[metric], fb[metric])
        if None in (va, vb, fva, fvb):
            continue
        gaps.append(va - vb)
        floors.append(abs(fva - fvb))
    if not gaps:
        return None
    return {"gaps": gaps, "floors": floors, "median_gap": statistics.median(gaps), "counts": counts(gaps, floors)}


def summarize(runs: list[dict]) -> dict:
    out: dict = {"arms": {}, "claims": []}
    for arm in dict.fromkeys(r["arm"] for r in runs):
        rs = [r for r in runs if r["arm"] == arm]
        med = {k: statistics.median(v) for k in ("final_bpb", "max_vio", "val_max_vio", "max_logit", "train_s")
               if (v := [r[k] for r in rs if r.get(k) is not None])}
        out["arms"][arm] = {**med, "seeds": len(rs), "per_seed_bpb": [r["final_bpb"] for r in rs],
                            "params_active": rs[0]["params"]}

    def equal_time(a: dict, b: dict) -> float:  # bpb of run a at the shorter run's training seconds
        return at_time(a["curve"], min(a["train_s"], b["train_s"]))

    for arm, ref, paper in CLAIMS:
        row = {"arm": arm, "ref": ref, "paper": paper,
               "bpb": compare(runs, arm, ref, "final_bpb"),
               "max_vio": compare(runs, arm, ref, "val_max_vio"),
               "max_logit": compare(runs, arm, ref, "max_logit")}
        if arm == "dense":
            row["bpb_equal_time"] = compare(runs, arm, ref, "final_bpb", at=equal_time)
        if arm == "muon-clip":  # the peak logit itself: the floor (AdamW's logits) is on another scale
            by = {(r["arm"], r["seed"]): r for r in runs}
            row["peak_logit"] = [(by[(arm, s)]["max_logit"], by[(ref, s)]["max_logit"])
                                 for s in sorted({r["seed"] for r in runs}) if (arm, s) in by and (ref, s) in by]
        if arm.startswith("muon") and ref == "bias":
            by = {(r["arm"], r["seed"]): r for r in runs}
            ratios = []
            for s in sorted({r["seed"] for r in runs}):
                if (arm, s) in by and ("bias", s) in by:
                    need = tokens_to_reach(by[(arm, s)]["curve"], by[("bias", s)]["final_bpb"])
                    ratios.append(None if need is None else need / by[("bias", s)]["tokens"])
            row["token_ratio"] = ratios
        if row["bpb"] is not None:
            out["claims"].append(row)
    return out


def _cell(c: dict | None, digits: int = 4) -> str:
    if c is None:
        return "-"
    gaps = ", ".join(f"{g:+.{digits}f}" for g in c["gaps"])
    return f"{gaps} ({'counts' if c['counts'] else 'within floor'})"


def _floor(c: dict | None, digits: int = 4) -> str:
    return "-" if c is None else ", ".join(f"{f:.{digits}f}" for f in c["floors"])


def table(summary: dict) -> str:
    lines = ["| arm | active params | held-out bpb (median; per seed) | MaxVio train / held-out | max logit | "
             "train s |", "|---|---|---|---|---|---|"]
    for arm, s in summary["arms"].items():
        vio = (f"{s['max_vio']:.3f} / {s['val_max_vio']:.3f}" if "max_vio" in s and "val_max_vio" in s else "-")
        lines.append(f"| {arm} | {s['params_active'] / 1e6:.3f}M | {s['final_bpb']:.4f}; "
                     f"{', '.join(f'{b:.4f}' for b in s['per_seed_bpb'])} | {vio} | {s.get('max_logit', 0):.2f} "
                     f"| {s['train_s']:.0f} |")
    lines += ["", "| claim | arm - ref: bpb gap per seed | bpb floor per seed | MaxVio gap per seed | MaxVio floor | "
              "other |", "|---|---|---|---|---|---|"]
    for c in summary["claims"]:
        other = ""
        if "bpb_equal_time" in c:
            other = f"bpb gap at equal wall clock {_cell(c['bpb_equal_time'])}, floor {_floor(c['bpb_equal_time'])}"
        if "token_ratio" in c:
            other = "tokens to AdamW's final bpb / AdamW's tokens: " + ", ".join(
                "not reached" if r is None else f"{r:.2f}" for r in c["token_ratio"])
        if c["arm"] == "muon-clip":
            other = "peak max logit with / without the clip: " + ", ".join(f"{a:.3f} / {b:.3f}"
                                                                          for a, b in c["peak_logit"])
        lines.append(f"| {c['arm']} vs {c['ref']} | {_cell(c['bpb'])} | {_floor(c['bpb'])} | "
                     f"{_cell(c['max_vio'], 3)} | {_floor(c['max_vio'], 3)} | {other} |")
    return "\n".join(lines)


def plot(runs: list[dict], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    colors: dict[str, str] = {}
    for r in runs:
        c = colors.setdefault(r["arm"], f"C{len(colors)}")
        label = r["arm"] if r["seed"] == min(x["seed"] for x in runs if x["arm"] == r["arm"]) else None
        pts = r["curve"][1:]
        axes[0].plot([p["tokens"] for p in pts], [p["val_bpb"] for p in pts], color=c, label=label, marker=".")
        steps = r["per_step"]
        if any(s["max_vio"] is not None for s in steps):
            axes[1].plot([s["step"] for s in steps], [s["max_vio"] for s in steps], color=c, label=label, lw=0.8)
        axes[2].plot([s["step"] for s in steps], [s["max_logit"] for s in steps], color=c, label=label, lw=0.8)
    axes[0].set(xlabel="training tokens", ylabel="held-out bits per byte", title="bpb vs tokens")
    axes[1].set(xlabel="step", ylabel="MaxVio (training batch)", title="MaxVio per step")
    axes[2].set(xlabel="step", ylabel="max attention logit (log scale)", title="max logit per step", yscale="log")
    for a in axes:
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", action="append", default=None, metavar="PATH",
                   help="text files, directories or globs (default: the Python standard library's sources, as make lm)")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--shard-dir", default="", help="token shards (default OUT/shards; reused when unchanged)")
    p.add_argument("--tokenizer", default="", help="an existing tokenizer.json (default: train one into OUT)")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--tokenizer-chars", type=int, default=5_000_000)
    p.add_argument("--val-share", type=float, default=0.02)
    p.add_argument("--arms", default=",".join(DEFAULT_ARMS), help=f"comma-separated, from {', '.join(ARMS)}")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per arm (equal tokens)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--qk-clip-tau", type=float, default=5.0, help="QK-clip threshold of the muon-clip arm")
    p.add_argument("--evals", type=int, default=6, help="held-out evaluations (plus one at step 0)")
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = p.parse_args(argv)
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = [a for a in args.arms if a not in ARMS]
    if bad or not args.arms:
        raise ConfigError(f"unknown arm(s) {bad}; arms: {', '.join(ARMS)}")
    if min(args.seeds, args.steps, args.batch, args.evals, args.eval_batches) < 1:
        raise ConfigError("--seeds, --steps, --batch, --evals and --eval-batches must be >= 1")
    if args.evals > args.steps:
        raise ConfigError(f"--evals ({args.evals}) must be <= --steps ({args.steps})")
    if args.seq_len > ModelConfig.preset("tiny").max_seq_len:
        raise ConfigError(f"--seq-len must be <= tiny's max_seq_len {ModelConfig.preset('tiny').max_seq_len}")
    args.seeds = list(range(args.seeds))
    return args


def write_results(args: argparse.Namespace, info: dict, runs: list[dict]) -> dict:
    result = {"operating_point": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "corpus": info, "threads": torch.get_num_threads(), "summary": summarize(runs), "runs": runs}
    atomic_write_text(args.out / "results.json", json.dumps(result, indent=1, default=tvd._json_default) + "\n")
    return result


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    train, val, token_bytes, info = tvd.prepare_data(args)
    print(f"corpus: {info['sources']} files, {info['train_tokens']:,} train / {info['val_tokens']:,} held-out tokens; "
          f"{len(args.arms)} arms x {len(args.seeds)} seeds x {args.steps} steps of {args.batch}x{args.seq_len} "
          f"tokens on {torch.get_num_threads()} thread(s)", flush=True)
    runs: list[dict] = []
    args.out.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        for arm in args.arms:  # one after another, never in parallel
            runs.append(run_arm(arm, seed, train, val, token_bytes, args))
            result = write_results(args, info, runs)  # after every arm: an interrupted bench keeps what it ran
    summary = result["summary"]
    md = table(summary)
    atomic_write_text(args.out / "ablations.md", md + "\n")
    png = plot(runs, args.out / "ablations.png")
    print(md)
    low = min(r["cpu_share"] for r in runs)
    if low < 0.8:
        print(f"warning: an arm got only {low:.0%} of its threads' CPU time (a loaded machine): the equal-wall-clock "
              "comparison is provisional")
    print(f"wrote {args.out / 'results.json'}, {args.out / 'ablations.md'}" + (f" and {png}" if png else ""))
    return result


if __name__ == "__main__":
    try:
        main()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
