"""`nanoseek lm` (= `make lm`): a DeepSeek-V3-architecture language model of real text on this machine.

The pipeline, top to bottom (each stage resumable: Ctrl-C, then rerun the same command):
  1. data      find the corpus (default: the Python standard library's own source files, located at run time
               through `sysconfig`, so every machine has it and nothing is downloaded), train a byte-level BPE
               tokenizer on its training part, tokenize it into memory-mapped shards (nanoseek.text.shards);
  2. pretrain  the `tiny` preset (MoE + MLA + MTP) for `minutes` of wall clock, the lr cosine following the
               time budget, held-out bits per byte every `eval_interval` steps (nanoseek.train.pretrain);
  3. eval      held-out bits per byte over up to `eval_tokens` tokens of the held-out stream, against the
               held-out text's byte-unigram entropy (what a model with no context would reach);
  4. samples   continuations of a few prompts;
then runs/lm/report.md (bpb against time and tokens, bytes per token, samples) and runs/lm/summary.json.
Any corpus works the same way with `--data PATH`. The held-out text is chosen by a stable hash of ~8 KB pieces
(nanoseek.text.shards), so it never overlaps the training text.
"""
from __future__ import annotations

import json
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from nanoseek.cli_config import knob
from nanoseek.config import ConfigError
from nanoseek.io import atomic_write_text
from nanoseek.recipes.stages import StageRunner, StopAfter, console

STAGES = ("data", "pretrain", "eval", "samples")
SAMPLE_PROMPTS = ("import ", "def ", "class Parser:\n", "    # ")


def stdlib_sources() -> tuple[list[str], list[str]]:
    """(--data, --exclude) naming the standard library's .py files, installed packages left out."""
    root = sysconfig.get_paths()["stdlib"]
    return [f"{root}/**/*.py"], ["*/site-packages/*", "*/dist-packages/*"]


@dataclass
class LMConfig:
    out: str = knob("runs/lm", help="recipe directory")
    data: list[str] = knob(default_factory=list, metavar="PATH", help="corpus (file, directory or glob; repeatable); "
                           "empty = the Python standard library's sources")
    exclude: list[str] = knob(default_factory=list, metavar="GLOB", help="fnmatch patterns of paths left out")
    text_field: str = knob("text", help="JSONL / parquet field holding the text")
    preset: str = knob("tiny", help="model size preset")
    # the whole recipe adds ~1-2 min of data and evaluation
    minutes: float = knob(12.0, help="pretraining wall clock")
    vocab_size: int = knob(4096, help="tokenizer vocabulary")
    batch_size: int = knob(16, help="sequences per step")
    seq_len: int = knob(0, help="tokens per row; 0 = the preset's max_seq_len")
    lr: float = knob(4e-3, help="peak learning rate")
    seed: int = knob(0, help="seed of data order, init and sampling")
    eval_interval: int = knob(100, help="steps between held-out bits-per-byte evaluations")
    eval_tokens: int = knob(200_000, help="held-out tokens of the final evaluation")
    sample_tokens: int = knob(96, help="tokens per sample in the report")
    sample_temperature: float = knob(0.8, help="temperature of the report's samples")

    def validate(self) -> LMConfig:
        if self.minutes <= 0:
            raise ConfigError(f"minutes must be > 0, got {self.minutes}")
        for name in ("vocab_size", "batch_size", "eval_interval", "eval_tokens", "sample_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        return self

    def sources(self) -> tuple[list[str], list[str]]:
        return (list(self.data), list(self.exclude)) if self.data else stdlib_sources()


# ---- stages -----------------------------------------------------------------------------------------------
def _data(base: Path, cfg: LMConfig) -> dict:
    from nanoseek.text.prepare import bytes_per_token, prepare_run_tokenizer
    from nanoseek.text.shards import SplitSettings, build_shards
    from nanoseek.tokenizer import Tokenizer

    paths, exclude = cfg.sources()
    settings = SplitSettings(text_field=cfg.text_field)
    t0 = time.perf_counter()
    tok_file = prepare_run_tokenizer(base, paths, cfg.vocab_size, settings, None, exclude=exclude)
    tokenizer_s = time.perf_counter() - t0
    tok = Tokenizer.load(tok_file)
    shards = build_shards(paths, tok_file, base / "shards", tok.vocab_size, settings, exclude=exclude)
    m = shards.manifest
    return {"files": len(m["sources"]), "documents": m["documents"], "mb": round(m["bytes"] / 1e6, 2),
            "skipped": m["skipped"], "vocab_size": tok.vocab_size, "tokenizer_seconds": round(tokenizer_s, 1),
            "train_tokens": m["split"]["train"]["tokens"], "val_tokens": m["split"]["val"]["tokens"],
            "bytes_per_token": round(bytes_per_token(shards), 3), "build": shards.last_build}


def _pretrain(base: Path, cfg: LMConfig) -> dict:
    from nanoseek.config import ModelConfig
    from nanoseek.train.checkpoint import latest_checkpoint
    from nanoseek.train.common import TrainConfig
    from nanoseek.train.pretrain import DataConfig, PretrainConfig, pretrain

    model = ModelConfig.preset(cfg.preset)
    paths, exclude = cfg.sources()
    train = TrainConfig(lr=cfg.lr, steps=10_000_000, minutes=cfg.minutes, batch_size=cfg.batch_size,
                        seq_len=cfg.seq_len or model.max_seq_len, seed=cfg.seed, eval_interval=cfg.eval_interval,
                        ckpt_interval=cfg.eval_interval * 2, log_interval=10)
    data = DataConfig(data=paths, exclude=exclude, text_field=cfg.text_field, vocab_size=cfg.vocab_size)
    pcfg = PretrainConfig(model=model, train=train, data=data, time_schedule=True)
    resume = latest_checkpoint(base / "checkpoints") is not None
    s = pretrain(base, pcfg, resume=resume, device="cpu")
    return {k: s.get(k) for k in ("step", "loss", "eval_loss", "val_bpb", "tokens_per_s")}


def _eval(base: Path, cfg: LMConfig) -> dict:
    from nanoseek.text.evaluate import evaluate_stream
    from nanoseek.text.shards import Shards
    from nanoseek.text.sources import read_json_safely
    from nanoseek.tokenizer import Tokenizer
    from nanoseek.train.checkpoint import load_run_model

    model, _, step_dir = load_run_model(base)
    tok = Tokenizer.load(base / "tokenizer.json")
    shards = Shards(base / "shards", read_json_safely(base / "shards" / "manifest.json"))
    res = evaluate_stream(model, tok, shards.stream("val"), cfg.eval_tokens)
    res["checkpoint"] = str(step_dir)
    return res


def _samples(base: Path, cfg: LMConfig) -> dict:
    import torch

    from nanoseek.commands.sample import generate
    from nanoseek.tokenizer import Tokenizer
    from nanoseek.train.checkpoint import load_run_model

    model, _, _ = load_run_model(base)
    tok = Tokenizer.load(base / "tokenizer.json")
    gen = torch.Generator().manual_seed(cfg.seed)
    out = {}
    for prompt in SAMPLE_PROMPTS:
        ids = generate(model, [tok.eos_id, *tok.encode(prompt)], cfg.sample_tokens, cfg.sample_temperature,
                       tok.eos_id, gen)
        out[prompt] = prompt + tok.decode(ids, skip_special=True)
    return out


# ---- report -----------------------------------------------------------------------------------------------
def _plot(base: Path, plots: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for line in (base / "metrics.jsonl").read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if r.get("val_bpb") is not None:
            rows.append(r)
    if not rows:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, label in ((axes[0], "elapsed_s", "training time (min)"), (axes[1], "tokens", "tokens (M)")):
        scale = 60 if key == "elapsed_s" else 1e6
        ax.plot([r[key] / scale for r in rows], [r["val_bpb"] for r in rows], marker="o", ms=3)
        ax.set_xlabel(label)
        ax.set_ylabel("held-out bits per byte")
        ax.grid(alpha=0.3)
    fig.suptitle("nanoseek lm: held-out bits per byte")
    fig.tight_layout()
    plots.mkdir(parents=True, exist_ok=True)
    path = plots / "bpb.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(root: Path, cfg: LMConfig, summary: dict, samples: dict) -> Path:
    plot = _plot(root / "base", root / "plots")
    d, ev = summary["data"], summary["eval"]
    lines = ["# nanoseek lm: a language model of real text", "",
             f"Corpus: {'the Python standard library sources' if not cfg.data else ', '.join(cfg.data)}: "
             f"{d['files']:,} files, {d['documents']:,} documents, {d['mb']} MB (skipped: "
             f"{', '.join(f'{n} {k}' for k, n in d['skipped'].items()) or 'none'}).",
             f"Tokenizer: byte-level BPE, {d['vocab_size']} tokens, {d['bytes_per_token']} bytes/token on held-out "
             f"text; {d['train_tokens']:,} training / {d['val_tokens']:,} held-out tokens.", "",
             "| | value |", "|---|---|",
             f"| model | `{cfg.preset}` (MoE + MLA + MTP), seq {cfg.seq_len or 'max'}, batch {cfg.batch_size} |",
             f"| training | {summary['pretrain']['step']} steps, {summary['train_tokens']:,} tokens in "
             f"{cfg.minutes:g} min, {summary['pretrain']['tokens_per_s'] or 0:,.0f} tokens/s |",
             f"| held-out bits per byte | **{ev['bits_per_byte']:.4f}** ({ev['bytes']:,} bytes) |",
             f"| held-out byte-unigram entropy | {ev['byte_unigram_entropy']:.4f} bits |",
             f"| ratio (no context learned = 1.0) | {ev['bpb_over_entropy']:.3f} |",
             f"| total time | {summary['seconds_total'] / 60:.1f} min |", ""]
    if plot is not None:
        lines += [f"![held-out bits per byte](plots/{plot.name})", ""]
    lines += ["## Samples (T = %g)" % cfg.sample_temperature, ""]
    for text in samples.values():
        lines += ["```", text, "```", ""]
    path = root / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def run_lm(cfg: LMConfig, until: str | None = None) -> dict | None:
    cfg.validate()
    root = Path(cfg.out)
    base = root / "base"
    settings = {k: v for k, v in asdict(cfg).items() if k != "out"}
    stages = StageRunner(root, settings, free=("minutes",), until=until, names=STAGES)
    try:
        data = stages.run("data", lambda: _data(base, cfg))
        pre = stages.run("pretrain", lambda: _pretrain(base, cfg))
        ev = stages.run("eval", lambda: _eval(base, cfg))
        samples = stages.run("samples", lambda: _samples(base, cfg))
    except StopAfter as stop:
        console.print(f"stopped after stage {stop}; rerun without --until to continue")
        return None
    seconds = stages.seconds_by_stage()
    metrics = [json.loads(x) for x in (base / "metrics.jsonl").read_text().splitlines() if x.strip()]
    summary = {"corpus": cfg.data or "python-stdlib", "preset": cfg.preset, "seed": cfg.seed, "data": data,
               "pretrain": pre, "eval": ev, "val_bpb": ev["bits_per_byte"],
               "byte_unigram_entropy": ev["byte_unigram_entropy"], "bpb_over_entropy": ev["bpb_over_entropy"],
               "bytes_per_token": data["bytes_per_token"], "train_tokens": metrics[-1]["tokens"] if metrics else 0,
               "seconds_total": round(sum(seconds.values()), 1),
               "seconds_by_stage": {k: round(v, 1) for k, v in seconds.items()}}
    atomic_write_text(root / "summary.json", json.dumps(summary, indent=2) + "\n")
    report = write_report(root, cfg, summary, samples)
    console.print(f"held-out {ev['bits_per_byte']:.4f} bits per byte (byte-unigram entropy "
                  f"{ev['byte_unigram_entropy']:.3f}, ratio {ev['bpb_over_entropy']:.3f}); "
                  f"{summary['seconds_total'] / 60:.1f} min; report: {report}")
    return summary
