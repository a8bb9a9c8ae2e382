"""Pipeline parallelism (V3 report sec. 3.2.1, DualPipe) with torch.distributed.pipelining: the decoder is cut
at layer boundaries into stages; the embedding goes with the first stage, the final norm, output head and the
MTP modules with the last. Schedules: 1F1B (one stage per rank), ZB-V zero bubble and DualPipeV (two stages per
rank in a V: rank r holds stage r and stage 2P-1-r, so the first and the last stage share rank 0).

What crosses a stage boundary, per micro-batch: the hidden state (mb, T, dim), the token ids as float (the MTP
modules on the last stage embed the future tokens; ids < 2^24 are exact in float32) and the running balance
term, the sum of the sequence balance losses of the layers so far, as an (mb, 1) column, so the balance loss
of every stage reaches the loss and its gradient returns to every stage's router. The last stage outputs the
main logits, one logits tensor per MTP depth and that balance column; `pipeline_loss` makes the V3 loss of them.

The MTP modules embed with the SHARED embedding and predict with the shared head. The last stage holds the
head and a copy of the embedding whose gradient `sync_grads` sums with the first stage's (Megatron's
shared-embedding all-reduce; a local sum when both stages sit on rank 0), so both copies stay equal. One
module shared by two stages of a rank would be wrong under ZB-V / DualPipeV: their split backward computes
each stage's weight gradients on its own, and the shared embedding's gradient came out wrong (measured: max
difference 0.03 against one process), hence the copy there too. Gradients of a stage's parameters otherwise never leave its rank; the global grad norm for clipping is
all-reduced over the pipeline. The schedules scale gradients by 1 / n_microbatches, so the step equals one
process on the whole batch when every micro-batch has the same number of target tokens. A routed expert that
no token of a micro-batch chose is not in that micro-batch's graph (nanoseek.model.experts), so the split
weight backward of ZB-V / DualPipeV never asks for its gradient; `sync_grads` gives every parameter left
without a gradient a zero one (tested with micro-batches of 4 tokens and 16 experts).

Simplifications: no data or expert parallelism combined with it here (world = pp); checkpoints are written by
`gather_state` on rank 0 in the single-model layout; no overlap of the EP all-to-all with computation inside a
DualPipe chunk (the schedule is torch's, with its own F/B/W split).
"""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ConfigError
from nanoseek.model.transformer import IGNORE, Transformer

SCHEDULES = ("1f1b", "zbv", "dualpipev")


class Stage(nn.Module):
    """Layers [lo, hi) of `model` (+ the embedding if first, + norm / head / MTP / embedding if last)."""

    def __init__(self, model: Transformer, lo: int, hi: int, first: bool, last: bool):
        super().__init__()
        self.first, self.last = first, last
        self.layers = nn.ModuleList(model.layers[lo:hi])
        # the last stage embeds the MTP tokens with its own copy of the embedding (see sync_grads)
        self.embed = model.embed if first else copy.deepcopy(model.embed) if last else None
        if last:
            self.norm, self.head, self.mtp = model.norm, model.head, model.mtp
        self.register_buffer("rope_cos", model.rope_cos, persistent=False)
        self.register_buffer("rope_sin", model.rope_sin, persistent=False)

    def _balance(self, layer) -> torch.Tensor | None:
        ffn = getattr(layer, "ffn", None)
        return getattr(ffn, "balance_loss", None) if ffn is not None and hasattr(ffn, "n_experts") else None

    def forward(self, *args):
        if self.first:
            ids_f = args[0].float()
            h = self.embed(args[0].long())
            bal = h.new_zeros(h.size(0), 1)
        else:
            h, ids_f, bal = args
        T = h.size(1)
        cos, sin = self.rope_cos[:T].unsqueeze(0), self.rope_sin[:T].unsqueeze(0)
        for layer in self.layers:
            h = layer(h, cos, sin)
            b = self._balance(layer)
            if b is not None and self.training:
                bal = bal + b
        if not self.last:
            return h, ids_f, bal
        # clamp: a no-op for real ids; the stage's shape inference runs forward on uninitialised tensors
        ids = ids_f.long().clamp(0, self.embed.num_embeddings - 1)
        outs = [self.head(self.norm(h)).float()]
        for k, module in enumerate(self.mtp, start=1):
            if T - k < 1:
                break
            c, s = self.rope_cos[:T - k].unsqueeze(0), self.rope_sin[:T - k].unsqueeze(0)
            h = module(h[:, :T - k], self.embed(ids[:, k:]), c, s)
            outs.append(self.head(module.norm(h)).float())
            b = self._balance(module.block)
            if b is not None and self.training:
                bal = bal + b
        return (*outs, bal)


def pipeline_loss(mtp_lambda: float, balance_alpha: float, record: list | None = None):
    """loss_fn(outputs, targets) for the schedules: CE + mtp_lambda * mean_k CE_k + alpha * balance column."""

    def loss_fn(outputs, targets):
        logits, *mtp, bal = outputs
        main = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
        mtp_terms = [F.cross_entropy(lg.flatten(0, 1), targets[:, k:].flatten(), ignore_index=IGNORE)
                     for k, lg in enumerate(mtp, start=1)]
        mtp_loss = torch.stack(mtp_terms).mean() if mtp_terms else main.new_zeros(())
        balance = bal.mean()
        if record is not None:
            record.append(torch.stack([main, mtp_loss, balance]).detach())
        return main + mtp_lambda * mtp_loss + balance_alpha * balance

    return loss_fn


def stage_bounds(n_layers: int, n_stages: int) -> list[tuple[int, int]]:
    """Contiguous layer ranges, the first stages taking one more layer when they do not divide evenly."""
    if n_stages > n_layers:
        raise ConfigError(f"{n_stages} pipeline stages need at least as many layers (the model has {n_layers})")
    base, extra = divmod(n_layers, n_stages)
    bounds, lo = [], 0
    for s in range(n_stages):
        hi = lo + base + (s < extra)
        bounds.append((lo, hi))
        lo = hi
    return bounds


class Pipeline:
    """This rank's stages and schedule. Every rank builds the whole model (same seed) and keeps its stages."""

    def __init__(self, model: Transformer, schedule: str, n_microbatches: int, mtp_lambda: float,
                 balance_alpha: float, device: torch.device):
        from torch.distributed import pipelining as pp

        if schedule not in SCHEDULES:
            raise ConfigError(f"--pp-schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        v_shape = schedule != "1f1b"
        n_stages = self.world * (2 if v_shape else 1)
        if n_microbatches < n_stages:
            raise ConfigError(f"{schedule} needs at least {n_stages} micro-batches, got {n_microbatches}")
        mine = [self.rank, n_stages - 1 - self.rank] if v_shape else [self.rank]
        bounds = stage_bounds(model.cfg.n_layers, n_stages)
        self.modules = [Stage(model, *bounds[s], s == 0, s == n_stages - 1) for s in mine]
        self.stages = [pp.PipelineStage(m, s, n_stages, device) for m, s in zip(self.modules, mine)]
        self.record: list[torch.Tensor] = []
        cls = {"1f1b": pp.Schedule1F1B, "zbv": pp.ScheduleZBVZeroBubble, "dualpipev": pp.ScheduleDualPipeV}[schedule]
        loss_fn = pipeline_loss(mtp_lambda, balance_alpha, self.record)
        self.mtp_lambda, self.balance_alpha, self.n_stages = mtp_lambda, balance_alpha, n_stages
        self.schedule_name, self.n_microbatches = schedule, n_microbatches
        self.schedule = cls(self.stages[0] if not v_shape else self.stages, n_microbatches, loss_fn=loss_fn)
        self.has_first = any(m.first for m in self.modules)
        self.has_last = any(m.last for m in self.modules)
        self.embed_copy = next((m.embed.weight for m in self.modules if m.last), None)
        self.embed_main = next((m.embed.weight for m in self.modules if m.first), None)
        self.model = model
        self.warm = False
        self.module = nn.ModuleList(self.modules)  # for the optimizer: each parameter once
        # the ranks of the first and last stage sum their embedding grads (new_group is collective: all call it)
        self.embed_group = dist.new_group([0, self.world - 1]) if not v_shape and self.world > 1 else None

    def parameters(self) -> list[nn.Parameter]:
        """This rank's parameters, each once (V-shape stages on rank 0 share the embedding)."""
        return list(self.module.parameters())

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """Forward + backward of one global batch; returns [main, mtp, balance] (mean over micro-batches) on
        the rank holding the last stage, None elsewhere."""
        if not self.warm:
            self._warm_up(x, y)
        self.record.clear()
        kwargs = {}
        if self.has_last:
            kwargs["target"] = y
        args = (x,) if self.has_first else ()
        self.schedule.step(*args, **kwargs)
        return torch.stack(self.record).mean(0) if self.record else None

    def _warm_up(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """The stages infer their inter-stage shapes by running a forward (and backward) on their first
        call, which would count tokens into the expert loads and leave gradients. Run that call once on the
        first batch and undo its side effects (loads, balance losses, grads), so the first real step is clean."""
        moes = self.model.moe_layers()
        saved = [(m.load_accum.clone(), m.last_load.clone()) for m in moes]
        kwargs = {"target": y} if self.has_last else {}
        self.schedule.step(*((x,) if self.has_first else ()), **kwargs)
        for m, (acc, last) in zip(moes, saved):
            m.load_accum.copy_(acc)
            m.last_load.copy_(last)
        for p in self.parameters():
            p.grad = None
        self.warm = True

    def sync_grads(self) -> None:
        """Sum the two embedding copies' gradients (first-stage rank and last-stage rank) when they differ."""
        for p in self.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if self.embed_copy is not None and self.embed_main is not None:  # V-shape: both on this rank
            total = self.embed_main.grad + self.embed_copy.grad
            self.embed_main.grad.copy_(total)
            self.embed_copy.grad.copy_(total)
        elif self.embed_group is not None and (self.has_first or self.has_last):
            dist.all_reduce((self.embed_main if self.has_first else self.embed_copy).grad, group=self.embed_group)

    def grad_norm(self) -> torch.Tensor:
        """Global grad norm over the pipeline, each parameter counted once (the embedding copy excluded)."""
        params = [p for p in self.parameters() if p is not self.embed_copy]
        sq = torch.stack([p.grad.pow(2).sum() for p in params]).sum()
        dist.all_reduce(sq)
        return sq.sqrt()

    def clip(self, max_norm: float) -> float:
        total = self.grad_norm()
        if max_norm > 0:
            coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
            for p in self.parameters():
                p.grad.mul_(coef)
        return float(total)

    # ---- the trainer's interface (as ExpertParallel's; train/pretrain.py) ----------------------------------
    def setup_owners(self) -> None:
        """owner[name]: the rank whose stages hold each parameter of the full model (collective)."""
        mine = {id(p) for p in self.parameters()}
        named = list(self.model.named_parameters())
        owner = torch.tensor([self.rank + 1 if id(p) in mine else 0 for _, p in named], device=named[0][1].device)
        dist.all_reduce(owner)
        self.owner = {name: int(o) - 1 for (name, _), o in zip(named, owner)}

    def shard(self, model: Transformer, optimizer: torch.optim.Optimizer, build_optimizer) -> torch.optim.Optimizer:
        """An optimizer over this rank's stages, carrying over the loaded AdamW state (the embedding copy takes
        the embedding's)."""
        self.setup_owners()
        new = build_optimizer(self.module)
        for p in self.parameters():
            src = model.embed.weight if p is self.embed_copy else p
            if src in optimizer.state:
                new.state[p] = {k: v.clone() for k, v in optimizer.state[src].items()}
        for g_new, g_old in zip(new.param_groups, optimizer.param_groups):
            g_new["lr"] = g_old["lr"]
        return new

    def forward_backward(self, model: Transformer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One batch through the schedule; [main, mtp, balance, total] on every rank (sent by the last stage)."""
        parts = self.step(x, y)
        out = torch.zeros(4, device=x.device)  # on the device: nccl broadcasts only device tensors
        if parts is not None:
            main, mtp, bal = parts.tolist()
            out = torch.tensor([main, mtp, bal, main + self.mtp_lambda * mtp + self.balance_alpha * bal],
                               device=x.device)
        dist.broadcast(out, src=self.stage_rank(self.n_stages - 1))
        return out

    def stage_rank(self, stage: int) -> int:
        return stage if stage < self.world else self.n_stages - 1 - stage

    def average_grads(self, model: Transformer) -> None:
        self.sync_grads()

    def clip_grads(self, model: Transformer, max_norm: float) -> float:
        return self.clip(max_norm)

    @torch.no_grad()
    def prepare_eval(self, model: Transformer) -> None:
        """Bring every rank's full model up to date (each parameter broadcast by its owner): evaluation then
        runs the plain model, data-parallel over the ranks."""
        for name, p in model.named_parameters():
            dist.broadcast(p.data, src=self.owner[name])

    def gather(self, model: Transformer, optimizer: torch.optim.Optimizer, build_full):
        """(full model, full optimizer) in the single-model layout on rank 0, (None, None) elsewhere."""
        self.prepare_eval(model)
        step = next((s["step"] for s in optimizer.state.values()), None)
        moments = {}
        for name, p in model.named_parameters():
            if step is None:
                break
            st = optimizer.state.get(p) if self.owner[name] == self.rank else None
            buf = torch.stack([st["exp_avg"], st["exp_avg_sq"]]) if st else p.new_zeros(2, *p.shape)
            dist.broadcast(buf, src=self.owner[name])
            moments[name] = buf
        if self.rank != 0:
            return None, None
        rng = torch.get_rng_state()
        full, full_opt = build_full()
        torch.set_rng_state(rng)
        full.load_state_dict(model.state_dict())
        for name, p in full.named_parameters():
            if name in moments:
                full_opt.state[p] = {"step": step.clone(), "exp_avg": moments[name][0].clone(),
                                     "exp_avg_sq": moments[name][1].clone()}
        for g_new, g_old in zip(full_opt.param_groups, optimizer.param_groups):
            g_new["lr"] = g_old["lr"]
        return full, full_opt

    def describe(self) -> str:
        return (f"pipeline parallel: {self.schedule_name}, {self.world} ranks x {len(self.modules)} stage(s), "
                f"{self.n_microbatches} micro-batches per step")


def setup_pipeline(model: Transformer, pp: int, schedule: str, n_microbatches: int, mtp_lambda: float,
                   balance_alpha: float, device: torch.device) -> Pipeline:
    world = dist.get_world_size() if dist.is_initialized() else 1
    check_pp(pp, world, schedule, n_microbatches, None)
    return Pipeline(model, schedule, n_microbatches, mtp_lambda, balance_alpha, device)


def check_pp(pp: int, world: int, schedule: str, n_microbatches: int, batch_size: int | None) -> None:
    """User-facing checks of --pp / --pp-schedule / --pp-microbatches, before any work starts."""
    if pp < 2 or world != pp:
        raise ConfigError(f"pipeline parallelism needs --pp >= 2 equal to the number of processes (torchrun "
                          f"--nproc_per_node={max(pp, 2)}), got --pp {pp} with {world} process(es)")
    if schedule not in SCHEDULES:
        raise ConfigError(f"--pp-schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    stages = pp * (1 if schedule == "1f1b" else 2)
    if n_microbatches < stages:
        raise ConfigError(f"{schedule} on {pp} ranks needs --pp-microbatches >= {stages}, got {n_microbatches}")
    if batch_size is not None and batch_size % n_microbatches:
        raise ConfigError(f"batch size {batch_size} must be a multiple of --pp-microbatches {n_microbatches}")
