"""bench/text_vs_dense.py: the llama peer's size, FLOPs and bits per byte against independent references, the
equal-token interpolation, and (slow) one end-to-end run on a small corpus."""
import importlib.util
import json
import math
import random
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nanoseek.config import ModelConfig
from nanoseek.text.bpb import bits_per_byte, bpb_sums

REPO = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("text_vs_dense", REPO / "bench" / "text_vs_dense.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["text_vs_dense"] = mod  # dataclasses resolve their module while the class is built
    spec.loader.exec_module(mod)
    return mod


bench = _bench()


def test_llama_matches_tiny_activated_params_with_gqa():
    """The llama's parameters (counted on the built model) equal the closed form and tiny's activated count within
    0.1%; it has 2 key-value heads for 4 query heads (GQA) and an untied head."""
    tiny = ModelConfig.preset("tiny", vocab_size=300)
    cfg = bench.llama_config(tiny)
    model = bench.LlamaLM(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert n == bench.llama_params(300, 128, 4, 4, 2, 32, cfg.intermediate_size)
    assert abs(n - tiny.param_counts()["active"]) / tiny.param_counts()["active"] < 1e-3
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (4, 2)
    assert model.hf.lm_head.weight.data_ptr() != model.hf.model.embed_tokens.weight.data_ptr()


def test_llama_flops_count_every_linear_once():
    """6 x (weights of every nn.Linear the model holds; the embedding is a lookup) + the attention term, the
    matmul weights counted from the module tree rather than from the formula."""
    cfg = bench.llama_config(ModelConfig.preset("tiny", vocab_size=300))
    model = bench.LlamaLM(cfg)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    attn = 6 * 4 * 4 * (32 + 32) * (64 + 1) / 2
    assert bench.llama_flops_per_token(cfg, 64) == pytest.approx(6 * linear + attn)


def test_llama_bpb_adapter_equals_hf_logits():
    """bpb_sums through the adapter equals bits per byte computed straight from LlamaForCausalLM's logits."""
    cfg = bench.llama_config(ModelConfig.preset("tiny", vocab_size=300))
    torch.manual_seed(0)
    model = bench.LlamaLM(cfg).eval()
    with torch.no_grad():  # a non-unit final norm gain, so a norm applied twice (or never) shows
        model.hf.model.norm.weight.uniform_(0.5, 2.0)
    x, y = torch.randint(0, 300, (2, 16)), torch.randint(0, 300, (2, 16))
    token_bytes = torch.randint(0, 5, (300,))
    sums = bpb_sums(model, x, y, token_bytes)
    with torch.no_grad():
        logits = model.hf(input_ids=x).logits
    nats = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
    nbytes = token_bytes[y.flatten()]
    want = nats[nbytes > 0].sum().item() / math.log(2) / nbytes.sum().item()
    assert bits_per_byte(sums[0].item(), sums[1].item()) == pytest.approx(want, rel=1e-5)


def test_interpolate_and_summary_at_equal_tokens():
    """Per seed, every arm is read at the fewest tokens any arm reached (linear between evaluation points)."""
    curve_a = [{"tokens": 0, "val_bpb": 4.0}, {"tokens": 100, "val_bpb": 2.0}, {"tokens": 200, "val_bpb": 1.5}]
    curve_b = [{"tokens": 0, "val_bpb": 4.0}, {"tokens": 50, "val_bpb": 3.0}]
    assert bench.interpolate(curve_a, 50) == pytest.approx(3.0)
    assert bench.interpolate(curve_a, 150) == pytest.approx(1.75)
    base = {"tokens_per_s": 1.0, "mfu": 0.1, "train_s": 1.0, "cpu_share": 1.0, "flops_per_token": 1.0,
            "params": {"active": 1, "total": 1}}
    runs = [{**base, "arm": "a", "seed": 0, "tokens": 200, "final_bpb": 1.5, "curve": curve_a},
            {**base, "arm": "b", "seed": 0, "tokens": 50, "final_bpb": 3.0, "curve": curve_b}]
    s = bench.summarize(runs, ["a", "b"])
    assert s["a"]["bpb_at_equal_tokens"] == pytest.approx(3.0) and s["b"]["bpb_at_equal_tokens"] == 3.0
    assert s["a"]["final_bpb"] == 1.5
    assert "| a |" in bench.table(s)


def test_bad_arguments_are_config_errors():
    with pytest.raises(bench.ConfigError, match="unknown arm"):
        bench.parse_args(["--arms", "moe,gpt"])
    with pytest.raises(bench.ConfigError, match="--seeds"):
        bench.parse_args(["--seeds", "0"])
    assert bench.parse_args(["--balance-compare"]).arms == ["moe", "moe-aux", "moe-none"]


@pytest.mark.slow
def test_end_to_end_small_corpus(tmp_path):
    """Every arm trains on the same shards for its budget; results.json holds a curve per run, MaxVio for MoE arms."""
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "class", "import", "self", "value", "(", ")", ":"]
    data = tmp_path / "text"
    data.mkdir()
    for i in range(12):
        (data / f"f{i}.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(300)))
    result = bench.main(["--data", str(data), "--out", str(tmp_path / "out"), "--minutes", "0.01", "--seeds", "1",
                         "--arms", "moe,dense,llama,moe-aux", "--vocab-size", "300", "--batch", "4", "--seq-len", "32",
                         "--evals", "1", "--eval-batches", "1", "--val-share", "0.2", "--threads", "1"])
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["arm"] for r in saved["runs"]] == ["moe", "dense", "llama", "moe-aux"]
    for r in saved["runs"]:
        assert r["steps"] >= 1 and len(r["curve"]) >= 2 and r["curve"][0]["tokens"] == 0
        assert math.isfinite(r["final_bpb"]) and r["final_bpb"] > 0
    assert "max_vio" in result["summary"]["moe"] and "max_vio" not in result["summary"]["dense"]
