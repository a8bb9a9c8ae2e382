"""`pretrain --init RUN --sparse-attention warmup|sparse --index-topk K` (V3.2 sec. 2.1.1 as pretraining runs;
nanoseek.train.sparse_attention): the warm-up moves nothing but the indexers (gate biases included), the sparse
stage moves everything, the new run takes RUN's model / tokenizer / data, an interrupted stage resumes to the
same bits as an uninterrupted one, and user mistakes are one-line errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import MICRO, cli_error, finish, spawn

from nanoseek import cli
from nanoseek.config import ConfigError, ModelConfig
from nanoseek.train.checkpoint import latest_checkpoint
from nanoseek.train.metrics import read_metrics
from nanoseek.train.sparse_attention import SparseStageConfig, stage_model

DENSE = {**MICRO, "q_lora_rank": 16}
COMMON = ["--seq-len", "32", "--batch-size", "4", "--n-docs", "40", "--n-test-docs", "20", "--warmup", "2",
          "--eval-interval", "3", "--ckpt-interval", "2", "--keep-last", "2", "--device", "cpu"]


def stage_args(out: Path, init: Path, stage: str, steps: int = 6, topk: int | None = 4) -> list[str]:
    return (["pretrain", "--init", str(init), "--out", str(out), "--sparse-attention", stage, "--steps", str(steps),
             "--lr", "1e-2"] + (["--index-topk", str(topk)] if topk else []) + COMMON[-8:])


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory) -> Path:
    """A 4-step dense MoE run (q_lora_rank 16, MTP 1) on the arithmetic corpus."""
    root = tmp_path_factory.mktemp("dense")
    (root / "model.json").write_text(json.dumps(DENSE))
    assert cli.main(["pretrain", "--config", str(root / "model.json"), "--out", str(root / "run"), "--steps", "4",
                     "--lr", "3e-3"] + COMMON) == 0
    return root / "run"


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(latest_checkpoint(run / "checkpoints") / "model.safetensors"))


def test_warmup_trains_only_indexers_and_sparse_trains_all(dense_run, tmp_path):
    assert cli.main(stage_args(tmp_path / "warm", dense_run, "warmup", steps=3)) == 0
    base, warm = weights(dense_run), weights(tmp_path / "warm")
    idx = [k for k in warm if ".indexer." in k]
    assert idx and set(warm) - set(idx) == set(base)
    assert all(torch.equal(warm[k], base[k]) for k in base)  # main weights and gate biases untouched
    step2 = load_file(str(tmp_path / "warm" / "checkpoints" / "step_2" / "model.safetensors"))
    assert all(not torch.equal(warm[k], step2[k]) for k in idx if "k_norm" not in k)  # the indexers learn
    cfg = json.loads((tmp_path / "warm" / "config.json").read_text())
    assert (cfg["model"]["index_topk"], cfg["model"]["index_n_heads"], cfg["train"]["balance"]) == (4, 4, "none")
    assert (tmp_path / "warm" / "tokenizer.json").read_bytes() == (dense_run / "tokenizer.json").read_bytes()
    log = read_metrics(tmp_path / "warm" / "metrics.jsonl")
    assert all(r["indexer_kl"] > 0 for r in log)

    assert cli.main(stage_args(tmp_path / "sparse", tmp_path / "warm", "sparse", steps=3, topk=None)) == 0
    sparse = weights(tmp_path / "sparse")
    moved = {k for k in warm if not torch.equal(sparse[k], warm[k])}
    assert set(idx) <= moved  # the indexers learn on (their KL over the selected keys)
    assert {k for k in base if k.endswith(".weight") and ".norm" not in k} - moved == set()  # so does the main model
    assert json.loads((tmp_path / "sparse" / "config.json").read_text())["model"]["index_topk"] == 4
    assert all(r["indexer_kl"] > 0 for r in read_metrics(tmp_path / "sparse" / "metrics.jsonl"))


@pytest.mark.parametrize("stage", ["warmup", pytest.param("sparse", marks=pytest.mark.slow)])
def test_kill_and_resume_of_a_stage_is_exact(dense_run, tmp_path, stage):
    """As tests/test_train.py does for pretraining: SIGKILL after step 5 (checkpoint at 4), resume; every logged
    figure and the final weights equal the uninterrupted run's bit for bit."""
    full = spawn(stage_args(tmp_path / "full", dense_run, stage))
    killed = spawn(stage_args(tmp_path / "killed", dense_run, stage), {"NANOSEEK_TEST_KILL_AFTER_STEP": "5"})
    finish(full)
    code, _, _ = finish(killed, ok=False)
    assert code == -9 and latest_checkpoint(tmp_path / "killed" / "checkpoints").name == "step_4"
    _, out, _ = finish(spawn(stage_args(tmp_path / "killed", dense_run, stage) + ["--resume"]))
    assert "resumed from" in out
    ref, got = (read_metrics(tmp_path / r / "metrics.jsonl") for r in ("full", "killed"))
    keys = ("loss", "main", "mtp", "indexer_kl", "grad_norm", "lr", "eval_loss")
    assert [[r.get(k) for k in keys] for r in ref] == [[r.get(k) for k in keys] for r in got]
    assert len(ref) == 6 and all(r["indexer_kl"] > 0 for r in ref)
    a, b = weights(tmp_path / "full"), weights(tmp_path / "killed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_one_line_errors(dense_run, tmp_path, capsys):
    out = ["--out", str(tmp_path / "x")]
    assert "--init" in cli_error(capsys, ["pretrain", "--sparse-attention", "warmup"] + out)
    assert "--index-topk" in cli_error(capsys, ["pretrain", "--init", str(dense_run), "--sparse-attention",
                                                "warmup"] + out)
    assert "--sparse-attention" in cli_error(capsys, ["pretrain", "--init", str(dense_run), "--index-topk", "4"]
                                             + out)
    assert "drop --preset" in cli_error(capsys, ["pretrain", "--init", str(dense_run), "--preset", "tiny"] + out)
    assert "data options" in cli_error(capsys, ["pretrain", "--init", str(dense_run), "--task", "countdown"] + out)
    assert "no config.json" in cli_error(capsys, ["pretrain", "--init", str(tmp_path), "--sparse-attention",
                                                  "warmup", "--index-topk", "4"] + out)
    assert not (tmp_path / "x").exists()


def test_stage_model_rules():
    dense = ModelConfig(**DENSE)
    got = stage_model(dense, SparseStageConfig(init="r", sparse_attention="sparse", index_topk=8, index_head_dim=16))
    assert (got.index_topk, got.index_n_heads, got.index_head_dim) == (8, 4, 16)
    assert stage_model(got, SparseStageConfig(init="r", sparse_attention="sparse")).index_topk == 8
    assert stage_model(got, SparseStageConfig(init="r", sparse_attention="warmup", index_topk=2)).index_topk == 2
    with pytest.raises(ConfigError, match="index-head-dim"):
        stage_model(got, SparseStageConfig(init="r", sparse_attention="sparse", index_head_dim=32))
    with pytest.raises(ConfigError, match="q_lora_rank"):
        stage_model(ModelConfig(**MICRO), SparseStageConfig(init="r", sparse_attention="warmup", index_topk=4))
    assert stage_model(dense, SparseStageConfig(init="r")) is dense


@pytest.mark.slow
def test_two_process_stage_matches_one_process(dense_run, tmp_path):
    """A warm-up stage under torchrun (2 processes, DDP) logs the losses and indexer KL of one process with the
    same global batch."""
    two = spawn(stage_args(tmp_path / "two", dense_run, "warmup", steps=4), torchrun=2)
    finish(spawn(stage_args(tmp_path / "one", dense_run, "warmup", steps=4)))
    finish(two)
    ref, got = (read_metrics(tmp_path / r / "metrics.jsonl") for r in ("one", "two"))
    assert len(got) == 4
    for a, b in zip(ref, got):
        for k in ("loss", "main", "indexer_kl", "grad_norm"):
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), k
