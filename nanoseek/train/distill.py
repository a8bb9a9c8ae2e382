"""On-policy distillation: the student samples, the teacher grades every token (GKD, Agarwal et al. 2023,
arXiv 2306.13649, with lambda = 1 (only student-generated data) and beta = 1 (the generalized JSD becomes the
reverse KL); TRL's GKDTrainer with lmbda=1, beta=1 is the peer).

One step: draw `prompts_per_step` train-split problems, let the student's engine sample one completion each
(temperature T), run the frozen teacher and the student over prompt + completion, and minimise

    L = (1 / N) * sum over completion positions t of  KL( p_S(. | x_<t) || p_T(. | x_<t) )
      = (1 / N) * sum_t sum_v p_S(v) * (log p_S(v) - log p_T(v))

over the FULL vocabulary (both distributions at temperature T), N = completion tokens in the step (the
sampled eos included). The gradient flows only through the student's distribution at each position, not
through the sampling (as in GKD and TRL: the samples are treated as data). Mode-seeking: the student is
pushed off the tokens the teacher finds unlikely in the states the student itself reaches.

Teacher and student must share the tokenizer (same vocabulary and ids): checked, one ConfigError otherwise.
With an imported checkpoint's tokenizer (nanoseek.hf_tokenizer) the prompts are its chat template's and both
distributions are taken over the tokenizer's vocabulary only (an embedding padded past it, as checkpoints pad
theirs, keeps its never-sampled rows out of the KL), so a padded teacher can teach an unpadded student.
Schedule and optimizer: the shared AdamW + warmup/cosine (train/common.py), over steps or a wall-clock budget
(as SFT). Problems of step s come from an RNG seeded by (seed, s) and the engine's sampling seed is a function
of (seed, s), so a resumed run draws exactly what the uninterrupted one would.
Simplifications: one process (no DDP); one sample per prompt; no reward is used (accuracy of the student's
samples is only logged).
"""
from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nanoseek.cli_config import knob
from nanoseek.config import ConfigError
from nanoseek.train.checkpoint import load_checkpoint, load_run_model, save_checkpoint
from nanoseek.train.common import TrainConfig, build_optimizer, clip_grads, set_lr
from nanoseek.train.loop import HasTrainConfig, RunClock, finish_run, load_mask, open_run, write_run_files
from nanoseek.train.metrics import MetricsLogger, ProgressLine


# ---- the loss (pure functions of logits) ----------------------------------------------------------------
def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-position KL(p_S || p_T) over the last (vocabulary) axis, both softmaxes at `temperature` (the
    reference formula; training uses `fused_reverse_kl`, the same value with a hand-written backward)."""
    s = (student_logits / temperature).log_softmax(-1)
    t = (teacher_logits / temperature).log_softmax(-1)
    return (s.exp() * (s - t)).sum(-1)


class _FusedReverseKL(torch.autograd.Function):
    """KL(p_S || p_T) per row from student logits z and teacher log-probs log q (no gradient), with the
    closed-form backward dKL/dz_v = p_v (log p_v - log q_v - KL) / T: autograd's chain through
    log_softmax, exp, sub, mul and sum would make five passes over (N, vocab) and keep as many buffers."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, t_logp: torch.Tensor, temperature: float) -> torch.Tensor:
        logp = (z / temperature).log_softmax(-1)
        p = logp.exp()
        diff = logp.sub_(t_logp)  # log p - log q, in logp's buffer
        kl = (p * diff).sum(-1)
        ctx.save_for_backward(p, diff, kl)
        ctx.temperature = temperature
        return kl

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        p, diff, kl = ctx.saved_tensors
        grad = diff.sub_(kl.unsqueeze(-1)).mul_(p).mul_((g / ctx.temperature).unsqueeze(-1))
        return grad, None, None


def fused_reverse_kl(student_logits: torch.Tensor, teacher_logp: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """`reverse_kl(student_logits, teacher_logits, T)` given the teacher's log-softmax at T (`teacher_logp`)."""
    return _FusedReverseKL.apply(student_logits, teacher_logp, temperature)


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, n_tokens: float,
                 temperature: float = 1.0) -> torch.Tensor:
    """Sum of the per-token reverse KL over mask == 1 positions, divided by n_tokens."""
    return (reverse_kl(student_logits, teacher_logits, temperature) * mask).sum() / n_tokens


def check_same_tokenizer(teacher_tok, student_tok, teacher: str, student: str) -> None:
    """Distillation compares distributions id by id: both sides must use one vocabulary."""
    a, b = teacher_tok._tok.get_vocab(with_added_tokens=True), student_tok._tok.get_vocab(with_added_tokens=True)
    if a != b:
        diff = len(set(a.items()) ^ set(b.items()))
        raise ConfigError(f"teacher {teacher} and student {student} use different tokenizers ({len(a)} vs {len(b)} "
                          f"tokens, {diff} entries differ): distillation needs one shared vocabulary; pretrain the "
                          f"student with the teacher's tokenizer.json")


# ---- config ---------------------------------------------------------------------------------------------
@dataclass
class DistillConfig(HasTrainConfig):
    teacher: str = knob("", help="the teacher's run directory")
    student: str = knob("", help="the student's run directory (its latest checkpoint starts the run)")
    task: str = knob("arithmetic", help="task whose train-split prompts the student samples on")
    difficulty: int | None = knob(None, help="task difficulty (none = the task's default)")
    prompts_per_step: int = knob(32, help="student samples per optimizer step")
    max_new_tokens: int = knob(64, help="longest student sample in tokens")
    temperature: float = knob(1.0, help="sampling and KL temperature (GKD / TRL: the same for both)")
    top_p: float | None = None
    micro_batch: int = 64
    # > 0: wall-clock budget (lr cosine over time, stop at the end); steps is a cap
    budget_s: float = knob(0.0, flag="--minutes", scale=60.0, resume="override",
                           help="wall-clock budget of the run in minutes, 0 = none (the lr follows it)")
    ckpt_every: int = knob(25, help="steps between checkpoints")
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=5e-4, steps=200, warmup_steps=10,
                                                                  weight_decay=0.0, bias_gamma=0.0))

    def validate(self) -> DistillConfig:
        if not self.teacher or not self.student:
            raise ConfigError("--teacher RUN and --student RUN are required")
        if self.prompts_per_step < 1 or self.max_new_tokens < 1 or self.micro_batch < 1 or self.ckpt_every < 1:
            raise ConfigError("prompts_per_step, max_new_tokens, micro_batch and ckpt_every must be >= 1")
        if self.temperature <= 0:
            raise ConfigError("temperature must be > 0")
        if self.budget_s < 0:
            raise ConfigError("budget must be >= 0")
        self.train.validate()
        return self


@dataclass
class Packed:
    """Student samples packed into rows for one training forward: several sequences share a row (best fit,
    longest first), each with its own positions and a block-diagonal causal mask, so no position is spent
    on padding beyond the last row ends. `targets` are the flat (row * width + column) indices of the
    inputs whose next token is a completion token (the sampled eos included): only those go through the
    vocabulary head and the KL."""

    ids: torch.Tensor  # (R, W) input ids (each sequence minus its last token)
    positions: torch.Tensor  # (R, W) position of each token within its own sequence
    mask: torch.Tensor  # (R, 1, W, W) bool, True = attend (same sequence, not later)
    real: torch.Tensor  # (R, W) bool: a sequence's token, not padding
    targets: torch.Tensor  # (N,) flat indices into R * W


def pack(seqs: list[list[int]], prompt_lens: list[int], pad_id: int = 2, device="cpu", width: int | None = None) -> Packed:
    """Best-fit-decreasing packing of `seqs` (prompt + completion ids) into rows of `width` tokens (default:
    the longest input); sequence i's completion predictions are its inputs prompt_lens[i] - 1 .. len - 2."""
    inputs = [s[:-1] for s in seqs]
    W = max([len(x) for x in inputs] + [width or 0])
    rows: list[list[int]] = []  # sequence indices per row
    room: list[int] = []
    for i in sorted(range(len(inputs)), key=lambda i: -len(inputs[i])):
        fits = [r for r in range(len(rows)) if room[r] >= len(inputs[i])]
        r = min(fits, key=lambda r: room[r]) if fits else len(rows)
        if r == len(rows):
            rows.append([])
            room.append(W)
        rows[r].append(i)
        room[r] -= len(inputs[i])
    R = len(rows)
    ids = torch.full((R, W), pad_id, dtype=torch.long)
    positions = torch.zeros(R, W, dtype=torch.long)
    seg = torch.full((R, W), -1, dtype=torch.long)
    targets = []
    for r, members in enumerate(rows):
        col = 0
        for i in sorted(members):
            n = len(inputs[i])
            ids[r, col:col + n] = torch.tensor(inputs[i])
            positions[r, col:col + n] = torch.arange(n)
            seg[r, col:col + n] = i
            targets.extend(r * W + col + t for t in range(prompt_lens[i] - 1, n))
            col += n
    real = seg >= 0
    causal = torch.ones(W, W, dtype=torch.bool).tril()
    same = (seg[:, :, None] == seg[:, None, :]) & real[:, :, None]
    mask = (same & causal) | torch.eye(W, dtype=torch.bool)  # a pad query attends to itself only (no empty row)
    return Packed(ids.to(device), positions.to(device), mask[:, None].to(device), real.to(device),
                  torch.tensor(targets, dtype=torch.long, device=device))


def _head_at(model, h: torch.Tensor, targets: torch.Tensor, vocab: int | None = None) -> torch.Tensor:
    """Logits (N, vocab) of the flat positions `targets` only; `vocab`: the first `vocab` logits (an imported
    checkpoint's padded embedding rows, never sampled, are left out of both distributions)."""
    return model.logits(h.reshape(-1, h.size(-1)).index_select(0, targets))[..., :vocab]


def distill_step(student, teacher, optimizer, prompts, gens, cfg: DistillConfig, vocab: int | None = None) -> dict:
    """One optimizer step on one batch of student samples; returns the mean per-token reverse KL and grad norm.

    The samples are packed (`pack`, rows as wide as the longest sample, so two share a row only where both
    fit: the padding a long sample would force on short ones), `micro_batch` packed rows per forward. The
    frozen teacher scores them in a no-grad forward; both heads and the KL run only on completion positions."""
    device = next(student.parameters()).device
    seqs = [p + g.tokens for p, g in zip(prompts, gens)]
    n_tokens = max(float(sum(len(g.tokens) for g in gens)), 1.0)
    pk = pack(seqs, [len(p) for p in prompts], device=device)
    student.train()
    moe = bool(student.moe_layers())
    total = 0.0
    W = pk.ids.size(1)
    one_per_row = pk.ids.size(0) == len(seqs)
    for s in range(0, pk.ids.size(0), cfg.micro_batch):
        sl = slice(s, s + cfg.micro_batch)
        tg = pk.targets[(pk.targets >= s * W) & (pk.targets < (s + cfg.micro_batch) * W)] - s * W
        ids, pos, mask = pk.ids[sl], pk.positions[sl], pk.mask[sl]
        if one_per_row:  # right-padded rows: the plain causal kernel, ~8% faster than the explicit mask
            pos, mask = None, None
        with torch.no_grad():
            t_logp = (_head_at(teacher, teacher.hidden(ids, pos, mask), tg, vocab) / cfg.temperature).log_softmax(-1)
        with load_mask(student, pk.real[sl]):
            s_logits = _head_at(student, student.hidden(ids, pos, mask), tg, vocab)
        loss = fused_reverse_kl(s_logits, t_logp, cfg.temperature).sum() / n_tokens
        loss.backward()
        total += float(loss.detach())
    from nanoseek.train.common import fill_missing_grads

    fill_missing_grads(student)
    grad_norm = clip_grads(student, cfg.train.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if moe:
        student.update_expert_bias(cfg.train.bias_gamma)
    return {"loss": total, "grad_norm": grad_norm, "tokens": n_tokens}


def step_problems(task, cfg: DistillConfig, difficulty: int, step: int) -> list:
    rng = random.Random(cfg.train.seed * 1_000_003 + step)
    return [task.sample_split(rng, difficulty, "train") for _ in range(cfg.prompts_per_step)]


# ---- the run --------------------------------------------------------------------------------------------
def train_distill(out: str | Path, cfg: DistillConfig | None, resume: bool = False, device: str = "cpu",
                  quiet: bool = False, steps: int | None = None, budget_s: float | None = None) -> dict:
    """Distil the teacher run into the student run's model, writing run directory `out`."""
    from nanoseek.engine import Engine
    from nanoseek.tasks import get_task
    from nanoseek.hf_tokenizer import load_tokenizer

    out, ckpt_dir, ckpt, saved = open_run(out, resume, "distill")
    if saved is not None:
        cfg = DistillConfig.from_dict(saved)
    if cfg is None:
        raise ConfigError("train_distill needs a config for a fresh run")
    cfg = dataclasses.replace(cfg, budget_s=cfg.budget_s if budget_s is None else budget_s,
                              train=dataclasses.replace(cfg.train, steps=steps or cfg.train.steps))
    cfg.validate()
    tcfg = cfg.train
    t_tok, s_tok = load_tokenizer(cfg.teacher), load_tokenizer(cfg.student)  # nanoseek's own or imported
    check_same_tokenizer(t_tok, s_tok, cfg.teacher, cfg.student)
    teacher, _, teacher_step = load_run_model(cfg.teacher, device=device)
    student, _, student_step = load_run_model(cfg.student, device=device)
    vocab = s_tok.sample_vocab  # an imported checkpoint may pad its embedding past the tokenizer: compare these
    if (teacher.cfg.vocab_size != student.cfg.vocab_size and not s_tok.imported) or min(
            teacher.cfg.vocab_size, student.cfg.vocab_size) < vocab:
        raise ConfigError(f"teacher and student output layers differ ({teacher.cfg.vocab_size} vs "
                          f"{student.cfg.vocab_size} logits): they must share the tokenizer")
    for p in teacher.parameters():
        p.requires_grad_(False)
    task = get_task(cfg.task)
    difficulty = task.check_difficulty(cfg.difficulty)
    optimizer = build_optimizer(student, tcfg)
    metrics = MetricsLogger(out / "metrics.jsonl")
    step, elapsed0, seen = 0, 0.0, 0
    if ckpt is not None:
        state = load_checkpoint(ckpt, student, optimizer)
        step, elapsed0, seen = int(state["step"]), float(state["elapsed_s"]), int(state["samples_seen"])
        metrics.truncate_after(step)
    else:
        run_cfg = {"model": student.cfg.to_dict(), "distill": cfg.to_dict(), "train": tcfg.to_dict(),
                   "teacher_checkpoint": str(teacher_step), "init_checkpoint": str(student_step),
                   "data": {"task": cfg.task}, "dense": not student.moe_layers(), "stage": "distill"}
        write_run_files(out, run_cfg, Path(cfg.student))
    engine = Engine(student, s_tok)
    progress = ProgressLine(tcfg.steps, start=step, enabled=not quiet, print_every=max(1, tcfg.steps // 20),
                            description="distill")
    clock = RunClock(elapsed0, cfg.budget_s)
    record: dict = {}
    try:
        while step < tcfg.steps:
            if clock.spent():
                break
            lr = clock.lr(step, tcfg)
            set_lr(optimizer, lr)
            t0 = time.perf_counter()
            problems = step_problems(task, cfg, difficulty, step)
            prompts = [s_tok.prompt_ids(p.prompt) for p in problems]
            gens = engine.generate(prompts, cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                                   seed=tcfg.seed * 1_000_003 + step)
            scores = [task.score(p, s_tok.completion_text(q, g.text), truncated=g.finish_reason == "length")
                      for p, q, g in zip(problems, prompts, gens)]
            t_gen = time.perf_counter() - t0
            res = distill_step(student, teacher, optimizer, prompts, gens, cfg, vocab)
            step += 1
            seen += len(problems)
            dt = time.perf_counter() - t0
            out_of_time = clock.spent()
            last = step == tcfg.steps or out_of_time
            record = {"step": step, "loss": res["loss"], "main": res["loss"], "mtp": 0.0, "balance": 0.0,
                      "reverse_kl": res["loss"], "lr": lr, "grad_norm": res["grad_norm"],
                      "accuracy": sum(s.correct for s in scores) / len(scores),
                      "format_rate": sum(s.format_ok for s in scores) / len(scores),
                      "response_len_mean": sum(len(g.tokens) for g in gens) / len(gens), "samples_seen": seen,
                      "tokens_per_s": res["tokens"] / dt, "gen_s": round(t_gen, 3), "train_s": round(dt - t_gen, 3),
                      "elapsed_s": clock.elapsed()}
            metrics.log(record)
            if last or step % cfg.ckpt_every == 0:
                save_checkpoint(ckpt_dir, step, student, optimizer,
                                {"elapsed_s": record["elapsed_s"], "samples_seen": seen}, tcfg.keep_last)
            progress.update(step, res["loss"], lr, record["tokens_per_s"],
                            f"acc {record['accuracy']:.2f} len {record['response_len_mean']:.0f}")
            if out_of_time:
                progress.message(f"time budget reached at step {step}; checkpoint saved")
                break
    finally:  # Ctrl-C: the next run resumes from the last periodic checkpoint
        progress.close()
    finish_run(out, record)
    return {"step": step, "loss": record.get("loss"), "samples_seen": seen,
            "elapsed_s": record.get("elapsed_s", elapsed0), "run_dir": str(out)}
