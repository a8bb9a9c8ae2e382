"""Expert parallelism inside the trainers (pretrain, sft, rl): the few calls a trainer makes so that its
loop reads the same with and without `--ep` (V3 report sec. 3.2; expert_parallel.py holds the algorithm).

- `add_ep_arguments`: the --ep / --ep-redundant flags of pretrain, sft and rl.
- `setup_ep`: checks, EPLB plan from the recorded loads of the first run directory that has any (rank 0's,
  broadcast), shards the model and moves the optimizer state over (call after loading a checkpoint, which is
  always in the single-model layout).
- `sync_and_clip`: the DDP average (no parallelism) or the EP gradient sync, then the global-norm clip.
- `checkpoint_pair`: what `save_checkpoint` writes: the model itself, or the gathered single-model layout
  (collective: every rank calls it; only rank 0 gets the pair).
- Lockstep (RL): every MoE forward under EP is a collective over the EP group, so every rank must run as many
  forward (and backward) passes as the busiest rank, in the same order. `lockstep` agrees on those counts
  before the passes start; `idle_pass` is a pass over one token that counts in no expert load and adds
  exactly zero to every gradient.
- Rollouts (RL): the engine needs every expert. As veRL and OpenRLHF reshard the training weights into the
  inference engine's layout before generation, `RolloutCopy` keeps a full one-process model on every rank
  and refreshes it from the sharded one before each step's rollouts (one all-reduce of the expert weights
  over the EP group). Why not the EP forward in lockstep: decoding is many small steps whose number differs
  per rank (rows stop at their own eos), so every rank would have to run dummy decode steps until the
  longest finished, one collective per layer per token; the full copy costs one model's memory and one
  all-reduce per step, and it makes rollouts exactly the one-process ones (same weights, per-row seeds).

Simplification: the full rollout copy holds every expert on every rank (fine up to models whose weights fit
one device; the 671B layout would reshard into an EP inference engine instead).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.distributed as dist

from nanoseek.parallel.expert_parallel import ExpertParallel, check_ep, setup_expert_parallel


def add_ep_arguments(p) -> None:
    """--ep and --ep-redundant, the same on every trainer's command."""
    p.add_argument("--ep", type=int, default=1, help="expert parallelism: shard routed experts over groups of "
                   "this many processes (torchrun; docs/parallel.md). Not stored: a resume may change it")
    p.add_argument("--ep-redundant", type=int, default=0, help="with --ep: extra physical experts per MoE layer, "
                   "replicas of the most loaded ones placed by EPLB from the run's recorded loads")


def check_ep_flags(ep: int, redundant: int, world: int) -> bool:
    """True when the run asks for expert parallelism (then the flags are valid), False for --ep 1."""
    if ep <= 1 and not redundant:
        return False
    check_ep(ep, world)
    return True


def setup_ep(model, optimizer: torch.optim.Optimizer, ep: int, redundant: int, device: torch.device,
             build_optimizer: Callable, load_runs: Iterable[str | Path | None] = (),
             is_main: bool = True) -> tuple[ExpertParallel, torch.optim.Optimizer]:
    """(ExpertParallel, the optimizer over the sharded model). Redundant experts are placed by the loads
    recorded in the first of `load_runs` holding any (read on rank 0; uniform loads when none)."""
    from nanoseek.parallel.loads import recorded_loads

    loads = None
    if is_main and redundant:
        for run in load_runs:
            if run is not None and (Path(run) / "metrics.jsonl").exists():
                loads = recorded_loads(run)
                if loads is not None:
                    break
    parallel = setup_expert_parallel(model, ep, redundant, device, loads)
    return parallel, parallel.shard(model, optimizer, build_optimizer)


def sync_and_clip(model, max_norm: float, dist_, parallel=None) -> float:
    """Average gradients over ranks (DDP, or the EP sync when `parallel` is given) and clip to the global
    norm; returns the pre-clip norm."""
    if parallel is None:
        from nanoseek.train.common import clip_grads

        dist_.average_grads(model)
        return clip_grads(model, max_norm)
    parallel.average_grads(model)
    return parallel.clip_grads(model, max_norm)


def checkpoint_pair(model, optimizer, parallel, build_full: Callable):
    """(model, optimizer) to save in the single-model layout; collective under EP ((None, None) off rank 0)."""
    if parallel is None:
        return model, optimizer
    return parallel.gather(model, optimizer, build_full)


# ---- RL: lockstep passes ------------------------------------------------------------------------------
def lockstep(parallel: ExpertParallel | None, counts: list[int]) -> list[int]:
    """The largest of each count over the EP group (the counts themselves without EP)."""
    if parallel is None:
        return list(counts)
    t = torch.tensor(counts, dtype=torch.int64, device=parallel.mesh.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=parallel.mesh.ep_group)
    return t.tolist()


def idle_pass(model, grad: bool) -> None:
    """One training-mode forward (and, with `grad`, backward) over a single token that no expert load counts
    and whose loss is multiplied by zero: it joins the EP collectives of a busier rank's pass and changes
    nothing (the gradients it adds are exact zeros)."""
    device = next(model.parameters()).device
    ids = torch.zeros(1, 1, dtype=torch.long, device=device)
    model.set_load_mask(torch.zeros(1, 1, dtype=torch.bool, device=device))
    try:
        with torch.set_grad_enabled(grad):
            h = model.hidden(ids)
            if grad:
                (model.logits(h).sum() * 0.0).backward()
    finally:
        model.set_load_mask(None)


# ---- RL: the rollout copy -----------------------------------------------------------------------------
class RolloutCopy:
    """A full one-process model on every rank for the inference engine, refreshed from the sharded model."""

    def __init__(self, parallel: ExpertParallel, build_full: Callable):
        self.parallel = parallel
        self.model = build_full()
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def refresh(self, sharded) -> None:
        """Collective over the EP group: copy replicated weights and buffers, all-gather the experts."""
        experts = self.parallel.full_experts(sharded)
        full_params = dict(self.model.named_parameters())
        full_buffers = dict(self.model.named_buffers())
        with torch.no_grad():
            for name, p in sharded.named_parameters():
                if ".experts." not in name:
                    full_params[name].copy_(p)
            for name, b in sharded.named_buffers():
                if ".experts." not in name:
                    full_buffers[name].copy_(b)
            for moe, buf in zip(self.model.moe_layers(), experts):
                for e, module in enumerate(moe.experts):
                    pos = 0
                    for p in module.parameters():
                        p.copy_(buf[0, e, pos:pos + p.numel()].view_as(p))
                        pos += p.numel()

