"""--precision on sft and rl (nanoseek.train.precision): the run's config records it, the precision is in effect
(losses differ from fp32; fp8 keeps BF16 AdamW moments), an interrupted run resumes exactly in its stored
precision, and a resume told another precision switches to it and rewrites config.json."""
import json

import pytest
import torch
from safetensors.torch import load_file

from nanoseek.corpus import corpus_texts
from nanoseek.tokenizer import Tokenizer
from nanoseek.train import sft as sft_mod
from nanoseek.train.checkpoint import latest_checkpoint
from nanoseek.train.common import TrainConfig
from nanoseek.train.grpo import train_grpo
from nanoseek.train.metrics import read_metrics
from nanoseek.train.sft import SFTConfig, train_sft
from test_grpo_runs import max_diff, rl_cfg, warm_base, weights  # noqa: F401  (warm_base is a fixture)
from test_sft import examples


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft_precision")
    Tokenizer.train(corpus_texts("arithmetic", 300, seed=0), vocab_size=300).save(d / "tokenizer.json")
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in examples(24)))
    return d


def sft_cfg(data, precision: str) -> SFTConfig:
    train = TrainConfig(lr=3e-3, steps=4, batch_size=4, seq_len=48, warmup_steps=1, eval_interval=0,
                        ckpt_interval=2, bias_gamma=1e-3)
    return SFTConfig(data=str(data / "train.jsonl"), preset="tiny", tokenizer=str(data / "tokenizer.json"),
                     train=train, precision=precision)


def final_weights(run) -> dict:
    return load_file(str(latest_checkpoint(run / "checkpoints") / "model.safetensors"))


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_sft_precision_recorded_in_effect_and_resumed_exactly(sft_data, tmp_path, monkeypatch, precision):
    train_sft(tmp_path / "fp32", sft_cfg(sft_data, "fp32"), device="cpu", quiet=True, steps=1)
    train_sft(tmp_path / "full", sft_cfg(sft_data, precision), device="cpu", quiet=True)
    run_cfg = json.loads((tmp_path / "full" / "config.json").read_text())
    assert run_cfg["sft"]["precision"] == precision and run_cfg["model"]["fp8"] == (precision == "fp8")
    full = read_metrics(tmp_path / "full" / "metrics.jsonl")
    assert full[0]["loss"] != read_metrics(tmp_path / "fp32" / "metrics.jsonl")[0]["loss"]  # not fp32 compute
    if precision == "fp8":
        opt = torch.load(latest_checkpoint(tmp_path / "full" / "checkpoints") / "optimizer.pt", weights_only=True)
        assert next(iter(opt["state"].values()))["exp_avg"].dtype == torch.bfloat16

    real, calls = sft_mod.sft_step, []

    def interrupted(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(sft_mod, "sft_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_sft(tmp_path / "cut", sft_cfg(sft_data, precision), device="cpu", quiet=True)
    monkeypatch.setattr(sft_mod, "sft_step", real)
    train_sft(tmp_path / "cut", None, resume=True, device="cpu", quiet=True)  # its stored precision
    got = read_metrics(tmp_path / "cut" / "metrics.jsonl")
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in got] == [(r["step"], r["loss"], r["grad_norm"]) for r in full]
    assert max_diff(final_weights(tmp_path / "full"), final_weights(tmp_path / "cut")) == 0

    train_sft(tmp_path / "cut", None, resume=True, device="cpu", quiet=True, steps=5, precision="fp32")
    run_cfg = json.loads((tmp_path / "cut" / "config.json").read_text())
    assert run_cfg["sft"]["precision"] == "fp32" and run_cfg["model"]["fp8"] is False


def test_rl_precision_recorded_in_effect_and_resumed_exactly(warm_base, tmp_path):  # noqa: F811
    train_grpo(warm_base, tmp_path / "fp32", rl_cfg(steps=1), quiet=True, device="cpu")
    train_grpo(warm_base, tmp_path / "full", rl_cfg(precision="bf16"), quiet=True, device="cpu")
    run_cfg = json.loads((tmp_path / "full" / "config.json").read_text())
    assert run_cfg["rl"]["precision"] == "bf16"
    full = read_metrics(tmp_path / "full" / "metrics.jsonl")
    ref = read_metrics(tmp_path / "fp32" / "metrics.jsonl")
    assert full[0]["reward"] == ref[0]["reward"]  # the same rollouts (they run unautocast) ...
    assert full[0]["loss"] != ref[0]["loss"]  # ... trained under BF16 autocast
    assert full[0]["logp_diff_max"] > 1e-4  # BF16 log-probs differ from the FP32 rollout's

    train_grpo(warm_base, tmp_path / "cut", rl_cfg(precision="bf16", steps=2), quiet=True, device="cpu")
    train_grpo(warm_base, tmp_path / "cut", rl_cfg(steps=4), resume=True, quiet=True, device="cpu")
    got = read_metrics(tmp_path / "cut" / "metrics.jsonl")
    assert [(r["step"], r["reward"], r.get("loss")) for r in got] == [(r["step"], r["reward"], r.get("loss")) for r in full]
    assert max_diff(weights(tmp_path / "full"), weights(tmp_path / "cut")) == 0

    train_grpo(warm_base, tmp_path / "cut", rl_cfg(steps=5), resume=True, quiet=True, device="cpu", precision="fp8")
    run_cfg = json.loads((tmp_path / "cut" / "config.json").read_text())
    assert run_cfg["rl"]["precision"] == "fp8" and run_cfg["model"]["fp8"] is True
    assert [r["step"] for r in read_metrics(tmp_path / "cut" / "metrics.jsonl")] == [1, 2, 3, 4, 5]
