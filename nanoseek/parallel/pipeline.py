"""Pipeline parallelism (V3 report sec. 3.2.1, DualPipe) with torch.distributed.pipelining: the decoder is cut
at layer boundaries into stages; the embedding goes with the first stage, the final norm, output head and the
MTP modules with the last. Schedules: 1F1B (one stage per rank), ZB-V zero bubble and DualPipeV (two stages per
rank in a V: rank r holds stage r and stage 2P-1-r, so the first and the last stage share rank 0).

What crosses a stage boundary, per micro-batch: the hidden state (mb, T, dim), the token ids as float (the MTP
modules on the last stage embed the future tokens; ids < 2^24 are exact in float32) and the running balance
term alpha * sum of the sequence balance losses of the layers so far, as an (mb, 1) column, so the balance loss
of every stage reaches the loss and its gradient returns to every stage's router. The last stage outputs the
main logits, one logits tensor per MTP depth and that balance column; `pipeline_loss` makes the V3 loss of them.

The MTP modules embed with the SHARED embedding and predict with the shared head. The last stage holds the
head and a copy of the embedding whose gradient `sync_grads` sums with the first stage's (Megatron's
shared-embedding all-reduce; a local sum when both stages sit on rank 0), so both copies stay equal. One
module shared by two stages of a rank would be wrong under ZB-V / DualPipeV: their split backward computes
each stage's weight gradients on its own, and the shared embedding's gradient came out wrong (measured: max
difference 0.03 against one process), hence the copy there too. Gradients of a stage's parameters otherwise never leave its rank; the global grad norm for clipping is
all-reduced over the pipeline. The schedules scale gradients by 1 / n_microbatches, so the step equals one
process on the whole batch when every micro-batch has the same number of target tokens.

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

    def __init__(self, model: Transformer, lo: int, hi: int, first: bool, last: bool, alpha: float):
        super().__init__()
        self.first, self.last, self.alpha = first, last, alpha
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
                bal = bal + self.alpha * b
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
                bal = bal + self.alpha * b
        return (*outs, bal)


def pipeline_loss(mtp_lambda: float, record: list | None = None):
    """loss_fn(outputs, targets) for the schedules: CE + mtp_lambda * mean_k CE_k + the balance column."""

    def loss_fn(outputs, targets):
        logits, *mtp, bal = outputs
        main = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
        mtp_terms = [F.cross_entropy(lg.flatten(0, 1), targets[:, k:].flatten(), ignore_index=IGNORE)
                     for k, lg in enumerate(mtp, start=1)]
        mtp_loss = torch.stack(mtp_terms).mean() if mtp_terms else main.new_zeros(())
        balance = bal.mean()
        if record is not None:
            record.append(torch.stack([main, mtp_loss, balance]).detach())
        return main + mtp_lambda * mtp_loss + balance

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
        self.modules = [Stage(model, *bounds[s], s == 0, s == n_stages - 1, balance_alpha) for s in mine]
        self.stages = [pp.PipelineStage(m, s, n_stages, device) for m, s in zip(self.modules, mine)]
        self.record: list[torch.Tensor] = []
        cls = {"1f1b": pp.Schedule1F1B, "zbv": pp.ScheduleZBVZeroBubble, "dualpipev": pp.ScheduleDualPipeV}[schedule]
        loss_fn = pipeline_loss(mtp_lambda, self.record)
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
