"""torch.compile of the training path (Transformer.compile_training, --compile): equal to eager to float rounding.

The compiled tests trace and build C++ kernels (tens of seconds on 2 cores, more with a cold inductor cache), so
they are marked slow; the real-valued RoPE, the flag checks and one traced (dynamo, "eager" backend) forward +
backward against eager are default tests."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from nanoseek.config import ConfigError, ModelConfig
from nanoseek.model import Transformer
from nanoseek.model.rope import apply_rope_complex, apply_rope_real
from nanoseek.train.common import enable_compile
from tests.test_train import finish, pretrain_args, spawn
from nanoseek.train.metrics import read_metrics


@pytest.mark.parametrize("shape", [(3, 7, 4, 16), (2, 5, 8)])
def test_real_rope_equals_the_complex_one_forward_and_gradient(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, requires_grad=True)
    angles = torch.randn(shape[0], shape[1], shape[-1] // 2, generator=g)
    cos, sin = angles.cos(), angles.sin()
    a, b = apply_rope_real(x, cos, sin), apply_rope_complex(x, cos, sin)
    # an independent reference: rotate each pair with an explicit 2x2 rotation matrix
    pairs = x.detach().unflatten(-1, (-1, 2))
    c, s = (cos, sin) if x.dim() == 3 else (cos[:, :, None], sin[:, :, None])
    rot = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)  # (..., d/2, 2, 2)
    ref = (rot @ pairs.unsqueeze(-1)).squeeze(-1).flatten(-2)
    torch.testing.assert_close(a, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(b, ref, rtol=1e-6, atol=1e-6)
    gy = torch.randn(a.shape, generator=g)
    ga, = torch.autograd.grad(a, x, gy)
    gb, = torch.autograd.grad(b, x, gy)
    torch.testing.assert_close(ga, gb, rtol=1e-6, atol=1e-6)


def test_compile_flag_refuses_unsupported_combinations():
    model = Transformer(ModelConfig.preset("tiny", vocab_size=64))
    for kw in ({"ep": 2}, {"pp": 2}, {"precision": "fp8"}):
        with pytest.raises(ConfigError, match="--compile"):
            enable_compile(model, True, **kw)
    enable_compile(model, False, ep=2)  # off: nothing to check
    assert not any(getattr(m, "compiled", False) for m in model.modules())


def test_compile_refusals_come_before_any_write(tmp_path, monkeypatch, capsys):
    """--compile with fp8 / --ep / --pp is one clear line before the run directory exists (it used to come after
    config.json and tokenizer.json were written); an SFT resume in fp8 leaves config.json as it was."""
    from nanoseek import cli
    from nanoseek.commands import pretrain as pretrain_cmd
    from nanoseek.corpus import corpus_texts
    from nanoseek.train.common import Dist
    from tests.tiny_runs import write_tiny_run

    def refused(argv: list[str], out) -> None:
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "--compile" in err and len(err.splitlines()) == 1, err
        assert not out.exists(), sorted(out.rglob("*"))

    refused(pretrain_args(tmp_path, "fp8") + ["--precision", "fp8", "--compile"], tmp_path / "fp8")
    base = write_tiny_run(tmp_path / "base", corpus_texts("arithmetic", 100, seed=0))
    refused(["rl", "--init", str(base), "--out", str(tmp_path / "rl"), "--precision", "fp8", "--compile"],
            tmp_path / "rl")
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=", "completion": "2"}) + "\n")
    sft = ["sft", "--init", str(base), "--data", str(data), "--out", str(tmp_path / "sft"), "--steps", "1",
           "--batch-size", "1", "--seq-len", "32"]
    refused(sft + ["--precision", "fp8", "--compile"], tmp_path / "sft")
    assert cli.main(sft) == 0
    stored = (tmp_path / "sft" / "config.json").read_bytes()
    assert cli.main(["sft", "--out", str(tmp_path / "sft"), "--resume", "--steps", "2", "--precision", "fp8",
                     "--compile"]) == 2
    assert "--compile" in capsys.readouterr().err
    assert (tmp_path / "sft" / "config.json").read_bytes() == stored
    # two processes (as under torchrun): --ep 2 / --pp 2 with --compile
    monkeypatch.setattr(pretrain_cmd, "setup_distributed", lambda device: Dist(rank=0, world=2))
    for flags in (["--ep", "2"], ["--pp", "2"]):
        refused(pretrain_args(tmp_path, "par") + flags + ["--compile"], tmp_path / "par")


def _loss_and_grads(model, ids, targets=None, positions=None, mask=None):
    model.zero_grad(set_to_none=True)
    if mask is None:
        _, parts = model(ids, targets)
        loss = parts.main + 0.3 * parts.mtp + 1e-2 * parts.balance
    else:  # the GRPO update's packed forward: explicit positions and a boolean mask
        loss = model.logits(model.hidden(ids, positions, mask)).logsumexp(-1).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_compiled_trace_equals_eager_fast(monkeypatch):
    """The default suite's compiled-vs-eager check (the inductor ones below are slow: minutes of C++ builds on
    2 cores): one forward + backward of a dense and a MoE block through torch.compile's trace with the "eager"
    backend (dynamo captures the graphs, breaking at the MoE dispatch, and runs them as captured), so the
    code paths that exist only under compile (`is_compiling()` branches such as the real-valued RoPE, guards on
    dynamic shapes) must give eager's loss and gradients. Inductor's own kernels are the slow tests' part."""
    import torch._dynamo

    from nanoseek.model import transformer

    torch._dynamo.reset()
    traced = torch.compile(transformer._block_train_forward, dynamic=True, backend="eager")
    monkeypatch.setattr(transformer, "_compiled_block", lambda: traced)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, dim=32, inter_dim=64, moe_inter_dim=32, n_layers=2, n_dense_layers=1,
                      n_heads=2, n_routed_experts=4, n_activated_experts=2, kv_lora_rank=16, qk_nope_head_dim=8,
                      qk_rope_head_dim=8, v_head_dim=8, max_seq_len=64, original_seq_len=64, n_mtp=0).validate()
    eager = Transformer(cfg).train()
    compiled = copy.deepcopy(eager)
    compiled.compile_training()
    torch._dynamo.utils.counters.clear()
    s = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(0))
    try:
        la, ga = _loss_and_grads(eager, s[:, :-1], s[:, 1:])
        lb, gb = _loss_and_grads(compiled, s[:, :-1], s[:, 1:])
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # the traced path really ran
    finally:
        torch._dynamo.reset()
    assert set(ga) == set(gb) and len(ga) > 10
    torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-6)
    for k in ga:
        torch.testing.assert_close(gb[k], ga[k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.slow
def test_compiled_training_forward_and_backward_equal_eager():
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = Transformer(ModelConfig.preset("tiny", vocab_size=64, n_mtp=1)).train()
    compiled = copy.deepcopy(eager)
    compiled.compile_training()
    torch._dynamo.utils.counters.clear()
    g = torch.Generator().manual_seed(0)
    cases = []
    for B, T in [(4, 32), (3, 21)]:  # a second shape: dynamic shapes, no wrong reuse of the first graph
        s = torch.randint(0, 64, (B, T + 1), generator=g)
        cases.append({"ids": s[:, :-1], "targets": s[:, 1:]})
    R, N = 2, 19
    mask = (torch.rand(R, 1, N, N, generator=g) < 0.5) | torch.eye(N, dtype=torch.bool)
    cases.append({"ids": torch.randint(0, 64, (R, N), generator=g), "positions": torch.randint(0, 40, (R, N), generator=g),
                  "mask": mask})
    for case in cases:
        la, ga = _loss_and_grads(eager, **case)
        lb, gb = _loss_and_grads(compiled, **case)
        assert set(ga) == set(gb)
        torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-6)
        for k in ga:
            scale = ga[k].abs().max().item() + 1e-12
            assert (ga[k] - gb[k]).abs().max().item() <= 1e-5 * scale, k
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # the compiled path really ran
    for a, b in zip(eager.moe_layers(), compiled.moe_layers()):  # loads (the bias update's input) identical
        assert torch.equal(a.load_accum, b.load_accum)
    with torch.no_grad():  # no-grad forwards (decode, scoring) stay eager and equal
        ids = cases[0]["ids"]
        torch.testing.assert_close(compiled(ids), eager(ids), rtol=0, atol=0)


@pytest.mark.slow
def test_pretrain_with_compile_resumes_and_matches_eager(tmp_path):
    eager = spawn(pretrain_args(tmp_path, "eager", steps=6))
    comp = spawn(pretrain_args(tmp_path, "comp", steps=6) + ["--compile"], {"NANOSEEK_TEST_KILL_AFTER_STEP": "4"})
    finish(eager)
    code, out, _ = finish(comp, ok=False)
    assert code == -9  # SIGKILLed after step 4 (checkpointed)
    assert json.loads((tmp_path / "comp" / "config.json").read_text())["train"]["compile"] is True
    _, out, _ = finish(spawn(pretrain_args(tmp_path, "comp", steps=6) + ["--resume"]))
    assert "resumed from" in out and "torch.compile on" in out  # the stored choice holds on resume
    ref, got = read_metrics(tmp_path / "eager" / "metrics.jsonl"), read_metrics(tmp_path / "comp" / "metrics.jsonl")
    assert [r["step"] for r in got] == [r["step"] for r in ref] == list(range(1, 7))
    for a, b in zip(ref, got):
        for k in ("loss", "main", "mtp", "grad_norm"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (a["step"], k)
