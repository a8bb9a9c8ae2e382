"""Parallelism bench (docs/parallel.md): pipeline schedules' bubble against the DualPipe README's bubble formulas,
EP all-to-all bytes per step against the formula, and EPLB's before/after GPU balance of a run.

    flock /tmp/nanoseek-bench.lock python bench/parallel.py [--procs 2 4] [--steps 30] [--run runs/base]

Pipeline: per process count P one torchrun job builds a small MoE model three times, one Pipeline per schedule
(1F1B: P stages; ZB-V and DualPipeV: 2P stages, two per rank in a V), M = 2 micro-batches per stage, and runs
the three schedules interleaved step by step (the order rotates every step), so that all three see the same
machine load. Every compute action is timed inside the action (`ActionTimer`: the stage's forward, full or
input-only backward, weight backward, and the loss); per rank and step, busy = the sum of those durations,
bubble = step wall time - busy (waiting on a neighbour, gloo send/recv and schedule bookkeeping), and the table
shows medians over steps, averaged over ranks. A loaded machine stretches busy and step time alike, so the
bubble FRACTION is the robust figure; "CPU / wall in actions" (thread CPU time over wall time inside the
actions) shows how much of a core the ranks got while computing. The README's bubbles use the measured
per-chunk F, B (a full backward chunk; ZB-V splits every backward, so there input + weight part) and W (B
times the weight share W / (I + W) of the split actions: a split backward costs more than a full one here,
"split I+W / full B"): 1F1B (PP-1)(F+B) with PP = P;
DualPipeV, DualPipe cut in half, (PP/2-1)(F&B+B-3W) with PP = 2P stages and F&B = F + B (nothing overlaps on
CPU); ZB-V has no row in that table. With P = 4 on a 2-core machine the processes time-share cores.
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


class ActionTimer:
    """Wall and thread-CPU seconds of every compute action a pipeline schedule runs on this rank, measured inside
    the action: the stage's forward_one_chunk (F), backward_one_chunk (B: full backward; I: input-only, the
    zero-bubble schedules' split), backward_weight_one_chunk (W) and the schedule's loss (L, last stage).
    Everything else in a step (waiting on a neighbour, gloo send/recv, schedule bookkeeping) is bubble."""

    def __init__(self, pipe):
        self.events: list[tuple[str, float, float]] = []
        for st in pipe.stages:
            st.forward_one_chunk = self._wrap(st.forward_one_chunk, lambda a, k: "F")
            st.backward_one_chunk = self._wrap(st.backward_one_chunk,
                                               lambda a, k: "B" if k.get("full_backward", True) else "I")
            st.backward_weight_one_chunk = self._wrap(st.backward_weight_one_chunk, lambda a, k: "W")
        pipe.schedule._maybe_compute_loss = self._wrap(pipe.schedule._maybe_compute_loss, lambda a, k: "L")

    def _wrap(self, fn, kind):
        def timed(*args, **kwargs):
            t0, c0 = time.perf_counter(), time.thread_time()
            out = fn(*args, **kwargs)
            self.events.append((kind(args, kwargs), time.perf_counter() - t0, time.thread_time() - c0))
            return out
        return timed

    def take(self) -> list[tuple[str, float, float]]:
        ev, self.events = self.events, []
        return ev


def pp_worker(steps: int, out: str) -> None:
    """All three schedules in one job, interleaved step by step (the order rotates every step), so that each
    sees the same machine load. Per step and rank: wall time of the schedule's step, busy = sum of its compute
    actions' wall times, the actions' own durations (F, B, I, W) and their thread-CPU times."""
    import torch.distributed as dist

    from nanoseek.parallel.pipeline import SCHEDULES, Pipeline

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    P = dist.get_world_size()
    pipes = {}
    for schedule in SCHEDULES:
        torch.manual_seed(0)
        model = Transformer(ModelConfig(**MODEL).validate())
        n_mb = 2 * (P if schedule == "1f1b" else 2 * P)
        pipe = Pipeline(model, schedule, n_mb, TCFG.mtp_lambda, TCFG.balance_alpha, torch.device("cpu"))
        pipes[schedule] = (pipe, ActionTimer(pipe), n_mb)
    g = torch.Generator().manual_seed(1)
    rec: dict[str, list] = {s: [] for s in pipes}
    for step in range(steps + 1):  # step 0: warm-up (shape inference), not recorded
        order = list(SCHEDULES[step % 3:] + SCHEDULES[:step % 3])
        for schedule in order:
            pipe, timer, n_mb = pipes[schedule]
            ids = torch.randint(0, MODEL["vocab_size"], (MB_ROWS * n_mb, SEQ + 1), generator=g)
            dist.barrier()
            timer.take()
            t0 = time.perf_counter()
            pipe.step(ids[:, :-1], ids[:, 1:])
            wall = time.perf_counter() - t0
            ev = timer.take()
            for p in pipe.parameters():
                p.grad = None  # timing only: no optimizer step, the weights stay the same
            if step:
                rec[schedule].append({"wall": wall, "busy": sum(e[1] for e in ev), "busy_cpu": sum(e[2] for e in ev),
                                      **{k: [e[1] for e in ev if e[0] == k] for k in "FBIWL"}})
    parts = [None] * P
    dist.all_gather_object(parts, rec)
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps({"per_rank": parts, "n_mb": {s: pipes[s][2] for s in pipes}}))
    dist.destroy_process_group()


def bubble_rows(r: dict, P: int) -> list[dict]:
    """Per schedule: medians over steps (then the mean over ranks) of step wall time, busy time, bubble and
    bubble fraction; F / B / W per chunk (medians over all actions of all ranks); the README bubble."""
    rows = []
    for schedule, n_mb in r["n_mb"].items():
        steps = [st for rank in r["per_rank"] for st in rank[schedule]]
        per_rank = r["per_rank"]

        def rank_median(fn):
            return statistics.mean(statistics.median(fn(st) for st in rank[schedule]) for rank in per_rank)

        wall = rank_median(lambda st: st["wall"])
        busy = rank_median(lambda st: st["busy"])
        frac = rank_median(lambda st: 1 - st["busy"] / st["wall"])
        cpu_share = rank_median(lambda st: st["busy_cpu"] / st["busy"])

        def med(k):
            xs = [x for st in steps for x in st[k]]
            return statistics.median(xs) if xs else 0.0

        # B: a full backward chunk (the README's B); ZB-V splits every backward, so there it is I + W. W: the
        # weight share W / (I + W) of the split actions times B (on CPU a split backward costs more than a
        # full one, so the raw W of a split action overstates the README's W, which assumes I + W = B)
        F, B_in, W_split = med("F"), med("I"), med("W")
        full = any(st["B"] for st in steps)
        B = med("B") if full else B_in + W_split
        W = B * W_split / (B_in + W_split) if B_in + W_split > 0 else 0.0
        split_cost = (B_in + W_split) / B if full and B_in + W_split > 0 else None
        if schedule == "1f1b":
            pred, formula = (P - 1) * (F + B), "(PP-1)(F+B)"
        elif schedule == "dualpipev":  # DualPipeV on P ranks = DualPipe cut in half: PP = 2P, F&B = F + B on CPU
            pred, formula = (2 * P / 2 - 1) * (F + B + B - 3 * W), "(PP/2-1)(F&B+B-3W)"
        else:
            pred, formula = None, "no README row"
        counts = "/".join(str(round(statistics.mean(len(st[k]) for st in steps))) for k in "FBIW")
        rows.append({"counts": counts, "schedule": schedule, "n_mb": n_mb, "wall": wall, "busy": busy, "bubble": wall - busy,
                     "frac": frac, "pred": pred, "pred_frac": None if pred is None else pred / (pred + busy),
                     "formula": formula, "F": F, "B": B, "W": W, "split_cost": split_cost, "cpu_share": cpu_share, "n_steps": len(steps) // P})
    return rows


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
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--run", help="a run directory for the EPLB table (nanoseek eplb)")
    ap.add_argument("--no-ep", action="store_true", help="skip the EP bytes table")
    ap.add_argument("--no-pp", action="store_true", help="skip the pipeline table")
    ap.add_argument("--save", help="write the raw per-rank pipeline timings to SAVE_p<P>.json")
    a = ap.parse_args()
    if a.worker:
        kind, *rest = a.worker
        if kind == "pp":
            pp_worker(int(rest[0]), a.out)
        else:
            ep_worker(int(rest[0]), a.out)
        return

    print(f"model: {MODEL['n_layers']} layers, dim {MODEL['dim']}, {MODEL['n_routed_experts']} experts top-"
          f"{MODEL['n_activated_experts']}, micro-batch {MB_ROWS} x {SEQ} tokens, gloo on CPU, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start; medians of {a.steps} steps")
    names = {"1f1b": "1F1B", "zbv": "ZB-V", "dualpipev": "DualPipeV"}
    print("\n| P | schedule | M | steps | step (s) | busy (s) | bubble (s) | bubble % | README bubble (s) "
          "| README % | F / B / W per chunk (ms) | actions F/B/I/W per rank | split I+W / full B "
          "| CPU / wall in actions |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for P in [] if a.no_pp else a.procs:
        r = launch(P, ["pp", str(a.steps)])
        if a.save:
            Path(f"{a.save}_p{P}.json").write_text(json.dumps(r))
        for x in bubble_rows(r, P):
            pred = "n/a" if x["pred"] is None else f"{x['pred']:.3f} {x['formula']}"
            pfrac = "n/a" if x["pred_frac"] is None else f"{100 * x['pred_frac']:.0f}%"
            split = "n/a" if x["split_cost"] is None else f"{x['split_cost']:.2f}"
            print(f"| {P} | {names[x['schedule']]} | {x['n_mb']} | {x['n_steps']} | {x['wall']:.3f} | {x['busy']:.3f} "
                  f"| {x['bubble']:.3f} | {100 * x['frac']:.0f}% | {pred} | {pfrac} | {1e3 * x['F']:.1f} / "
                  f"{1e3 * x['B']:.1f} / {1e3 * x['W']:.1f} | {x['counts']} | {split} | {x['cpu_share']:.2f} |", flush=True)

    print("\n| EP ranks | measured bytes sent / rank / step | formula (uniform routing) | ratio | step (s) |")
    print("|---|---|---|---|---|")
    for P in [] if a.no_ep else a.procs:
        r = launch(P, ["ep", str(a.steps)])
        print(f"| {P} | {r['bytes_per_rank']:,.0f} | {r['formula']:,.0f} | {r['bytes_per_rank'] / r['formula']:.3f} "
              f"| {r['step_s']:.3f} |", flush=True)

    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")
    if a.run:
        from nanoseek import cli

        for gpus, replicas in ((4, 8), (4, 12), (8, 16)):
            print(f"\n$ nanoseek eplb --run {a.run} --gpus {gpus} --replicas {replicas}")
            cli.main(["eplb", "--run", a.run, "--gpus", str(gpus), "--replicas", str(replicas)])


if __name__ == "__main__":
    main()
