"""Expert parallelism (nanoseek.parallel.expert_parallel) against one process, under torchrun with gloo:
gradients and the optimizer step equal after one step (with and without EPLB-placed redundant experts), whole
`nanoseek pretrain --ep 2` runs give the one-process losses over 10 steps, and their checkpoints (single-model
layout) resume with --ep 1 and with redundant experts placed from the recorded loads."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanoseek import cli
from nanoseek.config import ConfigError
from nanoseek.parallel.expert_parallel import plan_experts
from nanoseek.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from diffs import small, worst  # noqa: E402
from test_train import env, finish, spawn  # noqa: E402

TOL = 1e-5  # the bound on loss differences; gradients are held to the same
MICRO = {"vocab_size": 64, "dim": 32, "inter_dim": 64, "moe_inter_dim": 32, "n_layers": 3, "n_dense_layers": 1,
         "n_heads": 2, "n_routed_experts": 8, "n_shared_experts": 1, "n_activated_experts": 2, "kv_lora_rank": 16,
         "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "max_seq_len": 64, "original_seq_len": 64}


def worker(out: Path, nproc: int, ep: int, redundant: int = 0) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(REPO / "tests" / "parallel_worker.py"), str(out), str(ep), str(redundant)]
    return subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def check_worker(p: subprocess.Popen, out: Path) -> dict:
    finish(p)
    r = json.loads(out.read_text())
    assert all(small(r[k], TOL) for k in ("grad", "param", "norm", "gathered")), r  # NaN / inf fail
    return r


def test_one_step_gradients_equal_one_process_with_and_without_redundant_experts(tmp_path):
    plain = worker(tmp_path / "plain.json", 2, 2)
    redundant = worker(tmp_path / "redundant.json", 2, 2, redundant=6)
    r = check_worker(plain, tmp_path / "plain.json")
    assert r["local_experts"] == [4, 4, 4]  # 8 experts, half on each rank, in every MoE layer (MTP's included)
    r = check_worker(redundant, tmp_path / "redundant.json")
    assert r["local_experts"] == [7, 7, 7]  # 14 physical experts: EPLB replicated the heavy ones


@pytest.mark.slow
@pytest.mark.parametrize("ep,redundant", [(2, 0), (2, 4), (4, 4)])
def test_four_processes_dp_times_ep(tmp_path, ep, redundant):
    """dp 2 x ep 2 (and ep 4): the expert gradient sum runs over replicas and data-parallel copies at once."""
    check_worker(worker(tmp_path / "r.json", 4, ep, redundant), tmp_path / "r.json")


def pretrain_args(tmp_path: Path, out: str, steps: int = 10) -> list[str]:
    cfg = tmp_path / "micro.json"
    if not cfg.exists():
        cfg.write_text(json.dumps(MICRO))
    return ["pretrain", "--config", str(cfg), "--out", str(tmp_path / out), "--steps", str(steps),
            "--seq-len", "32", "--batch-size", "8", "--n-docs", "40", "--n-test-docs", "20", "--warmup", "2",
            "--lr", "3e-3", "--eval-interval", "5", "--ckpt-interval", "5", "--keep-last", "2", "--device", "cpu"]


KEYS = ("loss", "main", "mtp", "balance", "grad_norm", "eval_loss")


def max_diff(a: list[dict], b: list[dict]) -> float:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    return worst(abs(ra[k] - rb[k]) for ra, rb in zip(a, b) for k in KEYS if k in ra)  # NaN propagates


def run_one_and_ep(tmp_path: Path, ep_flags: list[str]) -> tuple[list[dict], str]:
    one = spawn(pretrain_args(tmp_path, "one"))
    ep = spawn(pretrain_args(tmp_path, "ep") + ep_flags, torchrun=2)
    finish(one)
    _, out, _ = finish(ep)
    ref = read_metrics(tmp_path / "one" / "metrics.jsonl")
    got = read_metrics(tmp_path / "ep" / "metrics.jsonl")
    assert len(ref) == 10 and max_diff(ref, got) < TOL
    assert [r["expert_load"] for r in ref] == [r["expert_load"] for r in got]  # same routing, same bias updates
    return ref, out


def restart_from_step_5(tmp_path: Path, name: str, flags: list[str], torchrun: int = 0) -> tuple[list[dict], str]:
    """Copy the EP run, drop its step-10 checkpoint and resume it (metrics are cut back to step 5)."""
    shutil.copytree(tmp_path / "ep", tmp_path / name)
    shutil.rmtree(tmp_path / name / "checkpoints" / "step_10")
    _, out, _ = finish(spawn(pretrain_args(tmp_path, name) + ["--resume"] + flags, torchrun=torchrun))
    return read_metrics(tmp_path / name / "metrics.jsonl"), out


def test_pretrain_ep2_matches_one_process_and_resumes_with_ep1(tmp_path):
    ref, out = run_one_and_ep(tmp_path, ["--ep", "2"])
    assert "expert parallel: ep 2 x dp 1, 8 physical experts per MoE layer, 4 on each rank" in out
    # the EP checkpoint is in the one-process layout: one process continues it from step 5
    got, _ = restart_from_step_5(tmp_path, "to_ep1", [])
    assert max_diff(ref, got) < TOL


@pytest.mark.slow
def test_pretrain_resumes_with_redundant_experts_placed_from_recorded_loads(tmp_path):
    ref, _ = run_one_and_ep(tmp_path, ["--ep", "2", "--ep-redundant", "2"])
    got, out = restart_from_step_5(tmp_path, "to_redundant", ["--ep", "2", "--ep-redundant", "4"], torchrun=2)
    assert "12 physical experts per MoE layer (4 redundant)" in out
    assert max_diff(ref, got) < TOL


def test_plan_errors_and_ep_without_torchrun(tmp_path, capsys):
    with pytest.raises(ConfigError, match="multiple of --ep"):
        plan_experts(torch.ones(2, 8), 3, 1, 2)
    assert plan_experts(torch.ones(2, 8), 0, 1, 2).tolist() == [list(range(8))] * 2
    assert cli.main(pretrain_args(tmp_path, "bad", steps=1) + ["--ep", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "torchrun" in err and len(err.splitlines()) == 1
