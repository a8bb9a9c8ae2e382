"""Pieces every trainer shares (pretraining now, SFT / GRPO / distillation later): the optimization config,
AdamW with decoupled weight decay on matrices only, the warmup + cosine learning-rate schedule, and the
torch.distributed plumbing.

Optimizer (V3 report sec. 4.2, SPEC 2): AdamW, betas (0.9, 0.95), weight decay 0.1, gradient clipping 1.0.
Weight decay applies to >= 2-D parameters (matmul weights, embedding, MoE gate); 1-D parameters (RMSNorm
gains) are not decayed. The gate's selection bias is a buffer, so it is never in the optimizer: it moves
only by the auxiliary-loss-free sign rule.

Schedule: linear warmup from lr/warmup to lr over `warmup_steps`, then cosine decay to min_lr = lr * min_lr_ratio
at the last step (V3 uses warmup + constant + cosine; at our run lengths the constant phase is dropped).

Data parallelism: gradients are averaged with ONE coalesced all_reduce after the last micro-batch instead of
DistributedDataParallel. Why: a routed expert that no token of this rank chose has grad None, which plain DDP
rejects (it needs find_unused_parameters=True and a hook per parameter); here None becomes zeros on every
rank and in the one-process case too, so AdamW treats every parameter the same way (moments and weight decay
advance for idle experts) whether 1 or W processes run. With one process nothing is communicated.
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from nanoseek.cli_config import knob
from nanoseek.config import ConfigError


BALANCE_MODES = ("bias", "aux", "none")  # TrainConfig.balance


@dataclass
class TrainConfig:
    """Optimization and run-control knobs shared by every trainer. Defaults suit the `tiny` preset on a CPU.

    lr 4e-3: the best of a 150-step sweep of `tiny` (~1M active parameters, d=128) on the arithmetic corpus
    (held-out CE 1e-3: 1.347, 2e-3: 1.202, 4e-3: 1.143, 8e-3: 1.212; docs/pretrain.md), with no loss
    spikes. Larger presets want smaller values (V3 peaked at 2.2e-4 at 671B).
    """

    lr: float = knob(4e-3, help="peak learning rate")
    min_lr_ratio: float = 0.1  # cosine ends at lr * min_lr_ratio
    warmup_steps: int = knob(20, flag="--warmup", help="linear warmup steps")
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    batch_size: int = knob(16, help="global sequences per micro-batch (over all processes)")
    grad_accum: int = knob(1, help="micro-batches per optimizer step")
    seq_len: int = knob(128, help="tokens per sequence (SFT: the longest example; longer ones are skipped)")
    mtp_lambda: float = 0.3  # V3: 0.3 for the first 10T tokens, then 0.1
    balance_alpha: float = knob(1e-4, help="sequence-wise balance loss weight (V3: 1e-4)")
    bias_gamma: float = knob(1e-3, help="auxiliary-loss-free bias update speed (V3: 0.001)")
    # expert load balancing (pretraining): "bias" = V3's auxiliary-loss-free bias update (sec. 2.1.2, bias_gamma);
    # "aux" = the conventional batch-wise auxiliary loss it replaced, aux_alpha * sum_i f_i P_i (bias frozen);
    # "none" = neither (bias frozen at 0). The sequence-wise loss (balance_alpha) applies in every mode.
    balance: str = knob("bias", choices=BALANCE_MODES, help="expert load balancing: bias (V3's auxiliary-loss-free "
                        "bias update), aux (the batch-wise auxiliary loss it replaced), none")
    # 1e-3: the weight of the loss-controlled baseline in Wang et al. 2024 ("Auxiliary-Loss-Free Load
    # Balancing"; quoted from the paper as recalled, not re-checked here: a larger alpha balances better and
    # costs perplexity, their argument for the bias). Sums over MoE layers, as balance_alpha's loss does.
    aux_alpha: float = knob(1e-3, help="weight of the batch-wise auxiliary balance loss (--balance aux)")
    seed: int = knob(0, help="seed of data order, init and sampling")
    steps: int = knob(200, resume="override", help="optimizer steps in the whole run (the lr schedule's length)")
    minutes: float = knob(0.0, resume="override", help="wall-clock limit of this process, 0 = none; checkpoints "
                          "and stops when reached")
    log_interval: int = knob(1, help="steps between metrics.jsonl lines")
    eval_interval: int = knob(50, help="steps between held-out evaluations (and at the end); 0 = only at the end")
    eval_batches: int = knob(8, help="held-out batches per evaluation")
    ckpt_interval: int = knob(100, help="steps between checkpoints (and at the end); 0 = only at the end")
    keep_last: int = knob(2, help="checkpoints kept on disk")
    # torch.compile the blocks' training forward (nanoseek.train.common.enable_compile); a speed knob like
    # `minutes`: results equal to float rounding, and a resume may switch it either way
    compile: bool = knob(False, resume="override", help="torch.compile the blocks' training forward "
                         "(docs/speed.md: ~1 min of compiling first)")

    def validate(self) -> TrainConfig:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        need(self.lr > 0, f"lr must be positive, got {self.lr}")
        need(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        need(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        need(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        need(self.batch_size >= 1 and self.grad_accum >= 1, "batch_size and grad_accum must be >= 1")
        need(self.seq_len >= 2, f"seq_len must be >= 2, got {self.seq_len}")
        need(self.minutes >= 0, f"minutes must be >= 0, got {self.minutes}")
        need(self.balance in BALANCE_MODES, f"balance must be one of {', '.join(BALANCE_MODES)}, got {self.balance!r}")
        need(self.aux_alpha >= 0 and self.bias_gamma >= 0, "aux_alpha and bias_gamma must be >= 0")
        need(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "betas must be in [0, 1)")
        need(self.keep_last >= 1, f"keep_last must be >= 1, got {self.keep_last}")
        need(self.log_interval >= 1, f"log_interval must be >= 1, got {self.log_interval}")
        need(min(self.eval_interval, self.ckpt_interval, self.eval_batches) >= 0, "intervals must be >= 0")
        return self

    @property
    def min_lr(self) -> float:
        return self.lr * self.min_lr_ratio

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown train config field(s): {', '.join(unknown)}")
        return cls(**d).validate()


# ---- torch.compile ---------------------------------------------------------------------------------------
def enable_compile(model: nn.Module, enabled: bool, ep: int = 1, pp: int = 1, precision: str = "fp32") -> None:
    """--compile: regional torch.compile of the training forward (Transformer.compile_training: each block kind
    compiled once, dynamic shapes, the MoE dispatch eager). Checked combinations only: fp32 and bf16, one
    process or DDP; --ep / --pp (their dispatch and stage code are not traced) and fp8 (its quantizing
    autograd functions are not traced) raise a ConfigError naming the fix; the trainers call `check_compile`
    first, before they write anything."""
    if not enabled:
        return
    check_compile(enabled, ep, pp, precision)
    model.compile_training(True)


def check_compile(enabled: bool, ep: int = 1, pp: int = 1, precision: str = "fp32") -> None:
    """The combinations `enable_compile` refuses, as one ConfigError; cheap, so a trainer calls it before it
    creates or writes its run directory."""
    if not enabled:
        return
    if ep > 1 or pp > 1:
        raise ConfigError("--compile does not combine with --ep or --pp yet; drop --compile or the parallelism")
    if precision not in ("fp32", "bf16"):
        raise ConfigError(f"--compile supports precision fp32 and bf16, not {precision}; drop --compile")


# ---- learning rate ---------------------------------------------------------------------------------------
def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine to min_lr at the last step."""
    warmup = min(cfg.warmup_steps, cfg.steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    decay_steps = cfg.steps - warmup
    if decay_steps <= 1:
        return cfg.lr
    return _cosine(cfg, min(1.0, (step - warmup) / (decay_steps - 1)))


def _cosine(cfg: TrainConfig, progress: float) -> float:
    """From cfg.lr at progress 0 to cfg.min_lr at progress 1."""
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def lr_at_fraction(step: int, fraction: float, cfg: TrainConfig) -> float:
    """Like lr_at, but the cosine decay follows `fraction` (0..1) of an outside budget instead of the step
    count (warmup still counts steps): for a run that must end when something else ends."""
    if step < min(cfg.warmup_steps, cfg.steps):
        return lr_at(step, cfg)
    return _cosine(cfg, min(1.0, max(0.0, fraction)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# ---- optimizer -------------------------------------------------------------------------------------------
def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: >= 2-D parameters decayed, 1-D (norm gains) not. Buffers (gate bias) never appear."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    # foreach=False: the per-parameter loop is deterministic and just as fast at these sizes on a CPU.
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=lr_at(0, cfg),
                             betas=(cfg.beta1, cfg.beta2), eps=1e-8, foreach=False)


def fill_missing_grads(model: nn.Module) -> None:
    """Give parameters that received no gradient (idle experts) a zero grad, so every process steps them alike."""
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)


def clip_grads(model: nn.Module, max_norm: float) -> float:
    """Clip the global gradient norm to `max_norm` (0 = no clipping) and return the norm before clipping."""
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params])))


# ---- distributed -----------------------------------------------------------------------------------------
@dataclass
class Dist:
    """This process's place in the job. With world == 1 every method is a no-op (no communication)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.active and t.numel():
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.active and t.numel():
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t /= self.world
        return t

    def average_grads(self, model: nn.Module) -> None:
        """Average every parameter's gradient over ranks in one coalesced all_reduce (None -> zeros first)."""
        fill_missing_grads(model)
        if not self.active:
            return
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def broadcast_module(self, model: nn.Module) -> None:
        """Make every rank start from rank 0's parameters and buffers."""
        if self.active:
            for t in list(model.parameters()) + list(model.buffers()):
                dist.broadcast(t.data, src=0)

    def any_flag(self, flag: bool) -> bool:
        """True on every rank if it is True on any rank (e.g. rank 0's time limit)."""
        if not self.active:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def close(self) -> None:
        """Destroy the process group. On a normal exit (no exception propagating) the ranks first meet at a
        barrier, so no rank tears its gloo connections down while a peer still finishes its last collective
        (the peer then aborted at exit: "terminate called without an active exception"); while an exception
        propagates there is no barrier, since the other ranks may never come."""
        if self.active and dist.is_initialized():
            if sys.exc_info()[0] is None:
                dist.barrier()
            dist.destroy_process_group()


def setup_distributed(device: str = "auto") -> Dist:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK; init a process group (nccl on GPU, gloo on CPU) when
    WORLD_SIZE > 1. `device`: "auto" (cuda when available), "cpu" or "cuda"."""
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda requested but no CUDA device is available")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    return Dist(rank=rank, world=world, local_rank=local_rank, device=dev)
