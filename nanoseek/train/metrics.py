"""Training telemetry: metrics.jsonl (one JSON object per logged step) and a live progress line.

metrics.jsonl is append-only during a run; each line is written with one write() call and flushed, so a
kill leaves at most one partial last line. On resume, `truncate_after(step)` atomically rewrites the file
keeping only lines up to the checkpointed step (dropping the partial line and the steps that will be
recomputed), so the file of a killed-and-resumed run reads exactly like an uninterrupted one.

The progress line uses rich: a bar with step/total, loss, lr, tokens/s and ETA on a terminal; when stdout is
not a terminal (CI, pipes) it prints a plain line every `print_every` steps instead of redrawing.

Model FLOPs utilization (MFU, PaLM appendix B; docs/speed.md): model FLOPs per token (`model_flops_per_token`,
a closed form of the configuration) x tokens/s, over this process's measured peak FP32 matmul rate
(`peak_matmul_flops`: the best of a few n x n GEMMs on torch's current threads, measured once per process). The
peak is a measured rate of this machine, not a datasheet figure, so MFU says how far a training step is from
what the same BLAS achieves on one large square GEMM.
"""
from __future__ import annotations

import functools
import json
import math
import sys
import time
from pathlib import Path

import torch

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from nanoseek.io import atomic_write_text


def matmul_params_per_token(cfg, mtp: bool = False) -> int:
    """Weights of the matmuls one token passes through in a forward: every attention projection, the dense FFN
    or the MoE gate + shared experts + the K activated routed experts, the output head (not the embedding,
    a row lookup, nor the norms' gains, elementwise). mtp: also each MTP module (eh_proj, its block, the head
    again), as pretraining with n_mtp > 0 runs them."""
    c = cfg.param_counts()
    norm_gains = cfg.kv_lora_rank + (cfg.q_lora_rank if cfg.q_lora_rank > 0 else 0)
    attn = c["attention_per_layer"] - norm_gains
    expert = c["expert"]
    moe = (cfg.n_activated_experts + cfg.n_shared_experts) * expert + cfg.n_routed_experts * cfg.dim
    n_moe = cfg.n_moe_layers
    ffn = moe if n_moe else c["dense_ffn_per_layer"]
    main = cfg.n_layers * attn + (cfg.n_layers - n_moe) * c["dense_ffn_per_layer"] + n_moe * moe + c["head"]
    extra = cfg.n_mtp * (2 * cfg.dim * cfg.dim + attn + ffn + c["head"]) if mtp else 0
    return main + extra


def model_flops_per_token(cfg, seq_len: int, mtp: bool = False) -> float:
    """Training FLOPs (forward + backward) per token of a sequence of seq_len tokens:

        6 * P  +  6 * L * H * (d_qk + d_v) * (seq_len + 1) / 2

    P = matmul_params_per_token (2 FLOPs per weight per token forward, twice that backward: activation and
    weight gradients); the second term is attention's scores (d_qk = nope + rope head dim) and values (d_v) per
    head, 2 FLOPs per multiply-add, over the (seq_len + 1) / 2 keys a causal query sees on average, times 3
    for forward + backward; L = layers (+ MTP modules when mtp). Not counted: elementwise ops, softmax, norms,
    the router's top-k (as in PaLM's and nanoGPT's MFU)."""
    layers = cfg.n_layers + (cfg.n_mtp if mtp else 0)
    attn = 6 * layers * cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim) * (seq_len + 1) / 2
    return 6 * matmul_params_per_token(cfg, mtp) + attn


@functools.cache
def _peak(threads: int, n: int, reps: int) -> float:
    # one thread: the calling thread's CPU time, so that time the OS gives other processes is not counted
    # (on a loaded machine wall-clock GEMMs can read 10x slow); more threads: wall clock
    clock = time.thread_time if threads == 1 else time.perf_counter
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm up (allocator, BLAS dispatch)
    best = float("inf")
    for _ in range(reps):
        t0 = clock()
        a @ b
        best = min(best, clock() - t0)
    return 2 * n ** 3 / best


def peak_matmul_flops(n: int = 1024, reps: int = 8) -> float:
    """This process's peak FP32 matmul rate (FLOP/s): the fastest of `reps` n x n x n GEMMs on torch's current
    number of threads (timed by thread CPU time on one thread, by wall clock on more); measured once per
    process and thread count (~0.2 s), then cached. MFU over it uses wall-clock tokens/s, so time lost to
    other processes lowers MFU, as it lowers the work done."""
    return _peak(torch.get_num_threads(), n, reps)


def mfu(tokens_per_s: float, flops_per_token: float) -> float:
    """Model FLOPs utilization of this process: tokens/s x model FLOPs per token / measured peak."""
    return tokens_per_s * flops_per_token / peak_matmul_flops()


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
                 description: str = "pretrain", budget_s: float | None = None, elapsed0: float = 0.0):
        """budget_s: the run ends on a time budget (steps only a cap): the bar and ETA follow seconds used of it
        (`elapsed0` of them before this process), not steps."""
        self.enabled = enabled
        self.total, self.start = total, start
        self.budget_s, self.elapsed0 = budget_s, elapsed0
        self.print_every = max(1, print_every)
        self.console = Console(stderr=False)
        self.live = enabled and sys.stdout.isatty()
        self.t0 = time.perf_counter()
        self.progress = None
        if self.live:
            self.progress = Progress(TextColumn(f"[bold]{description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                                     console=self.console, transient=False)
            self.task = self.progress.add_task(description, total=budget_s if budget_s else total,
                                               completed=elapsed0 if budget_s else start, info="")
            self.progress.start()

    def update(self, step: int, loss: float, lr: float, tokens_per_s: float, extra: str = "") -> None:
        if not self.enabled:
            return
        info = f"loss {loss:.4f}  lr {lr:.2e}  {tokens_per_s:,.0f} tok/s{('  ' + extra) if extra else ''}"
        used = self.elapsed0 + time.perf_counter() - self.t0
        if self.live:
            self.progress.update(self.task, completed=min(used, self.budget_s) if self.budget_s else step, info=info)
            return
        if self.budget_s and step % self.print_every == 0:
            print(f"step {step}  {info}  {_fmt_s(used)} of {_fmt_s(self.budget_s)}", flush=True)
        elif not self.budget_s and (step % self.print_every == 0 or step == self.total):
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
