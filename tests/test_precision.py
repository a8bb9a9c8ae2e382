"""Training precisions (nanoseek.train.precision): the BF16-moment AdamW against torch's AdamW, the FP32
islands under BF16 autocast (gate, norms), --precision on pretrain (config, resume keeps it unless told), and
exact save/resume in fp32, bf16 and fp8."""
import argparse
import json

import pytest
import torch
import torch.nn.functional as F
from diffs import worst

from nanoseek.commands import pretrain as pretrain_cmd
from nanoseek.config import ConfigError, ModelConfig
from nanoseek.model import Transformer
from nanoseek.model.moe import Gate
from nanoseek.model.rope import RMSNorm
from nanoseek.train import precision as prec
from nanoseek.train import pretrain as pt
from nanoseek.train.checkpoint import latest_checkpoint, load_checkpoint, read_state
from nanoseek.train.common import TrainConfig, param_groups
from nanoseek.train.metrics import read_metrics

MODEL = {"vocab_size": 64, "dim": 128, "inter_dim": 256, "moe_inter_dim": 128, "n_layers": 2, "n_dense_layers": 1,
         "n_heads": 2, "n_routed_experts": 4, "n_shared_experts": 1, "n_activated_experts": 2, "kv_lora_rank": 64,
         "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "max_seq_len": 64, "original_seq_len": 64}


def test_adamw_with_fp32_moments_equals_torch_adamw_and_bf16_moments_are_bf16():
    torch.manual_seed(0)
    ref = Transformer(ModelConfig(**MODEL))
    ours = Transformer(ModelConfig(**MODEL))
    ours.load_state_dict(ref.state_dict())
    bf16 = Transformer(ModelConfig(**MODEL))
    bf16.load_state_dict(ref.state_dict())
    kw = {"lr": 3e-3, "betas": (0.9, 0.95), "eps": 1e-8}
    opts = [torch.optim.AdamW(param_groups(ref, 0.1), foreach=False, **kw),
            prec.AdamW(param_groups(ours, 0.1), state_dtype=torch.float32, **kw),
            prec.AdamW(param_groups(bf16, 0.1), **kw)]
    ids = torch.randint(0, 64, (2, 17))
    for _ in range(4):
        for m, o in zip((ref, ours, bf16), opts):
            m.logits(m.hidden(ids[:, :-1])).logsumexp(-1).mean().backward()
            o.step()
            o.zero_grad()
    for (n, a), b, c in zip(ref.named_parameters(), ours.parameters(), bf16.parameters()):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7), n
    diff = worst((a - c).abs() for a, c in zip(ref.parameters(), bf16.parameters()))  # NaN propagates
    assert 0 < diff < 3e-3 * 4  # BF16 moments round, but each step still moves by about lr
    st = next(iter(opts[2].state.values()))
    assert st["exp_avg"].dtype == torch.bfloat16 and st["exp_avg_sq"].dtype == torch.bfloat16


def test_gate_and_norms_stay_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    cfg = ModelConfig(**MODEL, n_expert_groups=2, n_limited_groups=1)
    gate = Gate(cfg)
    torch.nn.init.normal_(gate.weight, std=0.5)
    x = torch.randn(32, 128)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w, i, s = gate(x)
    w0, i0, s0 = gate(x)
    assert s.dtype == torch.float32 and torch.equal(s, s0) and torch.equal(i, i0)
    norm = RMSNorm(128)
    xb = (torch.randn(4, 128) * 30).bfloat16()
    assert torch.equal(norm(xb), F.rms_norm(xb.float(), (128,), norm.weight, 1e-6).bfloat16())


def test_bf16_forward_runs_matmuls_in_bf16_with_fp32_losses():
    torch.manual_seed(0)
    m = Transformer(ModelConfig(**MODEL))
    ids = torch.randint(0, 64, (2, 16))
    with prec.autocast("bf16"):
        logits, parts = m(ids[:, :-1], ids[:, 1:])
        inner = m.layers[0].attn.wq(torch.randn(1, 2, 128))
    assert inner.dtype == torch.bfloat16 and logits.dtype == torch.float32 and parts.main.dtype == torch.float32
    with torch.no_grad():
        ref = m(ids[:, :-1], ids[:, 1:])[1].main
    assert 0 < abs(parts.main.item() - ref.item()) < 0.02


def test_unknown_precision_is_a_config_error():
    with pytest.raises(ConfigError, match="precision"):
        pt.PretrainConfig(precision="fp4")


def cli_args(out, **kw) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    pretrain_cmd.add_arguments(p)
    argv = ["--out", str(out)] + [a for k, v in kw.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    return p.parse_args([a for a in argv if a != "True"])


def run_cfg(tmp_path, precision: str, steps: int = 5) -> pt.PretrainConfig:
    return pt.PretrainConfig(
        model=ModelConfig(**MODEL),
        train=TrainConfig(steps=steps, seq_len=32, batch_size=4, warmup_steps=1, lr=3e-3, eval_interval=2,
                          eval_batches=2, ckpt_interval=2, keep_last=5),
        data=pt.DataConfig(n_docs=40, n_test_docs=20), precision=precision)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp8"])
def test_save_and_resume_are_exact_in_each_precision(tmp_path, monkeypatch, precision):
    """A run interrupted after step 3 (checkpoint at step 2) and resumed ends with the same metrics, weights,
    expert biases and optimizer moments (dtype included) as the run that was never stopped."""
    full = pt.pretrain(tmp_path / "full", run_cfg(tmp_path, precision), device="cpu")
    real, calls = pt.train_step, []

    def interrupted(*a, **kw):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(pt, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pt.pretrain(tmp_path / "cut", run_cfg(tmp_path, precision), device="cpu")
    assert latest_checkpoint(tmp_path / "cut" / "checkpoints").name == "step_2"
    monkeypatch.setattr(pt, "train_step", real)
    cfg = pt.PretrainConfig.load(tmp_path / "cut")
    assert cfg.precision == precision and cfg.model.fp8 == (precision == "fp8")
    resumed = pt.pretrain(tmp_path / "cut", cfg, resume=True, device="cpu")
    assert resumed["step"] == full["step"] == 5
    assert read_metrics(tmp_path / "full" / "metrics.jsonl") == [
        {**r, "elapsed_s": a["elapsed_s"], "tokens_per_s": a["tokens_per_s"], "mfu": a["mfu"]}
        for r, a in zip(read_metrics(tmp_path / "cut" / "metrics.jsonl"), read_metrics(tmp_path / "full" / "metrics.jsonl"))]
    models, opts = [], []
    for run in ("full", "cut"):
        m = Transformer(prec.model_config(cfg.model, precision))
        o = prec.build_optimizer(m, cfg.train, precision)
        load_checkpoint(tmp_path / run / "checkpoints" / "step_5", m, o)
        models.append(m.state_dict())
        opts.append(o.state_dict()["state"])
    assert models[0].keys() == models[1].keys() and all(torch.equal(models[0][k], models[1][k]) for k in models[0])
    moment = torch.bfloat16 if precision == "fp8" else torch.float32
    for sa, sb in zip(opts[0].values(), opts[1].values()):
        assert sa["exp_avg"].dtype == moment and torch.equal(sa["exp_avg"], sb["exp_avg"])
        assert torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])


def test_resume_keeps_the_precision_unless_told(tmp_path):
    out = tmp_path / "run"
    pt.pretrain(out, run_cfg(tmp_path, "fp8", steps=2), device="cpu")
    assert json.loads((out / "config.json").read_text())["precision"] == "fp8"
    assert pretrain_cmd.resolve_config(cli_args(out, resume=True)).precision == "fp8"
    cfg = pretrain_cmd.resolve_config(cli_args(out, resume=True, precision="bf16", steps=3))
    assert cfg.precision == "bf16"
    pt.pretrain(out, cfg, resume=True, device="cpu")  # an fp8 checkpoint (BF16 moments) continues in bf16
    saved = json.loads((out / "config.json").read_text())
    assert saved["precision"] == "bf16" and saved["model"]["fp8"] is False
    assert read_state(latest_checkpoint(out / "checkpoints"))["step"] == 3
    assert pretrain_cmd.resolve_config(cli_args(out, resume=True)).precision == "bf16"
    fresh = pretrain_cmd.resolve_config(cli_args(tmp_path / "new", precision="bf16"))
    assert fresh.precision == "bf16"
