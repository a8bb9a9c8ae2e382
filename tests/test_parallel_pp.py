"""Pipeline parallelism (nanoseek.parallel.pipeline) under torchrun with gloo: 10 AdamW steps through each
torch.distributed.pipelining schedule (1F1B, ZB-V, DualPipeV) against the same steps in one process on the whole
batch: losses (main, MTP, balance), the first step's gradients, the clip norm, the final parameters (the last
stage's embedding copy included) and the aux-loss-free gate biases."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from nanoseek.config import ConfigError
from nanoseek.parallel.pipeline import stage_bounds

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from test_train import env, finish  # noqa: E402

SCHEDULES = ("1f1b", "zbv", "dualpipev")


def worker(out: Path, nproc: int, schedule: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(REPO / "tests" / "pipeline_worker.py"), str(out), schedule, "10"]
    return subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def check(results: dict[str, Path], procs: dict[str, subprocess.Popen], stages: int) -> None:
    for name, p in procs.items():
        finish(p)
        r = json.loads(results[name].read_text())
        assert r["steps"] == 10 and r["stages"] == (1 if name == "1f1b" else stages)
        for key in ("loss", "grad", "norm", "param", "bias"):
            assert r[key] < 1e-5, (name, key, r)


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
