"""Serving-cost model: closed-form values, published parameter counts, a Monte Carlo check and the CLI."""
from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np
import pytest

from nanoseek.commands import cost as cost_cmd
from nanoseek.config import ConfigError, ModelConfig
from nanoseek.tokenomics import (
    CostModel,
    GPUSpec,
    Scenario,
    TCOInputs,
    compare,
    cost_per_answer,
    evaluate,
    expected_distinct_experts,
    from_hf_config,
    load_model,
    memory_plan,
    sweep,
    tco_per_gpu_hour,
)

H200_V3 = Scenario(gpu="h200", gpus=8, context=32768, batch=64)

# The released config.json files (shape fields) of DeepSeek-V3, DeepSeek-V2-Lite and Llama-3-8B.
V3_HF = {"model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
         "moe_intermediate_size": 2048, "num_hidden_layers": 61, "first_k_dense_replace": 3,
         "num_attention_heads": 128, "num_key_value_heads": 128, "n_routed_experts": 256, "n_shared_experts": 1,
         "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4, "q_lora_rank": 1536, "kv_lora_rank": 512,
         "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "num_nextn_predict_layers": 1,
         "scoring_func": "sigmoid", "moe_layer_freq": 1, "max_position_embeddings": 163840}
V2_LITE_HF = {"model_type": "deepseek_v2", "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944,
              "moe_intermediate_size": 1408, "num_hidden_layers": 27, "first_k_dense_replace": 1,
              "num_attention_heads": 16, "num_key_value_heads": 16, "n_routed_experts": 64, "n_shared_experts": 2,
              "num_experts_per_tok": 6, "n_group": 1, "topk_group": 1, "q_lora_rank": None, "kv_lora_rank": 512,
              "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "scoring_func": "softmax",
              "topk_method": "greedy", "norm_topk_prob": False, "moe_layer_freq": 1,
              "rope_scaling": {"type": "yarn", "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                               "original_max_position_embeddings": 4096}}
LLAMA3_8B_HF = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
                "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                "tie_word_embeddings": False, "attention_bias": False}


# ---- KV cache and parameter counts -------------------------------------------------------------------------
def test_v3_mla_cache_is_70272_bytes_per_token_in_bf16():
    plan = memory_plan(load_model("v3-671b"), dataclasses.replace(H200_V3, cache_dtype="bf16"))
    assert plan.kv_bytes_per_token == 70_272 == 61 * 576 * 2
    assert plan.kv_bytes_per_token_layer == 1_152


def test_mha_gqa_mqa_equivalents_use_the_mla_head_shapes():
    model = load_model("v3-671b")
    per_head = 128 + 64 + 128  # K = qk_nope + qk_rope, V = v_head_dim
    for attention, kv_heads in (("mha", 128), ("gqa:8", 8), ("mqa", 1)):
        plan = memory_plan(model, dataclasses.replace(H200_V3, attention=attention, context=1024))
        assert plan.kv_bytes_per_token == 61 * kv_heads * per_head * 2
    assert memory_plan(model, dataclasses.replace(H200_V3, attention="mha")).kv_bytes_per_token == 4_997_120
    fp8 = memory_plan(model, dataclasses.replace(H200_V3, cache_dtype="fp8"))
    assert fp8.kv_bytes_per_token == 61 * 576


def test_v3_is_671b_total_37b_active():
    model = load_model("v3-671b")
    assert model.params_total == pytest.approx(671e9, rel=0.005)
    assert model.params_active == pytest.approx(37e9, rel=0.03)
    assert model.n_moe_layers == 58 and model.n_routed_experts == 256 and model.n_activated_experts == 8


def test_v3_from_transformers_config_matches_the_preset():
    a, b = from_hf_config(V3_HF), load_model("v3-671b")
    assert (a.params_total, a.params_active, a.expert_params) == (b.params_total, b.params_active, b.expert_params)


def test_deepseek_v2_lite_figures():
    model = from_hf_config(V2_LITE_HF, "v2-lite")
    preset = load_model("v2-lite-16b")
    assert model.params_total == preset.params_total == pytest.approx(15.7e9, rel=0.01)
    # DeepSeek reports 2.4B activated for V2-Lite without the embedding lookup (V3's 37B includes it).
    assert model.params_active - model.lookup_params == pytest.approx(2.4e9, rel=0.03)
    plan = memory_plan(model, Scenario(gpu="a100", gpus=1, weight_dtype="bf16", context=4096, batch=1))
    assert plan.kv_bytes_per_token == 27 * (512 + 64) * 2 == 31_104


def test_llama3_8b_gqa_config_counts():
    model = from_hf_config(LLAMA3_8B_HF, "llama3-8b")
    assert model.params_total == 8_030_261_248  # the published exact count
    assert model.native_attention == "gqa:8"
    plan = memory_plan(model, Scenario(gpu="h100", gpus=1, weight_dtype="bf16", context=8192, batch=1))
    assert plan.kv_bytes_per_token == 32 * 2 * 8 * 128 * 2 == 131_072
    with pytest.raises(ConfigError, match="MLA model"):
        memory_plan(model, Scenario(gpu="h100", gpus=1, attention="mla"))


def test_qwen2_and_mixtral_configs_match_published_counts():
    qwen = from_hf_config({"model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
                           "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                           "tie_word_embeddings": False})
    assert qwen.params_total == 7_615_616_512  # Qwen2.5-7B, q/k/v biases included
    mixtral = from_hf_config({"model_type": "mixtral", "vocab_size": 32000, "hidden_size": 4096,
                              "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                              "num_key_value_heads": 8, "num_local_experts": 8, "num_experts_per_tok": 2})
    assert mixtral.params_total == pytest.approx(46.7e9, rel=0.002)
    assert mixtral.params_active == pytest.approx(12.9e9, rel=0.002)


def test_load_model_reads_nanoseek_and_transformers_json(tmp_path):
    ours = tmp_path / "tiny.json"
    ModelConfig.preset("tiny").to_json(ours)
    assert load_model(config=ours).params_total == ModelConfig.preset("tiny").param_counts()["total"]
    hf_dir = tmp_path / "Meta-Llama-3-8B"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps(LLAMA3_8B_HF))
    model = load_model(config=hf_dir / "config.json")
    assert model.name == "Meta-Llama-3-8B" and model.params_total == 8_030_261_248


# ---- roofline ----------------------------------------------------------------------------------------------
TOY_GPU = GPUSpec("toy", hbm_bytes=1e12, hbm_bw=1e12, bf16_flops=1e14, fp8_flops=2e14, tdp_w=500, capex_usd=10_000,
                  source="test")
# A dense model with 1e9 matmul parameters; MHA cache of 2 layers x 2 heads x (4 + 4) numbers per token.
TOY = CostModel(name="toy", n_layers=2, n_heads=2, qk_head_dim=4, v_head_dim=4, params_total=10**9,
                params_active=10**9, lookup_params=0, native_attention="mha")
TOY_SC = Scenario(gpu=TOY_GPU, gpus=1, weight_dtype="bf16", cache_dtype="bf16", context=16, batch=1, mfu=1.0,
                  mbu=1.0, mem_fraction=1.0, workspace_gib=0.0)


def test_roofline_batch_1_is_memory_bound_closed_form():
    r = evaluate(TOY, TOY_SC)
    kv_per_token = 2 * 2 * 8 * 2  # layers x heads x (d_k + d_v) x bytes
    assert r.kv_bytes_per_token == kv_per_token
    assert r.bound == "memory"
    assert r.decode_step_s == pytest.approx((2e9 + 16 * kv_per_token) / 1e12, rel=1e-12)
    assert r.decode_time_compute_s == pytest.approx((2e9 + 2 * 16 * 2 * 2 * 8) / 1e14, rel=1e-12)
    assert r.decode_tokens_per_s == pytest.approx(1 / r.decode_step_s)


def test_roofline_large_batch_is_compute_bound_closed_form():
    batch = 4096
    r = evaluate(TOY, dataclasses.replace(TOY_SC, batch=batch))
    assert r.bound == "compute"
    assert r.decode_step_s == pytest.approx(batch * (2e9 + 2 * 16 * 2 * 2 * 8) / 1e14, rel=1e-12)
    assert r.decode_tokens_per_s == pytest.approx(1e14 / (2e9 + 1024), rel=1e-9)


def test_roofline_crossover_at_flops_over_bandwidth():
    # Weights dominate: crossover where B x 2P / F = 2P / BW, i.e. B = F / BW = 100.
    assert evaluate(TOY, dataclasses.replace(TOY_SC, batch=99)).bound == "memory"
    assert evaluate(TOY, dataclasses.replace(TOY_SC, batch=101)).bound == "compute"


def test_fp8_weights_halve_bytes_and_double_compute_rate():
    bf16 = evaluate(TOY, TOY_SC)
    fp8 = evaluate(TOY, dataclasses.replace(TOY_SC, weight_dtype="fp8"))
    assert fp8.memory.weight_bytes == bf16.memory.weight_bytes / 2
    assert fp8.decode_time_memory_s < bf16.decode_time_memory_s
    big = dataclasses.replace(TOY_SC, batch=8192)
    assert evaluate(TOY, dataclasses.replace(big, weight_dtype="fp8")).decode_time_compute_s < \
        evaluate(TOY, big).decode_time_compute_s


# ---- MoE -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [1, 3, 16, 64])
def test_expected_distinct_experts_matches_monte_carlo(batch):
    n_experts, k, trials = 64, 6, 2000
    rng = np.random.default_rng(0)
    picks = np.argpartition(rng.random((trials, batch, n_experts)), k, axis=-1)[..., :k].reshape(trials, -1)
    touched = np.zeros((trials, n_experts), dtype=bool)
    touched[np.arange(trials)[:, None], picks] = True
    simulated = touched.sum(1).mean()
    stderr = touched.sum(1).std() / np.sqrt(trials)
    assert abs(expected_distinct_experts(n_experts, k, batch) - simulated) < 4 * stderr + 1e-9
    assert expected_distinct_experts(n_experts, k, 1) == pytest.approx(k)


def test_moe_weights_read_grow_with_batch_and_saturate():
    model, sc = load_model("v3-671b"), dataclasses.replace(H200_V3, context=1024)
    r1, r_big = evaluate(model, dataclasses.replace(sc, batch=1)), evaluate(model, dataclasses.replace(sc, batch=512))
    assert r1.experts_touched_per_layer == pytest.approx(8)
    assert r_big.experts_touched_per_layer == pytest.approx(256, rel=1e-3)
    # batch 1 reads only the dense part and 8 experts per layer: ~37B of 671B weights.
    assert r1.decode_time_memory_s < r_big.decode_time_memory_s / 10


# ---- cost ------------------------------------------------------------------------------------------------------
def test_tco_closed_form_and_capex_dominates():
    gpu = GPUSpec("x", 80e9, 1e12, 1e15, 2e15, tdp_w=700, capex_usd=45_000, source="test")
    t = tco_per_gpu_hour(gpu, TCOInputs(years=4, cost_of_capital=0.0, pue=1.5, usd_per_kwh=0.1,
                                        hosting_usd_per_gpu_hour=0.2))
    assert t["capex"] == pytest.approx(45_000 / 4 / 8766)
    assert t["power"] == pytest.approx(0.7 * 1.5 * 0.1)
    assert t["total"] == pytest.approx(t["capex"] + t["power"] + 0.2)
    with_interest = tco_per_gpu_hour(gpu, TCOInputs(cost_of_capital=0.1))
    assert with_interest["capex"] > t["capex"] and 0.7 < with_interest["capex_share"] < 0.95


def test_usd_per_mtok_is_gpu_hour_over_tokens_per_hour():
    r = evaluate(TOY, TOY_SC)
    assert r.usd_per_mtok_output == pytest.approx(r.tco["total"] / (r.decode_tokens_per_s * 3600) * 1e6)
    half = evaluate(TOY, dataclasses.replace(TOY_SC, load=0.5))
    assert half.usd_per_mtok_output == pytest.approx(2 * r.usd_per_mtok_output)


def test_cost_per_answer_grows_with_reasoning_length():
    model, sc = load_model("v3-671b"), dataclasses.replace(H200_V3, batch=128)
    answers = [cost_per_answer(model, sc, prompt_tokens=1000, output_tokens=n) for n in (500, 4000, 16000, 64000)]
    usd = [a["usd"] for a in answers]
    assert usd == sorted(usd) and len(set(usd)) == 4
    per_token = [a["output_usd"] / n for a, n in zip(answers, (500, 4000, 16000, 64000))]
    assert per_token == sorted(per_token)  # longer contexts cost more per token, and shrink the batch
    assert answers[-1]["batch"] < 128


def test_mla_beats_mha_at_equal_model():
    rows = compare(load_model("v3-671b"), dataclasses.replace(H200_V3, context=4096, batch=8))
    by = {row.plan.attention: row for row in rows}
    assert by["mla"].plan.max_concurrent_sequences > 50 * by["mha"].plan.max_concurrent_sequences
    assert by["mla"].at_max_batch.usd_per_mtok_output < by["mha"].at_max_batch.usd_per_mtok_output / 10


# ---- validation ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change, message", [
    ({"gpu": "tpu"}, "unknown GPU"), ({"batch": 0}, "batch"), ({"context": -5}, "context"),
    ({"gpus": 0}, "gpus"), ({"mfu": 0.0}, "mfu"), ({"cache_dtype": "fp4"}, "cache_dtype"),
    ({"attention": "gqa:7"}, "divisor"), ({"attention": "linear"}, "unknown attention"),
    ({"tco": TCOInputs(years=0)}, "years"), ({"tco": TCOInputs(capex_usd=-1)}, "capex"),
    ({"gpu": "h100"}, "does not fit"), ({"batch": 10_000}, "batch 10000 does not fit"),
])
def test_bad_inputs_raise_one_clear_config_error(change, message):
    with pytest.raises(ConfigError, match=message):
        evaluate(load_model("v3-671b"), dataclasses.replace(H200_V3, **change))


def test_unknown_preset_and_bad_json(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset"):
        load_model("v9")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_model(config=bad)
    with pytest.raises(ConfigError, match="not found"):
        load_model(config=tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="lacks required"):
        from_hf_config({"model_type": "llama", "hidden_size": 64})


# ---- CLI -------------------------------------------------------------------------------------------------------
def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    cost_cmd.add_arguments(p)
    return p.parse_args(list(argv))


def test_cli_json_has_the_promised_keys(capsys):
    assert cost_cmd.run(_args("--preset", "v3-671b", "--gpu", "h200", "--gpus", "8", "--context", "32768",
                              "--batch", "64", "--json")) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("params_total", "params_active", "kv_bytes_per_token", "max_concurrent_sequences",
                "decode_tokens_per_s", "bound", "usd_per_mtok_output"):
        assert key in out
    assert out["kv_bytes_per_token"] == 70_272 and out["bound"] in ("memory", "compute")


def test_cli_table_compare_and_errors(capsys):
    assert cost_cmd.run(_args("--gpu", "h200", "--context", "4096")) == 0
    assert "USD per million output tokens" in capsys.readouterr().out
    assert cost_cmd.run(_args("--gpu", "h200", "--context", "4096", "--compare")) == 0
    out = capsys.readouterr().out
    assert "gqa:8" in out and "mha" in out
    with pytest.raises(ConfigError, match="does not fit"):
        cost_cmd.run(_args("--preset", "v3-671b", "--gpu", "h100", "--gpus", "8"))


def test_cli_sweep_writes_a_png(tmp_path, capsys):
    path = tmp_path / "plots" / "batch.png"
    results = sweep(load_model("v2-lite-16b"), Scenario(gpu="h100", gpus=1, context=4096), "batch",
                    values=[1, 4, 16])
    assert set(results) == {"mla", "gqa:8", "mha", "mqa"} and all(results.values())
    assert cost_cmd.run(_args("--preset", "v2-lite-16b", "--gpu", "h100", "--gpus", "1", "--sweep", "context",
                              "--plot", str(path))) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(path) in capsys.readouterr().out.replace("\n", "")
