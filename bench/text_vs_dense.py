"""Peer, side by side (issue 26 item 7): DeepSeek-style MoE vs dense vs a stock Llama on real text, equal wall clock.

Arms (all at seq_len tokens per row, on the same token shards, the same batches and the same optimizer):
  moe     nanoseek `tiny`: MLA + DeepSeekMoE (8 routed experts, top-2, 1 shared) + 1 MTP module, bias balancing
  dense   nanoseek `tiny-dense`: MLA + a dense SwiGLU as wide as tiny's activated experts, no MTP
  llama   transformers LlamaForCausalLM (GQA 4 query / 2 key-value heads, SwiGLU, RoPE), its MLP width solved so
          that its parameters equal tiny's ACTIVATED parameters (embedding and head included, MTP excluded)
  moe-aux, moe-none (the `--balance-compare` arms): `tiny` with the auxiliary loss or no balancing at all.

Same everything else: one tokenizer and one pair of shard streams (nanoseek.text.shards: held-out pieces chosen
by a stable hash), nanoseek.data.Loader with the run's seed (so every arm of a seed sees the same rows in the same
order), torch.manual_seed(seed) before building each model, nanoseek's AdamW (build_optimizer: betas 0.9/0.95, weight
decay 0.1 on matrices, clipping 1.0), linear warmup then a cosine that follows the used fraction of the time budget
(lr_at_fraction, as `pretrain --data --minutes`). nanoseek arms step through nanoseek.train.pretrain.train_step
(main CE + 0.3 MTP + 1e-4 sequence balance loss, the bias update); llama steps through `llama_step` (CE only, the
same clipping and AdamW). The training clock counts only training steps: evaluations are excluded from every arm's
budget. Held-out bits per byte (nanoseek.text.bpb.bpb_sums, the llama through an adapter with the same
hidden()/logits() methods, so the metric is the same code) over the first `--eval-batches` held-out batches at
`--evals` evenly spaced points of the budget (and at 0). MFU: nanoseek.train.metrics (model FLOPs per token over
the measured peak FP32 GEMM rate of this process); the llama's FLOPs per token by the same convention
(`llama_flops_per_token`). Arms run one after another (per seed: moe, dense, llama), never in parallel.

Reported, medians over seeds (with each arm's CPU share: CPU seconds it got per wall second per thread, which
says how loaded the machine was; on a shared machine equal wall clock is not equal compute): final held-out bpb at equal time (the budget's end), held-out bpb at equal tokens
(each arm's curve interpolated at the fewest tokens any arm of that seed reached), tokens trained, tokens/s, MFU;
for MoE arms MaxVio (Wang et al. 2024) of the main model's MoE layers: training (mean over the last quarter of
steps) and held-out (at the last evaluation). The MTP module's loads are left out of the bench's MaxVio (the
held-out forward does not run it); `pretrain`'s max_vio includes it.

    python bench/text_vs_dense.py --minutes 5 --seeds 3            # stdlib sources, ~30 min of CPU
    python bench/text_vs_dense.py --data ~/texts --minutes 3 --seeds 1
    python bench/text_vs_dense.py --balance-compare --minutes 3 --seeds 3
    python bench/text_vs_dense.py --minutes 0.3 --seeds 1               # smoke

Writes OUT/results.json (configs, parameter counts, every curve, the summary) and OUT/text_vs_dense.png. Run it
under `flock /tmp/nanoseek-heavy.lock` on a shared machine, and say how loaded the machine was.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nanoseek.config import ConfigError, ModelConfig  # noqa: E402
from nanoseek.data import Loader, TokenRows, eval_batches  # noqa: E402
from nanoseek.io import atomic_write_text  # noqa: E402
from nanoseek.model import Transformer  # noqa: E402
from nanoseek.model.moe import MoE  # noqa: E402
from nanoseek.text.bpb import bits_per_byte, bpb_sums, token_byte_lengths  # noqa: E402
from nanoseek.train.common import TrainConfig, build_optimizer, clip_grads, fill_missing_grads, lr_at_fraction, set_lr  # noqa: E402
from nanoseek.train.metrics import mfu, model_flops_per_token, peak_matmul_flops  # noqa: E402
from nanoseek.train.common import Dist  # noqa: E402
from nanoseek.model.moe import max_vio  # noqa: E402
from nanoseek.train.pretrain import train_step  # noqa: E402

OUT = Path("runs/bench_text_vs_dense")
PEER_ARMS = ("moe", "dense", "llama")
BALANCE_ARMS = ("moe", "moe-aux", "moe-none")
ARM_PRESET = {"moe": "tiny", "moe-aux": "tiny", "moe-none": "tiny", "dense": "tiny-dense"}
ARM_BALANCE = {"moe-aux": "aux", "moe-none": "none"}
STEP_CAP = 10_000_000  # the time budget ends a run; the cap only sizes TrainConfig


# ---- the llama peer ---------------------------------------------------------------------------------------------
def llama_params(vocab: int, dim: int, n_layers: int, heads: int, kv_heads: int, head_dim: int, inter: int) -> int:
    """Parameters of an untied LlamaForCausalLM without biases (closed form; checked against the model in tests)."""
    attn = dim * heads * head_dim * 2 + dim * kv_heads * head_dim * 2
    return 2 * vocab * dim + n_layers * (attn + 3 * dim * inter + 2 * dim) + dim


def llama_config(target_cfg: ModelConfig, kv_heads: int = 2):
    """A LlamaConfig with tiny's width, depth, head count and context, GQA with `kv_heads` key-value heads, and the
    MLP width that brings its parameter count closest to target_cfg's activated parameters."""
    from transformers import LlamaConfig

    c = target_cfg
    head_dim = c.dim // c.n_heads
    target = c.param_counts()["active"]
    base = llama_params(c.vocab_size, c.dim, c.n_layers, c.n_heads, kv_heads, head_dim, 0)
    inter = max(1, round((target - base) / (c.n_layers * 3 * c.dim)))
    return LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=inter,
                       num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=kv_heads,
                       head_dim=head_dim, max_position_embeddings=c.max_seq_len, initializer_range=c.init_std,
                       rms_norm_eps=c.norm_eps, tie_word_embeddings=False,
                       rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
                       bos_token_id=None, eos_token_id=None, pad_token_id=None, use_cache=False)


class LlamaLM(torch.nn.Module):
    """A LlamaForCausalLM with nanoseek's scoring interface, logits(hidden(ids)): hidden() returns the decoder's
    output (transformers applies the final norm there; nanoseek's logits() applies it) and logits() the head, so
    nanoseek.text.bpb.bpb_sums scores both model families with the same code."""

    def __init__(self, config):
        super().__init__()
        from transformers import LlamaForCausalLM

        self.hf = LlamaForCausalLM(config)

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        return self.hf.model(input_ids=ids).last_hidden_state

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.hf.lm_head(h).float()


def llama_flops_per_token(cfg, seq_len: int) -> float:
    """nanoseek.train.metrics' convention for the llama: 6 x (matmul weights a token passes: attention
    projections, MLP, head; not the embedding lookup) + 6 x L x H x (d_qk + d_v) x (seq_len + 1) / 2."""
    d, hd = cfg.hidden_size, cfg.head_dim
    attn = d * cfg.num_attention_heads * hd * 2 + d * cfg.num_key_value_heads * hd * 2
    matmul = cfg.num_hidden_layers * (attn + 3 * d * cfg.intermediate_size) + cfg.vocab_size * d
    return 6 * matmul + 6 * cfg.num_hidden_layers * cfg.num_attention_heads * 2 * hd * (seq_len + 1) / 2


def llama_step(model: LlamaLM, optimizer: torch.optim.Optimizer, loader: Loader, cfg: TrainConfig) -> dict:
    """One AdamW step on next-token CE, clipped like nanoseek's (global norm cfg.grad_clip)."""
    model.train()
    x, y = loader.next_batch()
    loss = F.cross_entropy(model.logits(model.hidden(x)).flatten(0, 1), y.flatten())
    loss.backward()
    fill_missing_grads(model)
    grad_norm = clip_grads(model, cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss.item(), "main": loss.item(), "grad_norm": grad_norm}


# ---- one arm ------------------------------------------------------------------------------------------------------
@dataclass
class Arm:
    name: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    step: Callable[[], dict]
    flops_per_token: float
    counts: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)


def main_moe_layers(model: torch.nn.Module) -> list[MoE]:
    layers = getattr(model, "layers", [])
    return [b.ffn for b in layers if isinstance(b.ffn, MoE)]


def build_arm(name: str, vocab: int, tcfg: TrainConfig, loader: Loader, seed: int) -> Arm:
    """The arm's model (seeded), its optimizer and its step function."""
    torch.manual_seed(seed)
    if name == "llama":
        hf_cfg = llama_config(ModelConfig.preset("tiny", vocab_size=vocab))
        model = LlamaLM(hf_cfg)
        n = sum(p.numel() for p in model.parameters())
        opt = build_optimizer(model, tcfg)
        return Arm(name, model, opt, lambda: llama_step(model, opt, loader, tcfg),
                   llama_flops_per_token(hf_cfg, tcfg.seq_len), {"total": n, "active": n, "mtp": 0},
                   {"intermediate_size": hf_cfg.intermediate_size, "num_key_value_heads": hf_cfg.num_key_value_heads,
                    "head_dim": hf_cfg.head_dim, "hidden_size": hf_cfg.hidden_size,
                    "num_hidden_layers": hf_cfg.num_hidden_layers})
    cfg = ModelConfig.preset(ARM_PRESET[name], vocab_size=vocab)
    model = Transformer(cfg)
    opt = build_optimizer(model, tcfg)
    arm_cfg = TrainConfig(**{**tcfg.to_dict(), "balance": ARM_BALANCE.get(name, "bias")})
    dist = Dist()
    c = cfg.param_counts()
    return Arm(name, model, opt, lambda: train_step(model, opt, loader, arm_cfg, dist),
               model_flops_per_token(cfg, tcfg.seq_len, mtp=cfg.n_mtp > 0),
               {"total": c["total"], "active": c["active"], "mtp": c["mtp"]}, cfg.to_dict())


@torch.no_grad()
def held_out(model: torch.nn.Module, val: TokenRows, token_bytes: torch.Tensor, batch: int, n_batches: int) -> dict:
    """Held-out bits per byte over the first n_batches batches, and (MoE) the mean per-batch MaxVio."""
    was_training = model.training
    model.eval()
    total = torch.zeros(3, dtype=torch.float64)
    vios = []
    moe = main_moe_layers(model)
    for x, y in eval_batches(val, batch, n_batches):
        total += bpb_sums(model, x, y, token_bytes)
        if moe:
            v = max_vio(torch.stack([m.last_load for m in moe]))
            if v is not None:
                vios.append(v)
    model.train(was_training)
    out = {"val_bpb": bits_per_byte(total[0].item(), total[1].item())}
    if vios:
        out["val_max_vio"] = sum(vios) / len(vios)
    return out


def run_arm(name: str, seed: int, train: TokenRows, val: TokenRows, token_bytes: torch.Tensor,
            args: argparse.Namespace) -> dict:
    tcfg = TrainConfig(lr=args.lr, steps=STEP_CAP, minutes=args.minutes, batch_size=args.batch,
                       seq_len=args.seq_len, seed=seed, warmup_steps=args.warmup).validate()
    loader = Loader(train, args.batch, seed)
    arm = build_arm(name, int(token_bytes.numel()), tcfg, loader, seed)
    budget = args.minutes * 60
    marks = [budget * (i + 1) / args.evals for i in range(args.evals)]
    curve = [{"step": 0, "train_s": 0.0, "tokens": 0,
              **held_out(arm.model, val, token_bytes, args.batch, args.eval_batches)}]
    train_s, cpu_s, step, vios, losses = 0.0, 0.0, 0, [], []
    tokens_per_step = args.batch * args.seq_len
    while train_s < budget:
        set_lr(arm.optimizer, lr_at_fraction(step, train_s / budget, tcfg))
        t0, c0 = time.perf_counter(), time.process_time()
        out = arm.step()
        train_s += time.perf_counter() - t0
        cpu_s += time.process_time() - c0
        step += 1
        losses.append(out["loss"])
        if "loads" in out:
            n_main = len(main_moe_layers(arm.model))
            vios.append(max_vio(out["loads"][:n_main]))
        if train_s >= marks[0] or train_s >= budget:
            while marks and train_s >= marks[0]:
                marks.pop(0)
            curve.append({"step": step, "train_s": round(train_s, 3), "tokens": step * tokens_per_step,
                          "loss": out["loss"], **held_out(arm.model, val, token_bytes, args.batch, args.eval_batches)})
            print(f"  {name} seed {seed}: step {step}, {train_s:.0f}/{budget:.0f} s, train loss {out['loss']:.3f}, "
                  f"held-out bpb {curve[-1]['val_bpb']:.3f}", flush=True)
    tok_rate = step * tokens_per_step / train_s
    last = [v for v in vios[-max(1, len(vios) // 4):] if v is not None]
    # cpu_share: CPU seconds this process got per wall second per thread (1.0 = the machine was all ours)
    return {"arm": name, "seed": seed, "steps": step, "tokens": step * tokens_per_step, "train_s": train_s,
            "cpu_share": cpu_s / (train_s * torch.get_num_threads()),
            "tokens_per_s": tok_rate, "mfu": mfu(tok_rate, arm.flops_per_token),
            "flops_per_token": arm.flops_per_token, "params": arm.counts, "config": arm.config,
            "final_bpb": curve[-1]["val_bpb"], "final_loss": losses[-1], "curve": curve,
            **({"max_vio": sum(last) / len(last)} if last else {}),
            **({"val_max_vio": curve[-1]["val_max_vio"]} if "val_max_vio" in curve[-1] else {})}


# ---- summary ------------------------------------------------------------------------------------------------------
def interpolate(curve: list[dict], tokens: float) -> float:
    """Held-out bpb at `tokens` by linear interpolation between evaluation points (curve starts at 0 tokens)."""
    pts = [(p["tokens"], p["val_bpb"]) for p in curve]
    for (t0, b0), (t1, b1) in zip(pts, pts[1:]):
        if t0 <= tokens <= t1:
            return b0 if t1 == t0 else b0 + (b1 - b0) * (tokens - t0) / (t1 - t0)
    return pts[-1][1]


def summarize(runs: list[dict], arms: list[str]) -> dict:
    by_seed: dict[int, dict[str, dict]] = {}
    for r in runs:
        by_seed.setdefault(r["seed"], {})[r["arm"]] = r
    for seed_runs in by_seed.values():
        common = min(r["tokens"] for r in seed_runs.values())
        for r in seed_runs.values():
            r["equal_tokens"] = common
            r["bpb_at_equal_tokens"] = interpolate(r["curve"], common)
    out = {}
    for arm in arms:
        rs = [r for r in runs if r["arm"] == arm]
        if not rs:
            continue
        med = {k: statistics.median(r[k] for r in rs) for k in
               ("final_bpb", "bpb_at_equal_tokens", "tokens", "tokens_per_s", "mfu", "train_s", "cpu_share")}
        for k in ("max_vio", "val_max_vio"):
            vals = [r[k] for r in rs if k in r]
            if vals:
                med[k] = statistics.median(vals)
        med.update({"seeds": len(rs), "params_active": rs[0]["params"]["active"],
                    "params_total": rs[0]["params"]["total"], "flops_per_token": rs[0]["flops_per_token"]})
        out[arm] = med
    return out


def table(summary: dict) -> str:
    head = ("| arm | active / total params | FLOPs/token | tokens | tokens/s | MFU | CPU share | bpb @ equal time "
            "| bpb @ equal tokens | MaxVio train / held-out |")
    lines = [head, "|" + "---|" * 10]
    for arm, s in summary.items():
        vio = (f"{s['max_vio']:.3f} / {s.get('val_max_vio', float('nan')):.3f}" if "max_vio" in s else "-")
        lines.append(f"| {arm} | {s['params_active'] / 1e6:.3f}M / {s['params_total'] / 1e6:.3f}M "
                     f"| {s['flops_per_token'] / 1e6:.2f}M | {s['tokens']:,.0f} | {s['tokens_per_s']:,.0f} "
                     f"| {s['mfu']:.1%} | {s['cpu_share']:.0%} | {s['final_bpb']:.4f} | {s['bpb_at_equal_tokens']:.4f} | {vio} |")
    return "\n".join(lines)


def plot(runs: list[dict], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    colors: dict[str, str] = {}
    for r in runs:
        c = colors.setdefault(r["arm"], f"C{len(colors)}")
        label = r["arm"] if r["seed"] == min(x["seed"] for x in runs if x["arm"] == r["arm"]) else None
        pts = r["curve"][1:] or r["curve"]
        a.plot([p["train_s"] for p in pts], [p["val_bpb"] for p in pts], color=c, label=label, marker=".")
        b.plot([p["tokens"] for p in pts], [p["val_bpb"] for p in pts], color=c, label=label, marker=".")
    a.set(xlabel="training seconds (evaluation excluded)", ylabel="held-out bits per byte")
    b.set(xlabel="training tokens", ylabel="held-out bits per byte")
    a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- data ---------------------------------------------------------------------------------------------------------
def prepare_data(args: argparse.Namespace):
    """(train TokenRows, held-out TokenRows, token byte lengths, manifest summary): the tokenizer (given, or trained
    once into OUT/tokenizer.json) and the shards (built once into --shard-dir, reused after)."""
    from nanoseek.recipes.lm import stdlib_sources
    from nanoseek.text.prepare import bytes_per_token, train_text_tokenizer
    from nanoseek.text.shards import SplitSettings, build_shards
    from nanoseek.tokenizer import Tokenizer

    paths, exclude = (list(args.data), list(args.exclude)) if args.data else stdlib_sources()
    settings = SplitSettings(val_share=args.val_share).check()
    tok_file = Path(args.tokenizer) if args.tokenizer else args.out / "tokenizer.json"
    if not tok_file.exists():
        if args.tokenizer:
            raise ConfigError(f"tokenizer not found: {tok_file}")
        print(f"training a {args.vocab_size}-token BPE tokenizer on the corpus ...", flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        train_text_tokenizer(paths, args.vocab_size, settings, args.tokenizer_chars, exclude).save(tok_file)
    tok = Tokenizer.load(tok_file)
    shard_dir = Path(args.shard_dir) if args.shard_dir else args.out / "shards"
    shards = build_shards(paths, tok_file, shard_dir, tok.vocab_size, settings, exclude=exclude)
    train, val = TokenRows(shards.stream("train"), args.seq_len), TokenRows(shards.stream("val"), args.seq_len)
    if val.size(0) < 1 or train.size(0) < args.batch:
        raise ConfigError(f"too little text: {train.size(0)} train / {val.size(0)} held-out rows of {args.seq_len} "
                          "tokens; add text or lower --seq-len")
    m = shards.manifest
    info = {"sources": len(m["sources"]), "bytes": m["bytes"], "vocab_size": tok.vocab_size,
            "train_tokens": m["split"]["train"]["tokens"], "val_tokens": m["split"]["val"]["tokens"],
            "bytes_per_token": bytes_per_token(shards), "shard_dir": str(shard_dir), "tokenizer": str(tok_file)}
    return train, val, token_byte_lengths(tok), info


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", action="append", default=None, metavar="PATH",
                   help="text files, directories or globs (default: the Python standard library's sources)")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--shard-dir", default="", help="token shards (default OUT/shards; reused when unchanged)")
    p.add_argument("--tokenizer", default="", help="an existing tokenizer.json (default: train one into OUT)")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--tokenizer-chars", type=int, default=5_000_000, help="characters the tokenizer trains on")
    p.add_argument("--val-share", type=float, default=0.02)
    p.add_argument("--minutes", type=float, default=5.0, help="training wall clock per arm (evaluations excluded)")
    p.add_argument("--seeds", type=int, default=3, help="how many seeds (0 .. N-1); medians are over them")
    p.add_argument("--arms", default=",".join(PEER_ARMS),
                   help=f"comma-separated, from {', '.join(dict.fromkeys(PEER_ARMS + BALANCE_ARMS))}")
    p.add_argument("--balance-compare", action="store_true",
                   help=f"the arms {', '.join(BALANCE_ARMS)} (bias vs aux vs no balancing) instead of --arms")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--evals", type=int, default=8, help="held-out evaluations over the budget (plus one at 0)")
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = p.parse_args(argv)
    if args.seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {args.seeds}")
    args.seeds = list(range(args.seeds))
    args.arms = list(BALANCE_ARMS) if args.balance_compare else [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = [a for a in args.arms if a not in PEER_ARMS + BALANCE_ARMS]
    if bad or not args.arms or not args.seeds:
        raise ConfigError(f"unknown arm(s) {bad} or no arms/seeds; arms: {', '.join(PEER_ARMS + BALANCE_ARMS)}")
    if args.minutes <= 0 or args.evals < 1 or args.eval_batches < 1 or args.batch < 1:
        raise ConfigError("--minutes, --evals, --eval-batches and --batch must be positive")
    if args.seq_len > ModelConfig.preset("tiny").max_seq_len:
        raise ConfigError(f"--seq-len must be <= tiny's max_seq_len {ModelConfig.preset('tiny').max_seq_len}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    train, val, token_bytes, info = prepare_data(args)
    print(f"corpus: {info['sources']} files, {info['bytes'] / 1e6:.1f} MB, {info['train_tokens']:,} train / "
          f"{info['val_tokens']:,} held-out tokens, {info['bytes_per_token']:.2f} bytes/token; "
          f"peak FP32 matmul {peak_matmul_flops() / 1e9:.1f} GFLOP/s on {torch.get_num_threads()} thread(s)",
          flush=True)
    runs = []
    for seed in args.seeds:
        for arm in args.arms:  # one after another, never in parallel
            runs.append(run_arm(arm, seed, train, val, token_bytes, args))
    summary = summarize(runs, args.arms)
    result = {"operating_point": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "corpus": info, "threads": torch.get_num_threads(), "peak_matmul_flops": peak_matmul_flops(),
              "summary": summary, "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "results.json", json.dumps(result, indent=1, default=_json_default) + "\n")
    png = plot(runs, args.out / "text_vs_dense.png")
    print(table(summary))
    low = min(s["cpu_share"] for s in summary.values())
    if low < 0.8:
        print(f"warning: an arm got only {low:.0%} of its threads' CPU time (a loaded machine): equal wall clock was "
              "not equal compute, and tokens/s and MFU are lower bounds")
    print(f"wrote {args.out / 'results.json'}" + (f" and {png}" if png else ""))
    return result


def _json_default(o):
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return str(o)


if __name__ == "__main__":
    try:
        main()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
