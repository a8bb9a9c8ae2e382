"""Pipeline parallelism (nanoseek.parallel.pipeline) under torchrun with gloo: 10 AdamW steps through each
torch.distributed.pipelining schedule (1F1B, ZB-V, DualPipeV) against the same steps in one process on the whole
batch: losses (main, MTP, balance), the first step's gradients, the clip norm, the final parameters (the last
stage's embedding copy included) and the aux-loss-free gate biases; once with every expert busy and once with
micro-batches so small that some experts get no token (their weights need a zero gradient, not a crash)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanoseek.config import ConfigError
from nanoseek.parallel.pipeline import stage_bounds

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from diffs import small, worst  # noqa: E402
from test_train import env, finish  # noqa: E402

SCHEDULES = ("1f1b", "zbv", "dualpipev")


def worker(out: Path, nproc: int, schedule: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(REPO / "tests" / "pipeline_worker.py"), str(out), schedule, "10"]
    return subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def check(results: dict[str, Path], procs: dict[str, subprocess.Popen], stages: int) -> None:
    for name, p in procs.items():
        finish(p)
        cases = json.loads(results[name].read_text())
        assert sorted(cases) == ["busy", "idle"]
        # the idle case: fewer (token, expert) pairs per micro-batch than experts, so some expert is idle
        assert cases["idle"]["tokens_per_microbatch"] * 2 < cases["idle"]["experts"]
        for case, r in cases.items():
            assert r["steps"] == 10 and r["stages"] == (1 if name == "1f1b" else stages)
            for key in ("loss", "grad", "norm", "param", "bias"):
                assert small(r[key], 1e-5), (name, case, key, r)  # NaN / inf fail


def test_two_processes_every_schedule_matches_one_process(tmp_path):
    results = {s: tmp_path / f"{s}.json" for s in SCHEDULES}
    check(results, {s: worker(results[s], 2, s) for s in SCHEDULES}, stages=2)


@pytest.mark.slow
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_four_processes(tmp_path, schedule):
    out = tmp_path / "r.json"
    check({schedule: out}, {schedule: worker(out, 4, schedule)}, stages=2)


def test_stage_bounds():
    assert stage_bounds(5, 2) == [(0, 3), (3, 5)]
    assert stage_bounds(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    with pytest.raises(ConfigError, match="at least as many layers"):
        stage_bounds(2, 4)


# ---- `nanoseek pretrain --pp` --------------------------------------------------------------------------------
MICRO4 = {"vocab_size": 64, "dim": 32, "inter_dim": 64, "moe_inter_dim": 32, "n_layers": 4, "n_dense_layers": 1,
          "n_heads": 2, "n_routed_experts": 8, "n_shared_experts": 1, "n_activated_experts": 2, "kv_lora_rank": 16,
          "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "max_seq_len": 64,
          "original_seq_len": 64}


def pretrain_args(tmp_path: Path, out: str) -> list[str]:
    cfg = tmp_path / "micro4.json"
    if not cfg.exists():
        cfg.write_text(json.dumps(MICRO4))
    return ["pretrain", "--config", str(cfg), "--out", str(tmp_path / out), "--steps", "10", "--seq-len", "32",
            "--batch-size", "8", "--n-docs", "40", "--n-test-docs", "20", "--warmup", "2", "--lr", "3e-3",
            "--eval-interval", "5", "--ckpt-interval", "5", "--device", "cpu"]


def pp_against_one_process(tmp_path: Path, schedules: list[str], resume_one: bool = False) -> None:
    from test_parallel_ep import max_diff
    from test_train import spawn

    from nanoseek.train.metrics import read_metrics

    procs = {"one": spawn(pretrain_args(tmp_path, "one"))}
    for s in schedules:
        procs[s] = spawn(pretrain_args(tmp_path, s) + ["--pp", "2", "--pp-schedule", s], torchrun=2)
    outs = {name: finish(p)[1] for name, p in procs.items()}
    ref = read_metrics(tmp_path / "one" / "metrics.jsonl")
    for s in schedules:
        assert f"pipeline parallel: {s}, 2 ranks" in outs[s]
        got = read_metrics(tmp_path / s / "metrics.jsonl")
        assert len(got) == 10 and max_diff(ref, got) < 1e-5, s
        if resume_one:  # the pipeline's checkpoint is in the one-process layout
            import shutil

            shutil.rmtree(tmp_path / s / "checkpoints" / "step_10")
            finish(spawn(pretrain_args(tmp_path, s) + ["--resume"]))
            assert max_diff(ref, read_metrics(tmp_path / s / "metrics.jsonl")) < 1e-5, s


@pytest.mark.slow  # the schedules' exactness is in the default suite above; this adds the trainer around them
def test_pretrain_pp2_dualpipev_matches_one_process(tmp_path):
    pp_against_one_process(tmp_path, ["dualpipev"])


@pytest.mark.slow
def test_pretrain_pp2_1f1b_and_zbv_match_one_process_and_resume_in_one_process(tmp_path):
    pp_against_one_process(tmp_path, ["1f1b", "zbv"], resume_one=True)


def test_pp_config_errors(tmp_path, capsys):
    from nanoseek import cli

    assert cli.main(pretrain_args(tmp_path, "bad") + ["--pp", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "torchrun" in err and len(err.splitlines()) == 1


def test_difference_reductions_keep_nan():
    """The equivalence workers reduce differences with diffs.worst: a NaN among them fails the tolerance, where
    Python's max (what they used) drops it when it comes after a number."""
    nan = float("nan")
    assert max(0.0, nan) == 0.0 and max([1e-9, nan]) < 1e-5  # the pitfall
    assert not small(worst([1e-9, nan, 2e-9]), 1e-5) and not small(worst([float("inf")]), 1e-5)
    assert worst([1e-9, torch.tensor([3e-9, 2e-9], dtype=torch.float64)]) == 3e-9 and small(3e-9, 1e-5)
