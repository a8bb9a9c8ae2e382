"""The run plumbing the fine-tuning trainers (sft.py, distill.py, dpo.py) share, so each trainer file holds
only its batch, its loss and its logging.

- `HasTrainConfig`: to_dict / from_dict of a trainer config that nests a TrainConfig as `train`.
- `open_run`: a run directory's checkpoint folder and latest checkpoint; refuses to resume a run without a
  checkpoint or to start over one that has checkpoints; on resume returns the stored config section.
- `write_run_files`: a fresh run's config.json and tokenizer files (atomic writes).
- `RunClock`: elapsed wall-clock time (a resumed run's checkpointed time included), the optional time budget
  and the learning rate of a step (warmup + cosine over steps, or over the fraction of the budget used).
- `read_jsonl_rows`: a bounded JSONL reader with one ConfigError per bad line.
- `finish_run`: the report of a run that logged at least one step.
- `load_mask`: count only the real (non-padding) tokens in the MoE expert loads of the forwards inside it.

Ctrl-C needs no code here: every trainer checkpoints periodically, and the next run resumes from the last
checkpoint (its elapsed time included).
"""
from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Self
from pathlib import Path

import torch

from nanoseek.config import ConfigError
from nanoseek.io import atomic_write_text
from nanoseek.train.checkpoint import latest_checkpoint
from nanoseek.train.common import TrainConfig, lr_at, lr_at_fraction


class HasTrainConfig:
    """Mixin for a config dataclass with a `train: TrainConfig` field: a plain dict with `train` as its own dict,
    and back (the TrainConfig part checked by TrainConfig.from_dict)."""

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["train"] = self.train.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Self:
        d = dict(d)
        train = TrainConfig.from_dict(d.pop("train"))
        return cls(**d, train=train)


def open_run(out: str | Path, resume: bool, section: str) -> tuple[Path, Path, Path | None, dict | None]:
    """(out, checkpoint folder, latest checkpoint or None, config.json[section] when resuming else None)."""
    out = Path(out)
    ckpt_dir = out / "checkpoints"
    ckpt = latest_checkpoint(ckpt_dir)
    saved = None
    if resume:
        if ckpt is None:
            raise ConfigError(f"nothing to resume: {ckpt_dir} holds no checkpoint")
        saved = json.loads((out / "config.json").read_text())[section]
    elif ckpt is not None:
        raise ConfigError(f"{out} already has checkpoints; pass --resume or choose another --out")
    return out, ckpt_dir, ckpt, saved


def write_run_files(out: Path, run_cfg: dict, tokenizer_source: Path) -> None:
    """Create `out` and write its config.json and a copy of the tokenizer files of `tokenizer_source` (a run
    directory or its tokenizer.json: an imported run's tokenizer_config.json, chat template and
    generation_config.json travel too, nanoseek.hf_tokenizer.copy_tokenizer_files)."""
    from nanoseek.hf_tokenizer import copy_tokenizer_files

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.json", json.dumps(run_cfg, indent=2) + "\n")
    copy_tokenizer_files(tokenizer_source, out)


class RunClock:
    """Wall-clock time of a run: `elapsed0` seconds from earlier runs plus the time since construction."""

    def __init__(self, elapsed0: float = 0.0, budget_s: float = 0.0):
        self.elapsed0, self.budget_s = elapsed0, budget_s
        self.start = time.perf_counter()

    def since_start(self) -> float:
        return time.perf_counter() - self.start

    def elapsed(self) -> float:
        return self.elapsed0 + self.since_start()

    def spent(self) -> bool:
        """True when a budget is set and used up."""
        return self.budget_s > 0 and self.elapsed() >= self.budget_s

    def lr(self, step: int, tcfg: TrainConfig) -> float:
        """Warmup + cosine over the budget's used fraction when a budget is set, else over the steps."""
        if self.budget_s > 0:
            return lr_at_fraction(step, self.elapsed() / self.budget_s, tcfg)
        return lr_at(step, tcfg)


def read_jsonl_rows(path: str | Path, max_rows: int, label: str, noun: str, valid: Callable[[object], bool],
                    expected: str) -> list[dict]:
    """The JSONL rows of `path` (blank lines skipped): at most `max_rows`, each passing `valid`; a missing file,
    a bad line (by number), too many or no rows are each one ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{label} data file not found: {path}")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            if len(rows) >= max_rows:
                raise ConfigError(f"{path} holds more than {max_rows:,} {noun}")
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path} line {n} is not valid JSON: {e.msg}") from None
            if not valid(row):
                raise ConfigError(f"{path} line {n}: expected {expected}")
            rows.append(row)
    if not rows:
        raise ConfigError(f"{path} holds no {noun}")
    return rows


def finish_run(out: Path, record: dict, is_main: bool = True) -> None:
    """Write the run's report when this process is the main one and at least one step was logged."""
    if is_main and record:
        from nanoseek.report import write_report

        write_report(out)


@contextmanager
def load_mask(model, mask: torch.Tensor) -> Iterator[None]:
    """Inside: the expert loads count only mask == True tokens (B, T); after (even on error): all tokens again.
    A dense model has no loads, and this does nothing."""
    model.set_load_mask(mask)
    try:
        yield
    finally:
        model.set_load_mask(None)
