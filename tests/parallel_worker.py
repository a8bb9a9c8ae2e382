"""Run under torchrun by tests/test_parallel_ep.py: one training step of a micro MoE model with expert
parallelism against the same step in one process on the whole global batch (computed by every rank itself,
no communication), for a given expert plan. Writes the largest differences (over ranks) to argv[1] as JSON: gradients, parameters and
the clip norm absolute, the gathered checkpoint (weights and AdamW moments) relative to each tensor's scale;
a NaN anywhere comes out as +inf (tests/diffs.py), which fails every tolerance.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/parallel_worker.py OUT.json EP [redundant]
"""
import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from diffs import worst, worst_over_ranks  # noqa: E402

from nanoseek.config import ModelConfig  # noqa: E402
from nanoseek.model import Transformer  # noqa: E402
from nanoseek.parallel.eplb import rebalance_experts  # noqa: E402
from nanoseek.parallel.expert_parallel import ExpertParallel, make_mesh  # noqa: E402
from nanoseek.train.common import TrainConfig, build_optimizer, clip_grads, fill_missing_grads  # noqa: E402

MICRO = {"vocab_size": 64, "dim": 32, "inter_dim": 64, "moe_inter_dim": 32, "n_layers": 3, "n_dense_layers": 1,
         "n_heads": 2, "n_routed_experts": 8, "n_shared_experts": 1, "n_activated_experts": 2, "kv_lora_rank": 16,
         "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "max_seq_len": 64,
         "original_seq_len": 64, "n_expert_groups": 2, "n_limited_groups": 1}
TCFG = TrainConfig(lr=3e-3, grad_clip=0.5)  # clipping active: the global norm must be the one-process norm


def total_loss(model, x, y):
    _, parts = model(x, y)
    return parts.main + TCFG.mtp_lambda * parts.mtp + TCFG.balance_alpha * parts.balance


def main() -> None:
    out_path, ep = sys.argv[1], int(sys.argv[2])
    redundant = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    ref = Transformer(ModelConfig(**MICRO).validate())
    model = copy.deepcopy(ref)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (4 * world, 17), generator=g)
    x, y = ids[:, :-1], ids[:, 1:]

    # one process, the whole global batch
    ref_opt = build_optimizer(ref, TCFG)
    total_loss(ref, x, y).backward()
    fill_missing_grads(ref)
    ref_norm = clip_grads(ref, TCFG.grad_clip)
    ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
    ref_opt.step()

    # expert parallel: this rank's rows only
    n_moe = len(model.moe_layers())
    plan = None
    if redundant:  # a skewed load so EPLB replicates the heavy experts (some twice, some on both ranks)
        loads = torch.tensor([[40.0, 1, 2, 3, 30, 5, 1, 8]] * n_moe)
        plan = rebalance_experts(loads, 8 + redundant, 2, 1, ep)[0]
        assert plan.size(1) == 8 + redundant and torch.bincount(plan[0]).max() > 1
    par = ExpertParallel(make_mesh(ep, torch.device("cpu")), plan)
    opt = par.shard(model, build_optimizer(model, TCFG), lambda m: build_optimizer(m, TCFG))
    loss = total_loss(model, x[rank::world], y[rank::world])
    loss.backward()
    par.average_grads(model)
    norm = par.clip_grads(model, TCFG.grad_clip)

    def logical_name(name: str, moe_prefixes: dict) -> str:
        for prefix, layer in moe_prefixes.items():
            if name.startswith(prefix + "experts."):
                slot, rest = name[len(prefix + "experts."):].split(".", 1)
                start = par.mesh.ep_rank * layer.per_rank
                return f"{prefix}experts.{int(layer.phy2log[start + int(slot)])}.{rest}"
        return name

    prefixes = {n + ".": m.ep for n, m in model.named_modules() if getattr(m, "ep", None) is not None}
    grad_diff = worst((p.grad - ref_grads[logical_name(n, prefixes)]).abs() for n, p in model.named_parameters())
    opt.step()
    ref_params = dict(ref.named_parameters())
    param_diff = worst((p - ref_params[logical_name(n, prefixes)]).abs() for n, p in model.named_parameters())
    # the gathered single-model layout equals the one-process model after the step
    full, full_opt = par.gather(model, opt, _fresh_pair)
    gather_diff = 0.0
    if rank == 0:
        sd, rsd = full.state_dict(), ref.state_dict()
        assert sorted(sd) == sorted(rsd)
        gather_diff = worst(rel(sd[k], rsd[k]) for k in sd)
        ro, go = ref_opt.state_dict(), full_opt.state_dict()
        assert ro["param_groups"] == go["param_groups"]
        gather_diff = worst([gather_diff] + [rel(go["state"][i][k], ro["state"][i][k])
                                             for i in ro["state"] for k in ("exp_avg", "exp_avg_sq")])
    result = worst_over_ranks([grad_diff, param_diff, abs(norm - ref_norm), gather_diff])  # NaN -> +inf
    n_local = torch.tensor([len(m.experts) for m in model.moe_layers()])
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({"grad": result[0], "param": result[1], "norm": result[2], "gathered": result[3],
                       "ref_norm": ref_norm, "local_experts": n_local.tolist(), "sent_bytes": par.sent_bytes()}, f)
    dist.destroy_process_group()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the reference tensor's scale (AdamW moments are ~1e-5 after one step)."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _fresh_pair():
    full = Transformer(ModelConfig(**MICRO).validate())
    return full, build_optimizer(full, TCFG)


if __name__ == "__main__":
    main()
