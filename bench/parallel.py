"""Parallelism bench (docs/parallel.md): pipeline schedules' per-step time and bubble against the DualPipe README's
bubble formulas, EP all-to-all bytes per step against the formula, and EPLB's before/after GPU balance of a run.

    flock /tmp/nanoseek-heavy.lock python bench/parallel.py [--procs 2 4] [--run runs/base]

Pipeline: per (processes P, schedule) one torchrun job trains a small MoE model for `--steps` steps of M
micro-batches; every rank times its own stage chunks alone on one micro-batch (F: forward; B: full backward;
W: B minus the input-only backward), busy = M x sum over its chunks of (F + B), and bubble = step - busy (the
rank's idle time, communication included). Predicted bubbles (DualPipe README, PP = number of stages, no
computation/communication overlap on CPU so F&B = F + B): 1F1B (PP-1)(F+B); ZB-V and DualPipeV
(PP/2-1)(F&B+B-3W). With P processes on a 2-core machine, P = 4 is oversubscribed: its times are shown but
measure time-sharing more than the schedule.
EP: bytes each rank sends to other ranks per step (dispatch + combine, forward + backward) as counted from the
real splits, against 4 x sum over MoE layers of (tokens x top-k x (ep-1)/ep) x dim x 4 bytes (uniform routing).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nanoseek.config import ModelConfig  # noqa: E402
from nanoseek.model import Transformer  # noqa: E402
from nanoseek.train.common import TrainConfig, build_optimizer  # noqa: E402

MODEL = dict(vocab_size=256, dim=128, inter_dim=256, moe_inter_dim=64, n_layers=8, n_dense_layers=1, n_heads=4,
             n_routed_experts=8, n_shared_experts=1, n_activated_experts=2, kv_lora_rank=32, qk_nope_head_dim=32,
             qk_rope_head_dim=16, v_head_dim=32, max_seq_len=128, original_seq_len=128)
SEQ, MB_ROWS = 64, 4
TCFG = TrainConfig(lr=1e-3)


def median_time(fn, reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def chunk_times(module, args) -> tuple[float, float, float]:
    """(F, B, W) seconds of one stage chunk on one micro-batch, alone (no communication)."""
    def inputs():
        return [a.detach().requires_grad_(a.is_floating_point()) for a in args]

    def fwd():
        with torch.no_grad():
            module(*inputs())

    def out_sum(outs):
        outs = outs if isinstance(outs, tuple) else (outs,)
        return sum(o.float().sum() for o in outs if o.requires_grad)

    def full():
        module.zero_grad(set_to_none=True)
        out_sum(module(*inputs())).backward()

    def input_only():
        xs = inputs()
        need = [x for x in xs if x.requires_grad]
        loss = out_sum(module(*xs))
        if need:
            torch.autograd.grad(loss, need, allow_unused=True)
        else:  # the first stage has no float input: its B is all weight gradient
            loss.detach()

    t_f = median_time(fwd)
    t_fb = median_time(full)
    t_fi = median_time(input_only)
    return t_f, t_fb - t_f, max(0.0, t_fb - t_fi)


def pp_worker(schedule: str, steps: int, n_mb: int, out: str) -> None:
    import torch.distributed as dist

    from nanoseek.parallel.pipeline import Pipeline

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**MODEL).validate())
    pipe = Pipeline(model, schedule, n_mb, TCFG.mtp_lambda, TCFG.balance_alpha, torch.device("cpu"))
    opt = build_optimizer(pipe.module, TCFG)
    g = torch.Generator().manual_seed(1)
    times = []
    for step in range(steps + 1):  # step 0: warm-up (shape inference), not timed
        ids = torch.randint(0, MODEL["vocab_size"], (MB_ROWS * n_mb, SEQ + 1), generator=g)
        dist.barrier()
        t0 = time.perf_counter()
        pipe.step(ids[:, :-1], ids[:, 1:])
        pipe.sync_grads()
        pipe.clip(1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dist.barrier()
        if step:
            times.append(time.perf_counter() - t0)
    # this rank's chunks alone: the inputs they see (first: ids; later: hidden, ids, balance column)
    ids = torch.randint(0, MODEL["vocab_size"], (MB_ROWS, SEQ), generator=g)
    chunks = []
    for m in pipe.modules:
        m_copy = m  # after training: its grads and load counters are no longer needed
        args = (ids,) if m.first else (torch.randn(MB_ROWS, SEQ, MODEL["dim"]), ids.float(),
                                       torch.zeros(MB_ROWS, 1))
        chunks.append(chunk_times(m_copy, args))
    busy = n_mb * sum(f + b for f, b, _ in chunks)
    res = torch.tensor([statistics.median(times), busy] + [sum(c[i] for c in chunks) / len(chunks)
                                                           for i in range(3)])
    allres = [torch.zeros_like(res) for _ in range(dist.get_world_size())]
    dist.all_gather(allres, res)
    if rank == 0:
        Path(out).write_text(json.dumps({"per_rank": [r.tolist() for r in allres], "chunks": len(pipe.modules)}))
    dist.destroy_process_group()


def ep_worker(steps: int, out: str) -> None:
    import torch.distributed as dist

    from nanoseek.parallel.expert_parallel import ExpertParallel, make_mesh

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**MODEL).validate())
    par = ExpertParallel(make_mesh(world, torch.device("cpu")))
    opt = par.shard(model, build_optimizer(model, TCFG), lambda m: build_optimizer(m, TCFG))
    g = torch.Generator().manual_seed(1)
    sent, times = [], []
    rows = 2 * MB_ROWS
    for _ in range(steps):
        ids = torch.randint(0, MODEL["vocab_size"], (rows * world, SEQ + 1), generator=g)[rank::world]
        t0 = time.perf_counter()
        _, parts = model(ids[:, :-1], ids[:, 1:])
        (parts.main + TCFG.mtp_lambda * parts.mtp + TCFG.balance_alpha * parts.balance).backward()
        par.average_grads(model)
        par.clip_grads(model, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loads = model.accumulated_loads().clone()
        dist.all_reduce(loads)
        model.update_expert_bias(TCFG.bias_gamma, loads)
        times.append(time.perf_counter() - t0)
        sent.append(par.sent_bytes())
    cfg = model.cfg
    tokens = [rows * SEQ] * (cfg.n_layers - cfg.n_dense_layers) + [rows * (SEQ - k) for k in range(1, cfg.n_mtp + 1)]
    formula = 4 * sum(n * cfg.n_activated_experts * (world - 1) / world for n in tokens) * cfg.dim * 4
    res = torch.tensor([statistics.mean(sent), statistics.median(times)])
    dist.all_reduce(res)
    if rank == 0:
        Path(out).write_text(json.dumps({"bytes_per_rank": res[0].item() / world, "formula": formula,
                                         "step_s": res[1].item() / world, "ep": world}))
    dist.destroy_process_group()


def launch(nproc: int, args: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "r.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               __file__, "--worker", *args, "--out", str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        subprocess.run(cmd, check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", nargs="*")
    ap.add_argument("--out")
    ap.add_argument("--procs", type=int, nargs="*", default=[2, 4])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--run", help="a run directory for the EPLB table (nanoseek eplb)")
    ap.add_argument("--schedules", nargs="*", default=["1f1b", "zbv", "dualpipev"])
    ap.add_argument("--no-ep", action="store_true", help="skip the EP bytes table")
    a = ap.parse_args()
    if a.worker:
        kind, *rest = a.worker
        if kind == "pp":
            pp_worker(rest[0], int(rest[1]), int(rest[2]), a.out)
        else:
            ep_worker(int(rest[0]), a.out)
        return

    print(f"model: {MODEL['n_layers']} layers, dim {MODEL['dim']}, {MODEL['n_routed_experts']} experts top-"
          f"{MODEL['n_activated_experts']}, micro-batch {MB_ROWS} x {SEQ} tokens, gloo on CPU, "
          f"{os.cpu_count()} cores; medians of {a.steps} steps")
    print("\n| P | schedule | stages | M | step (s) | busy (s) | bubble (s) | bubble % | predicted bubble (s) "
          "| F / B / W per chunk (ms) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for P in a.procs:
        for schedule in a.schedules:
            stages = P if schedule == "1f1b" else 2 * P
            n_mb = 2 * stages
            r = launch(P, ["pp", schedule, str(a.steps), str(n_mb)])
            step = max(x[0] for x in r["per_rank"])
            busy = max(x[1] for x in r["per_rank"])  # the busiest rank
            F, B, W = (statistics.mean(x[i] for x in r["per_rank"]) for i in (2, 3, 4))
            pred = (stages - 1) * (F + B) if schedule == "1f1b" else (stages / 2 - 1) * (F + B + B - 3 * W)
            print(f"| {P} | {schedule} | {stages} | {n_mb} | {step:.3f} | {busy:.3f} | {step - busy:.3f} | "
                  f"{100 * (step - busy) / step:.0f}% | {pred:.3f} | {1e3 * F:.1f} / {1e3 * B:.1f} / {1e3 * W:.1f} |",
                  flush=True)

    print("\n| EP ranks | measured bytes sent / rank / step | formula (uniform routing) | ratio | step (s) |")
    print("|---|---|---|---|---|")
    for P in [] if a.no_ep else a.procs:
        r = launch(P, ["ep", str(a.steps)])
        print(f"| {P} | {r['bytes_per_rank']:,.0f} | {r['formula']:,.0f} | {r['bytes_per_rank'] / r['formula']:.3f} "
              f"| {r['step_s']:.3f} |", flush=True)

    if a.run:
        from nanoseek import cli

        for gpus, replicas in ((4, 8), (4, 12), (8, 16)):
            print(f"\n$ nanoseek eplb --run {a.run} --gpus {gpus} --replicas {replicas}")
            cli.main(["eplb", "--run", a.run, "--gpus", str(gpus), "--replicas", str(replicas)])


if __name__ == "__main__":
    main()
