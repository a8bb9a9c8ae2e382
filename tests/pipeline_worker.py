"""Run under torchrun by tests/test_parallel_pp.py: `steps` AdamW steps of a micro MoE model (with MTP) through a
torch.distributed.pipelining schedule against the same steps in one process on the whole batch (every rank
computes the reference itself). Two cases: "busy" (4 experts, 2 rows of 16 tokens per micro-batch: every
expert gets tokens) and "idle" (16 experts, 1 row of 4 tokens per micro-batch: 4 tokens x 2 choices < 16
experts, so at least 8 experts of every MoE layer receive no token in every micro-batch; their weights must
get a zero gradient, not crash the split weight backward of ZB-V / DualPipeV). Writes the largest
differences over ranks (NaN as +inf) to argv[1] as JSON, one entry per case.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/pipeline_worker.py OUT.json SCHEDULE
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
from nanoseek.parallel.pipeline import Pipeline  # noqa: E402
from nanoseek.train.common import TrainConfig, build_optimizer, clip_grads, fill_missing_grads  # noqa: E402

MICRO = {"vocab_size": 64, "dim": 32, "inter_dim": 64, "moe_inter_dim": 32, "n_layers": 4, "n_dense_layers": 1,
         "n_heads": 2, "n_routed_experts": 4, "n_shared_experts": 1, "n_activated_experts": 2, "kv_lora_rank": 16,
         "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "max_seq_len": 64,
         "original_seq_len": 64}
# case -> (config overrides, rows per micro-batch, tokens per row)
CASES = {"busy": ({}, 2, 16), "idle": ({"n_routed_experts": 16}, 1, 4)}
TCFG = TrainConfig(lr=3e-3, grad_clip=1.0, balance_alpha=0.01)  # a visible balance term
KEYS = ("loss", "grad", "norm", "param", "bias")


def run_case(schedule: str, steps: int, overrides: dict, rows: int, seq: int) -> dict:
    world = dist.get_world_size()
    torch.manual_seed(0)
    n_layers = 2 * world if schedule != "1f1b" else MICRO["n_layers"]
    cfg = ModelConfig(**{**MICRO, **overrides, "n_layers": n_layers}).validate()
    ref = Transformer(cfg)
    model = copy.deepcopy(ref)
    ref_opt = build_optimizer(ref, TCFG)
    n_mb = 2 * world if schedule != "1f1b" else 4
    pipe = Pipeline(model, schedule, n_mb, TCFG.mtp_lambda, TCFG.balance_alpha, torch.device("cpu"))
    opt = build_optimizer(pipe.module, TCFG)
    g = torch.Generator().manual_seed(1)
    # this rank's parameters -> the one-process model's; the last stage's embedding copy -> the embedding
    pairs = dict(zip((id(p) for p in model.parameters()), ref.parameters()))
    if pipe.embed_copy is not None:
        pairs[id(pipe.embed_copy)] = ref.embed.weight
    loss_diff = grad_diff = norm_diff = 0.0
    for step in range(steps):
        ids = torch.randint(0, 64, (rows * n_mb, seq + 1), generator=g)
        x, y = ids[:, :-1], ids[:, 1:]
        _, parts = ref(x, y)
        (parts.main + TCFG.mtp_lambda * parts.mtp + TCFG.balance_alpha * parts.balance).backward()
        fill_missing_grads(ref)
        ref_norm = clip_grads(ref, TCFG.grad_clip)
        got = pipe.step(x, y)
        pipe.sync_grads()
        norm = pipe.clip(TCFG.grad_clip)
        norm_diff = worst([norm_diff, abs(norm - ref_norm)])
        if got is not None:
            want = torch.stack([parts.main, parts.mtp, parts.balance]).detach()
            loss_diff = worst([loss_diff, (got - want).abs()])
        if step == 0:
            grad_diff = worst((p.grad - pairs[id(p)].grad).abs() for p in pipe.parameters())
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ref.update_expert_bias(TCFG.bias_gamma)
        model.update_expert_bias(TCFG.bias_gamma)  # layers of other ranks accumulated no load: unchanged
    own_bufs = {id(b) for m in pipe.modules for n, b in m.named_buffers() if n.endswith("gate.bias")}
    param_diff = worst((p - pairs[id(p)]).abs() for p in pipe.parameters())
    bias_diff = worst((a - b).abs() for a, b in zip(model.buffers(), ref.buffers()) if id(a) in own_bufs)
    result = worst_over_ranks([loss_diff, grad_diff, norm_diff, param_diff, bias_diff])
    return dict(zip(KEYS, result), stages=len(pipe.modules), microbatches=n_mb, steps=steps,
                experts=cfg.n_routed_experts, tokens_per_microbatch=rows * seq)


def main() -> None:
    out_path, schedule = sys.argv[1], sys.argv[2]
    steps = int(sys.argv[3]) if len(sys.argv) > 3 else 10
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    results = {name: run_case(schedule, steps, *case) for name, case in CASES.items()}
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
