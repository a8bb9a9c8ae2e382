"""Expert parallelism (V3 report sec. 3.2 and 3.4): the routed experts of every MoE layer are sharded over an
expert-parallel (EP) group of ranks; attention, dense FFNs, shared experts, embeddings and the head stay
replicated on every rank (data parallelism over the whole world of dp x ep ranks, as V3 pairs EP with DP).

Forward of one MoE layer on every rank (Megatron's all-to-all token dispatcher, DeepEP's dispatch/combine):
  1. route locally (the gate runs on the rank's own tokens), map each (token, expert) pair to a PHYSICAL expert:
     with redundant experts a logical expert has several replicas (EPLB's phy2log / log2phy) and its pairs go
     to them round-robin, so a replica takes an equal share of its expert's tokens;
  2. exchange per-physical-expert counts with one all_to_all_single, then the token rows themselves with a
     second one of uneven splits (dispatch);
  3. run the local physical experts on what arrived, send the outputs back along the reversed splits (combine),
     weight them by the gate and sum into the tokens.
`AllToAll` is an autograd function whose backward is the reverse all-to-all, so gradients for remote tokens
return to their owners and expert weight gradients accumulate on the rank holding the expert.

Gradient sync (`ExpertParallel.average_grads`, replacing DDP's average): replicated parameters (incl. the
router) are averaged over the world; a routed expert's gradient is the sum over its replicas (a replica sees
only its share of tokens) and over DP copies, divided by the world size: then every replica holds the gradient
the one-process model would, and stays identical to its siblings after the optimizer step. The aux-loss-free
bias update already sums expert loads over all ranks (train/pretrain.py), so every rank keeps the same biases.

Checkpoints keep the single-model layout: `gather` assembles full expert weights and AdamW moments on rank 0
(one logical expert from its first replica) and the existing `save_checkpoint` writes them, so a run trained
with --ep 2 resumes with --ep 1 (or 4) and exports with to_hf. Loading builds the full model, loads, then shards.

Simplifications: every rank first builds the whole model and drops foreign experts (peak memory of one full
model at start and, on rank 0, at save time: torch.distributed.checkpoint would avoid both); the expert gradient
sum uses one all_reduce of an (experts x expert-size) buffer per layer over the world instead of a reduction
restricted to the ranks that hold each expert; computation and communication are not overlapped (DualPipe's
trick); tokens are not deduplicated per node (DeepEP sends one copy per node, V3's node-limited routing);
the engine (inference) runs without EP: RL rollouts use a full copy refreshed by `full_experts` (training.py).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from nanoseek.config import ConfigError
from nanoseek.parallel.eplb import identity_plan


class AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits; backward sends gradients back along the reversed splits.
    `meter` (an ExpertDispatch) counts the bytes sent to OTHER ranks, forward and backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group, meter) -> torch.Tensor:
        ctx.splits, ctx.group, ctx.meter = (out_splits, in_splits), group, meter
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        meter.count(x, in_splits)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_splits, in_splits = ctx.splits
        back = grad.new_empty(sum(in_splits), *grad.shape[1:])
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        ctx.meter.count(grad, out_splits)
        return back, None, None, None, None


@dataclass
class Mesh:
    """This rank's place in the dp x ep grid: ranks ep_rank = rank % ep form one EP group (contiguous ranks)."""

    dp: int
    ep: int
    ep_rank: int
    ep_group: object  # torch ProcessGroup of this rank's EP group
    world: int
    device: torch.device = torch.device("cpu")  # where collectives' tensors live (nccl takes device tensors only)


def check_ep(ep: int, world: int) -> None:
    """The user-facing checks of an --ep value, before any work starts."""
    if ep < 2 or world < 2:
        raise ConfigError(f"expert parallelism needs --ep >= 2 and several processes (torchrun "
                          f"--nproc_per_node=N), got --ep {ep} with {world} process(es)")
    if world % ep:
        raise ConfigError(f"--ep {ep} must divide the number of processes ({world})")


def make_mesh(ep: int, device: torch.device) -> Mesh:
    """A ("dp", "ep") DeviceMesh over the initialised world (gloo on CPU, nccl on GPU)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    check_ep(ep, world)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (world // ep, ep), mesh_dim_names=("dp", "ep"))
    return Mesh(dp=world // ep, ep=ep, ep_rank=mesh.get_local_rank("ep"), ep_group=mesh.get_group("ep"),
                world=world, device=device)


class ExpertDispatch:
    """One MoE layer's dispatch -> local experts -> combine. Called by MoE.forward as
    `self.ep(x, weights, indices)` in place of the one-process `routed` path."""

    def __init__(self, experts: nn.ModuleList, phy2log: torch.Tensor, n_experts: int, mesh: Mesh):
        self.experts = experts  # this rank's physical experts, in slot order
        self.mesh = mesh
        self.n_phy = phy2log.numel()
        self.per_rank = self.n_phy // mesh.ep
        self.phy2log = phy2log
        self.logcnt = torch.bincount(phy2log, minlength=n_experts)
        # log2phy[e, j] = physical index of e's j-th replica (slot order)
        order = phy2log.argsort(stable=True)
        starts = self.logcnt.cumsum(0) - self.logcnt
        self.log2phy = torch.full((n_experts, int(self.logcnt.max())), -1, dtype=torch.int64)
        self.log2phy[phy2log[order], torch.arange(self.n_phy) - starts[phy2log[order]]] = order
        self.sent_bytes = 0  # bytes of token rows this rank sent to other ranks (dispatch + combine, fwd + bwd)

    def count(self, rows: torch.Tensor, splits: list[int]) -> None:
        off_rank = sum(splits) - splits[self.mesh.ep_rank]
        self.sent_bytes += off_rank * rows[0].numel() * rows.element_size() if rows.size(0) else 0

    def physical(self, flat_idx: torch.Tensor) -> torch.Tensor:
        """Physical expert of each (token, expert) pair: the j-th pair of expert e (in token order) goes to
        replica (j + ep_rank) % count(e), spreading a replicated expert's tokens evenly over its replicas."""
        dev = flat_idx.device
        cnt = self.logcnt.to(dev)
        order = flat_idx.argsort(stable=True)
        per_expert = torch.bincount(flat_idx, minlength=cnt.numel())
        starts = per_expert.cumsum(0) - per_expert
        occurrence = torch.empty_like(flat_idx)
        occurrence[order] = torch.arange(flat_idx.numel(), device=dev) - starts[flat_idx[order]]
        replica = (occurrence + self.mesh.ep_rank) % cnt[flat_idx]
        return self.log2phy.to(dev)[flat_idx, replica]

    def __call__(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        m, K = self.mesh, indices.size(1)
        phys = self.physical(indices.flatten())
        order = phys.argsort(stable=True)
        token_of = order // K
        send_slot = torch.bincount(phys, minlength=self.n_phy)  # pairs per physical expert
        recv_slot = torch.empty_like(send_slot)
        dist.all_to_all_single(recv_slot, send_slot, group=m.ep_group)  # (src rank, local slot) counts
        recv_slot = recv_slot.view(m.ep, self.per_rank)
        send_rank = send_slot.view(m.ep, self.per_rank).sum(1).tolist()
        recv_rank = recv_slot.sum(1).tolist()
        received = AllToAll.apply(x[token_of], recv_rank, send_rank, m.ep_group, self)  # dispatch
        # group the received rows (ordered by source rank, then slot) by local slot and run each expert once
        slot_of = torch.repeat_interleave(torch.arange(self.per_rank, device=x.device).repeat(m.ep),
                                          recv_slot.flatten().to(x.device))
        by_slot = slot_of.argsort(stable=True)
        rows = received[by_slot]
        outs, pos = [received[:0]], 0  # the empty slice keeps `received` in the graph when no row arrived
        for s, n in enumerate(recv_slot.sum(0).tolist()):
            if n:
                outs.append(self.experts[s](rows[pos:pos + n]))
            pos += n
        out = torch.cat(outs)[by_slot.argsort()]  # back to arrival order
        returned = AllToAll.apply(out, send_rank, recv_rank, m.ep_group, self)  # combine
        y = returned * weights.flatten()[order].unsqueeze(-1)
        return torch.zeros_like(x).index_add_(0, token_of, y)


class ExpertParallel:
    """The EP plan of a whole model: shard it, sync its gradients, clip, and gather it back for checkpoints.

    plans: (n_moe_layers, n_physical) phy2log per MoE layer (eplb.rebalance_experts' first output, or
    eplb.identity_plan for none redundant); n_physical must be a multiple of ep. Physical expert p lives on
    EP rank p // (n_physical / ep)."""

    def __init__(self, mesh: Mesh, plans: torch.Tensor | None = None):
        self.mesh = mesh
        self.plans = plans
        self.layers: list[ExpertDispatch] = []
        self._logical_grads: list[torch.Tensor] = []

    # ---- setup -------------------------------------------------------------------------------------------
    def shard(self, model, optimizer: torch.optim.Optimizer, build_optimizer) -> torch.optim.Optimizer:
        """Replace every MoE layer's experts by this rank's physical experts and return a new optimizer over the
        sharded model, carrying over the AdamW state of each kept (or replicated) parameter."""
        moes = model.moe_layers()
        n_exp = moes[0].n_experts if moes else 0
        if self.plans is None:
            self.plans = identity_plan(n_exp, len(moes))
        if self.plans.shape[0] != len(moes) or self.plans.size(1) % self.mesh.ep:
            raise ConfigError(f"expert plan of shape {tuple(self.plans.shape)} does not fit {len(moes)} MoE "
                              f"layers on {self.mesh.ep} EP ranks")
        src_of: dict[nn.Parameter, nn.Parameter] = {}
        for moe, plan in zip(moes, self.plans):
            if sorted(set(plan.tolist())) != list(range(n_exp)):
                raise ConfigError("an expert plan must hold every logical expert at least once")
            per_rank = plan.numel() // self.mesh.ep
            mine = plan[self.mesh.ep_rank * per_rank:(self.mesh.ep_rank + 1) * per_rank].tolist()
            local, used = [], set()
            for e in mine:
                module = moe.experts[e] if e not in used else copy.deepcopy(moe.experts[e])
                used.add(e)
                for p_new, p_src in zip(module.parameters(), moe.experts[e].parameters()):
                    src_of[p_new] = p_src
                local.append(module)
            moe.experts = nn.ModuleList(local)
            moe.ep = ExpertDispatch(moe.experts, plan.clone(), n_exp, self.mesh)
            self.layers.append(moe.ep)
        new = build_optimizer(model)
        for p in model.parameters():
            state = optimizer.state.get(src_of.get(p, p))
            if state:
                new.state[p] = {k: v.clone() for k, v in state.items()}
        for g_new, g_old in zip(new.param_groups, optimizer.param_groups):
            g_new["lr"] = g_old["lr"]
        return new

    @staticmethod
    def _expert_params(model) -> set[int]:
        return {id(p) for moe in model.moe_layers() for p in moe.experts.parameters()}

    # ---- gradients ---------------------------------------------------------------------------------------
    def average_grads(self, model) -> None:
        """Replicated grads: mean over the world. Expert grads: sum over replicas and ranks / world."""
        from nanoseek.train.common import fill_missing_grads

        fill_missing_grads(model)
        W = self.mesh.world
        expert = self._expert_params(model)
        shared = [p.grad for p in model.parameters() if p.requires_grad and id(p) not in expert]
        bufs = []
        for moe, layer in zip(model.moe_layers(), self.layers):
            size = sum(p.numel() for p in moe.experts[0].parameters())
            buf = torch.zeros(moe.n_experts, size, device=shared[0].device)
            for module, e in zip(moe.experts, self._local_logical(layer)):
                buf[e] += torch.cat([p.grad.reshape(-1) for p in module.parameters()])
            bufs.append(buf)
        flat = torch.cat([g.reshape(-1) for g in shared] + [b.reshape(-1) for b in bufs])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= W
        offset = 0
        for g in shared:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
        self._logical_grads = []
        for moe, layer, buf in zip(model.moe_layers(), self.layers, bufs):
            buf = flat[offset:offset + buf.numel()].view_as(buf)
            offset += buf.numel()
            self._logical_grads.append(buf)
            for module, e in zip(moe.experts, self._local_logical(layer)):
                pos = 0
                for p in module.parameters():
                    p.grad.copy_(buf[e, pos:pos + p.numel()].view_as(p))
                    pos += p.numel()

    def _local_logical(self, layer: ExpertDispatch) -> list[int]:
        start = self.mesh.ep_rank * layer.per_rank
        return layer.phy2log[start:start + layer.per_rank].tolist()

    def clip_grads(self, model, max_norm: float) -> float:
        """Clip to the global norm of the one-process model (each logical expert counted once, replicated
        parameters once); same formula as torch.nn.utils.clip_grad_norm_. Call after average_grads."""
        expert = self._expert_params(model)
        norms = [torch.linalg.vector_norm(p.grad) for p in model.parameters()
                 if p.grad is not None and id(p) not in expert]
        norms += [torch.linalg.vector_norm(b) for b in self._logical_grads]
        total = torch.linalg.vector_norm(torch.stack(norms))
        if max_norm > 0:
            coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(coef)
        return float(total)

    # ---- checkpoints -------------------------------------------------------------------------------------
    def full_experts(self, model, optimizer: torch.optim.Optimizer | None = None) -> list[torch.Tensor]:
        """Per MoE layer a (1 or 3, n_logical, expert size) buffer of every logical expert's flat weights (and,
        with `optimizer`, its AdamW exp_avg and exp_avg_sq), on every rank of the EP group. Collective over
        the EP group: one all_reduce per layer, each logical expert contributed by its first replica."""
        keys = ("param", "exp_avg", "exp_avg_sq")[:3 if optimizer is not None else 1]
        gathered = []
        for moe, layer in zip(model.moe_layers(), self.layers):
            size = sum(p.numel() for p in moe.experts[0].parameters())
            buf = torch.zeros(len(keys), moe.n_experts, size, device=next(model.parameters()).device)
            start = self.mesh.ep_rank * layer.per_rank
            for s, module in enumerate(moe.experts):
                e = int(layer.phy2log[start + s])
                if int(layer.log2phy[e, 0]) != start + s:
                    continue  # only the first replica of each expert contributes
                params = list(module.parameters())
                buf[0, e] = torch.cat([p.detach().reshape(-1) for p in params])
                if optimizer is not None and all(p in optimizer.state for p in params):
                    for k in (1, 2):
                        buf[k, e] = torch.cat([optimizer.state[p][keys[k]].reshape(-1) for p in params])
            dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.mesh.ep_group)
            gathered.append(buf)
        return gathered

    def gather(self, model, optimizer: torch.optim.Optimizer, build_full):
        """(full model, full optimizer) in the single-model layout on rank 0, (None, None) elsewhere. Collective:
        every rank calls it. `build_full()` returns a fresh one-process (model, optimizer) pair to fill."""
        gathered = self.full_experts(model, optimizer)
        if dist.get_rank() != 0:
            return None, None
        rng = torch.get_rng_state()  # building the full model runs its initialiser: keep the run's RNG stream
        full, full_opt = build_full()
        torch.set_rng_state(rng)
        full_params = dict(full.named_parameters())
        full_buffers = dict(full.named_buffers())
        full_moes = full.moe_layers()
        with torch.no_grad():
            for name, src in model.named_parameters():
                if ".experts." in name:
                    continue
                dst = full_params[name]
                dst.copy_(src)
                if src in optimizer.state:
                    full_opt.state[dst] = {k: v.clone() for k, v in optimizer.state[src].items()}
            for name, b in model.named_buffers():
                if ".experts." not in name:
                    full_buffers[name].copy_(b)
            step = next((s["step"] for s in optimizer.state.values()), None)
            for moe, buf in zip(full_moes, gathered):
                for e, module in enumerate(moe.experts):
                    pos = 0
                    for p in module.parameters():
                        n = p.numel()
                        p.copy_(buf[0, e, pos:pos + n].view_as(p))
                        if step is not None:
                            full_opt.state[p] = {"step": step.clone(),
                                                 "exp_avg": buf[1, e, pos:pos + n].view_as(p).clone(),
                                                 "exp_avg_sq": buf[2, e, pos:pos + n].view_as(p).clone()}
                        pos += n
        for g_new, g_old in zip(full_opt.param_groups, optimizer.param_groups):
            g_new["lr"] = g_old["lr"]
        return full, full_opt

    def prepare_eval(self, model) -> None:
        """Nothing to do: evaluation runs the sharded model (its forward dispatches like training's)."""

    def describe(self) -> str:
        n_phy = self.plans.size(1)
        extra = n_phy - int(self.plans[0].max()) - 1
        return (f"expert parallel: ep {self.mesh.ep} x dp {self.mesh.dp}, {n_phy} physical experts per MoE layer"
                + (f" ({extra} redundant)" if extra else "") + f", {n_phy // self.mesh.ep} on each rank")

    def sent_bytes(self, reset: bool = True) -> int:
        """Bytes of token rows this rank sent to other ranks (dispatch + combine, forward + backward) since the
        last reset. The counts exchange (n_physical int64 per layer and pass) is not included."""
        total = sum(layer.sent_bytes for layer in self.layers)
        if reset:
            for layer in self.layers:
                layer.sent_bytes = 0
        return total


def plan_experts(loads: torch.Tensor, redundant: int, n_groups: int, ep: int) -> torch.Tensor:
    """phy2log (layers, n_experts + redundant) for training: EPLB on `loads` (one node of `ep` GPUs) when there
    are redundant experts, the identity otherwise."""
    layers, n_exp = loads.shape
    if redundant < 0 or (n_exp + redundant) % ep:
        raise ConfigError(f"experts + redundant ({n_exp} + {redundant}) must be a multiple of --ep {ep}")
    if redundant == 0:
        return identity_plan(n_exp, layers)
    from nanoseek.parallel.eplb import rebalance_experts

    groups = n_groups if n_exp % n_groups == 0 else 1
    return rebalance_experts(loads, n_exp + redundant, groups, 1, ep)[0]


def setup_expert_parallel(model, ep: int, redundant: int, device: torch.device,
                          loads: torch.Tensor | None = None) -> ExpertParallel:
    """Mesh + plan (rank 0's, broadcast so every rank shards alike). `loads` (layers, experts): the recorded
    loads EPLB places redundant experts by (uniform when None, e.g. a fresh run)."""
    mesh = make_mesh(ep, device)
    moes = model.moe_layers()
    if not moes:
        raise ConfigError("--ep needs a model with MoE layers")
    n_exp = moes[0].n_experts
    if loads is None or loads.shape != (len(moes), n_exp):
        loads = torch.ones(len(moes), n_exp)
    plan = plan_experts(loads.float(), redundant, model.cfg.n_expert_groups, ep).to(device)
    dist.broadcast(plan, src=0)
    return ExpertParallel(mesh, plan.cpu())
