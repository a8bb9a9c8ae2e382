"""Training telemetry: metrics.jsonl (one JSON object per logged step) and a live progress line.

metrics.jsonl is append-only during a run; each line is written with one write() call and flushed, so a
kill leaves at most one partial last line. On resume, `truncate_after(step)` atomically rewrites the file
keeping only lines up to the checkpointed step (dropping the partial line and the steps that will be
recomputed), so the file of a killed-and-resumed run reads exactly like an uninterrupted one.

The progress line uses rich: a bar with step/total, loss, lr, tokens/s and ETA on a terminal; when stdout is
not a terminal (CI, pipes) it prints a plain line every `print_every` steps instead of redrawing.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from nanoseek.io import atomic_write_text


def read_metrics(path: str | Path) -> list[dict]:
    """All complete JSON lines of a metrics file (a partial last line from a kill is skipped)."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


class MetricsLogger:
    """Appends JSON lines to `path`; a no-op on ranks other than 0 (`enabled=False`)."""

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({k: _clean(v) for k, v in record.items()}) + "\n"
        with open(self.path, "a") as f:
            f.write(line)
            f.flush()

    def truncate_after(self, step: int) -> None:
        """Keep only complete records with record['step'] <= step."""
        if not self.enabled or not self.path.exists():
            return
        keep = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in keep))


def _clean(v):
    """Full float precision (resume tests compare losses to 1e-6), with NaN/inf written as null (valid JSON)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, list):
        return [_clean(x) for x in v]
    return v


class ProgressLine:
    """step/total, loss, lr, tok/s, ETA: a live bar on a terminal, plain periodic lines otherwise."""

    def __init__(self, total: int, start: int = 0, enabled: bool = True, print_every: int = 10,
                 description: str = "pretrain"):
        self.enabled = enabled
        self.total, self.start = total, start
        self.print_every = max(1, print_every)
        self.console = Console(stderr=False)
        self.live = enabled and sys.stdout.isatty()
        self.t0 = time.perf_counter()
        self.progress = None
        if self.live:
            self.progress = Progress(TextColumn(f"[bold]{description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                                     console=self.console, transient=False)
            self.task = self.progress.add_task(description, total=total, completed=start, info="")
            self.progress.start()

    def update(self, step: int, loss: float, lr: float, tokens_per_s: float, extra: str = "") -> None:
        if not self.enabled:
            return
        info = f"loss {loss:.4f}  lr {lr:.2e}  {tokens_per_s:,.0f} tok/s{('  ' + extra) if extra else ''}"
        if self.live:
            self.progress.update(self.task, completed=step, info=info)
            return
        if step % self.print_every == 0 or step == self.total:
            done = step - self.start
            eta = (time.perf_counter() - self.t0) / done * (self.total - step) if done else float("nan")
            print(f"step {step}/{self.total}  {info}  eta {_fmt_s(eta)}", flush=True)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.live:
            self.progress.console.print(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _fmt_s(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
