"""Serving-cost model: closed-form values, published parameter counts, a Monte Carlo check and the CLI."""
from __future__ import annotations

import argparse
import dataclasses
import json
from itertools import combinations

import numpy as np
import pytest

from nanoseek.commands import cost as cost_cmd
from nanoseek.config import ConfigError, ModelConfig
from nanoseek.tokenomics import (
    GPUS,
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
from nanoseek.tokenomics.deployment import Deployment, PhasePlan, comm_plan, decode, fleet, load_deployment, prefill
from nanoseek.tokenomics.reasoning import ReasoningModel, answer_cost, kv_comparison
from nanoseek.tokenomics.scenarios import DEEPSEEK_2025_02, diagnostics, get_scenario, side_by_side

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


# ---- deployment model (disaggregated EP units, all-to-all, overlap) ------------------------------------------
# A small MoE for hand counts: 8 routed experts, top-2, 3 MoE layers, hidden 256 (two fp32 scales per FP8 row).
SMALL_MOE = CostModel(name="small-moe", n_layers=3, n_heads=2, qk_head_dim=4, v_head_dim=4, params_total=10**8,
                      params_active=4 * 10**7, lookup_params=0, native_attention="mha", n_moe_layers=3,
                      n_routed_experts=8, n_activated_experts=2, expert_params=10**6, hidden_size=256,
                      n_shared_experts=1)
LINK_GPU = dataclasses.replace(TOY_GPU, scaleup_bw=1e11, scaleout_bw=1e10)


def _brute_force_copies(scheme: str) -> dict[str, float]:
    """A token on GPU 0 (node 0) of EP4 over 2 nodes of 2 GPUs; GPU j holds experts 2j, 2j+1 and sits on node
    j // 2. Average over all C(8, 2) = 28 equally likely pairs of picks."""
    node = {j: j // 2 for j in range(4)}
    nvl = ib = 0
    pairs = list(combinations(range(8), 2))
    for pair in pairs:
        targets = {e // 2 for e in pair}
        if scheme == "direct":  # every pick travels: same node over NVLink, else over IB; GPU 0's own stay
            for e in pair:
                t = e // 2
                nvl += t != 0 and node[t] == 0
                ib += node[t] != 0
        else:  # one IB copy per remote node, landing on that node's GPU with in-node index 0 (GPU 2), then
            landing = {0, 2}  # NVLink to every other target GPU
            ib += len({node[t] for t in targets} - {0})
            nvl += len(targets - landing)
    return {"nvlink": nvl / len(pairs), "ib": ib / len(pairs)}


@pytest.mark.parametrize("scheme", ["direct", "hierarchical"])
def test_comm_bytes_per_step_match_a_hand_count(scheme):
    dep = Deployment(serving=Scenario(gpu=LINK_GPU), gpus_per_node=2, link_efficiency=0.5)
    plan = PhasePlan(ep=4, scheme=scheme)
    c = comm_plan(SMALL_MOE, dep, plan, tokens=10, gpu=LINK_GPU)
    hand = _brute_force_copies(scheme)
    disp, comb = 256 * 1 + 2 * 4, 256 * 2  # fp8 row + two fp32 scales; bf16 row
    per_copy_layers = 10 * 3  # tokens x MoE layers
    assert c.copies_per_token["nvlink"] == pytest.approx(hand["nvlink"])
    assert c.copies_per_token["ib"] == pytest.approx(hand["ib"])
    assert c.nvlink_bytes == pytest.approx(per_copy_layers * hand["nvlink"] * (disp + comb))
    assert c.ib_bytes == pytest.approx(per_copy_layers * hand["ib"] * (disp + comb))
    assert c.dispatch_bytes == pytest.approx(per_copy_layers * (hand["nvlink"] + hand["ib"]) * disp)
    assert c.combine_bytes == pytest.approx(per_copy_layers * (hand["nvlink"] + hand["ib"]) * comb)
    assert c.time_s == pytest.approx(max(c.nvlink_bytes / 0.5e11, c.ib_bytes / 0.5e10))
    if scheme == "direct":  # by hand: of 2 picks, 1/4 each on GPU 1 (NVLink), 1/2 on node 1 (IB)
        assert (c.nvlink_bytes, c.ib_bytes) == (pytest.approx(30 * 0.5 * 776), pytest.approx(30 * 1.0 * 776))
    else:  # 1 - 6/28 of tokens reach node 1; GPUs 1 and 3 are each hit by 1 - 15/28 of them
        assert c.copies_per_token["ib"] == pytest.approx(22 / 28)
        assert c.copies_per_token["nvlink"] == pytest.approx(2 * 13 / 28)


ROOFLINE_CASES = [
    ("v2-lite-16b", Scenario(gpu="h100", gpus=1, context=4096, batch=16)),
    ("v2-lite-16b", Scenario(gpu="h200", gpus=1, context=1000, batch=3, attention="gqa:8", cache_dtype="fp8")),
    ("v2-lite-16b", Scenario(gpu="a100", gpus=1, weight_dtype="bf16", context=512, batch=64, mfu=0.3, mbu=0.9)),
    ("toy", dataclasses.replace(TOY_SC, batch=7)),
    ("llama3-8b", Scenario(gpu="h100", gpus=1, weight_dtype="bf16", context=8192, batch=8)),
]


@pytest.mark.parametrize("name, sc", ROOFLINE_CASES)
def test_ep1_without_network_reduces_to_the_roofline_model(name, sc):
    model = {"toy": TOY, "llama3-8b": from_hf_config(LLAMA3_8B_HF, "llama3-8b")}.get(name) or load_model(name)
    old = evaluate(model, sc)
    dep = Deployment(serving=sc, prefill=PhasePlan(1), decode=PhasePlan(1), decode_batch=sc.batch,
                     prompt_tokens=sc.context, prefill_chunk=sc.batch * sc.context)
    f = fleet(model, dep)
    d, p = f.decode, f.prefill
    assert d.comm.nvlink_bytes == d.comm.ib_bytes == p.comm.ib_bytes == 0 and d.comm_time_s == 0
    assert d.memory_time_s == pytest.approx(old.decode_time_memory_s, rel=1e-12)
    assert d.compute_time_s == pytest.approx(old.decode_time_compute_s, rel=1e-12)
    assert d.step_s == pytest.approx(old.decode_step_s, rel=1e-12)
    assert d.tokens_per_s_per_gpu == pytest.approx(old.decode_tokens_per_s, rel=1e-12)
    assert d.tokens_per_s_per_user == pytest.approx(old.tokens_per_s_per_sequence, rel=1e-12)
    assert d.max_batch_per_gpu == old.max_concurrent_sequences
    assert d.kv_room_bytes_per_gpu == pytest.approx(old.memory.kv_room_bytes)
    assert d.weight_bytes_per_gpu == old.memory.weight_bytes
    assert p.tokens_per_s_per_gpu == pytest.approx(old.prefill_tokens_per_s, rel=1e-12)
    assert f.usd_per_mtok_output == pytest.approx(old.usd_per_mtok_output, rel=1e-12)
    assert f.usd_per_mtok_input == pytest.approx(old.usd_per_mtok_input, rel=1e-12)


def test_dual_microbatch_overlap_closed_form():
    base = Deployment(serving=Scenario(gpu=LINK_GPU, mem_fraction=1.0, workspace_gib=0.0), gpus_per_node=2,
                      decode=PhasePlan(ep=4), decode_batch=64)
    one = decode(SMALL_MOE, base)
    assert one.step_s == pytest.approx(one.work_time_s + one.comm_time_s)
    assert one.comm_time_s > 0
    for eff in (1.0, 0.5):
        dep = dataclasses.replace(base, decode=PhasePlan(ep=4, microbatches=2), overlap_efficiency=eff)
        two = decode(SMALL_MOE, dep)
        lo, hi = sorted((two.work_time_s, two.comm_time_s))
        assert two.step_s == pytest.approx(hi + lo * ((1 - eff) + eff / (2 * 3)))
        assert two.comm_time_s == pytest.approx(one.comm_time_s)  # same bytes, split in two
        assert two.memory_time_parts_s["weights"] > one.memory_time_parts_s["weights"]  # weights read twice


def test_expert_slots_weights_and_tokens_per_expert():
    model = load_model("v3-671b")
    dep = DEEPSEEK_2025_02.deployment
    p, d = prefill(model, dep), decode(model, dep)
    assert (p.experts_per_gpu, d.experts_per_gpu, d.shared_experts_per_gpu) == (9, 2, 1)
    dense = model.params_total - model.routed_params
    assert d.weight_bytes_per_gpu == dense + 2 * 58 * model.expert_params  # fp8: one byte per weight
    assert p.tokens_per_expert_per_step == pytest.approx(4096 * 8 / 9)
    assert d.tokens_per_expert_per_step == pytest.approx(d.tokens_per_gpu_per_step * 8 / 2)
    # decode batch: the largest that fits the KV room (the 20 tok/s SLO does not bind here)
    assert d.tokens_per_gpu_per_step == d.max_batch_per_gpu == int(d.kv_room_bytes_per_gpu // (70_272 * 4989))
    slow = decode(model, dataclasses.replace(dep, min_user_tokens_per_s=40.0))
    assert slow.batch_limited_by == "slo" and slow.tokens_per_s_per_user >= 40
    over = decode(model, dataclasses.replace(dep, decode_batch=int(slow.tokens_per_gpu_per_step) + 1))
    assert over.tokens_per_s_per_user < 40


def test_scenario_inputs_are_the_published_values():
    sc = get_scenario("deepseek-2025-02")
    dep, pub = sc.deployment, sc.published
    assert sc.preset == "v3-671b"
    assert dep.serving.gpu == "h800" and dep.gpus_per_node == 8
    h800, h100 = GPUS["h800"], GPUS["h100"]
    assert (h800.bf16_flops, h800.fp8_flops, h800.hbm_bytes, h800.hbm_bw) == \
        (h100.bf16_flops, h100.fp8_flops, h100.hbm_bytes, h100.hbm_bw)
    assert 2 * h800.scaleup_bw == 400e9 and h800.scaleout_bw == 400e9 / 8  # one 400 Gb/s NIC per GPU
    assert (dep.prefill.ep, dep.prefill.redundant_experts, dep.prefill.microbatches) == (32, 32, 2)
    assert (dep.decode.ep, dep.decode.redundant_experts, dep.decode.microbatches) == (144, 32, 2)
    assert dep.prefill.ep / dep.gpus_per_node == pub["prefill_nodes_per_unit"] == 4
    assert dep.decode.ep / dep.gpus_per_node == pub["decode_nodes_per_unit"] == 18
    assert (256 + 32) // dep.prefill.ep == pub["prefill_routed_experts_per_gpu"] == 9
    assert (256 + 32) // dep.decode.ep == pub["decode_routed_experts_per_gpu"] == 2
    assert (dep.serving.weight_dtype, dep.dispatch_dtype, dep.serving.cache_dtype, dep.combine_dtype) == \
        ("fp8", "fp8", "bf16", "bf16")
    t = sc.traffic
    assert (t.input_tokens, t.cache_hit_tokens, t.output_tokens, t.seconds) == (608e9, 342e9, 168e9, 86_400)
    assert abs(t.cache_hit_fraction - 0.563) <= 0.0005 and dep.prefix_cache_hit == t.cache_hit_fraction
    assert dep.serving.context == 4989 and dep.min_user_tokens_per_s == 20.0
    assert sc.published_ranges["tokens_per_s_per_user"] == (20.0, 22.0)
    assert dep.usd_per_gpu_hour == 2.0
    assert (sc.prices.input_cache_hit, sc.prices.input_cache_miss, sc.prices.output) == (0.14, 0.55, 2.19)
    assert (pub["prefill_tokens_per_s_per_node"], pub["decode_tokens_per_s_per_node"]) == (73.7e3, 14.8e3)
    assert (pub["nodes_needed"], pub["peak_nodes"], pub["usd_per_day"], pub["revenue_per_day"]) == \
        (226.75, 278, 87_072, 562_027)
    # utilizations: the tool's defaults, the same as for every other scenario (nothing fitted)
    d0, s0 = Deployment(), Scenario()
    for name in ("mfu", "mbu", "mem_fraction", "workspace_gib", "load"):
        assert getattr(dep.serving, name) == getattr(s0, name)
    assert (dep.link_efficiency, dep.overlap_efficiency, dep.prefill_chunk) == \
        (d0.link_efficiency, d0.overlap_efficiency, d0.prefill_chunk)
    # the published figures agree with each other: the cost is nodes x 8 GPUs x $2 x 24 h, the revenue is the
    # day's tokens at R1 prices, and the day's tokens at the per-node throughputs need the average node count
    assert pub["nodes_needed"] * 8 * 2 * 24 == pub["usd_per_day"]
    revenue = (342e9 * 0.14 + (608e9 - 342e9) * 0.55 + 168e9 * 2.19) / 1e6
    assert revenue == pytest.approx(pub["revenue_per_day"], rel=2e-4)
    assert pub["revenue_per_day"] / pub["usd_per_day"] - 1 == pytest.approx(pub["margin"], abs=0.005)
    nodes = 608e9 / 86_400 / 73.7e3 + 168e9 / 86_400 / 14.8e3
    assert nodes == pytest.approx(pub["nodes_needed"], rel=2e-3)
    assert all(sc.sources.get(k) for k in ("gpu", "prefill", "decode", "traffic", "context", "prices",
                                           "usd_per_gpu_hour", "prompt_tokens"))


def test_scenario_prediction_is_reported_side_by_side():
    sc = DEEPSEEK_2025_02
    f = sc.run()
    rows = {r["key"]: r for r in side_by_side(sc, f)}
    assert rows["nodes_needed"]["predicted"] == pytest.approx(
        608e9 / 86_400 / f.prefill.tokens_per_s_per_node + 168e9 / 86_400 / f.decode.tokens_per_s_per_node)
    assert f.usd_per_day == pytest.approx(f.nodes_needed * 8 * 2.0 * 24)
    assert f.revenue_per_day == pytest.approx(562_027, rel=2e-4)
    assert f.margin == pytest.approx(f.revenue_per_day / f.usd_per_day - 1)
    assert rows["prefill_tokens_per_s_per_node"]["ratio"] == pytest.approx(f.prefill.tokens_per_s_per_node / 73.7e3)
    diag = diagnostics(sc, f)
    assert diag["implied_decode_batch_per_gpu"] == pytest.approx(14.8e3 / 8 / 21)
    assert diag["published_decode_step_s"] == pytest.approx(1 / 21)


def test_reasoning_cost_per_answered_question():
    model, dep = load_model("v3-671b"), dataclasses.replace(DEEPSEEK_2025_02.deployment, prompt_tokens=1000)
    long, short = ReasoningModel("long", 8000, 0.8), ReasoningModel("short", 2000, 0.5)
    a = answer_cost(model, dep, long)
    assert a.context == 1000 + 4000
    f = fleet(model, dataclasses.replace(dep, serving=dataclasses.replace(dep.serving, context=5000)))
    assert a.usd_per_attempt == pytest.approx((1000 * f.usd_per_mtok_input + 8000 * f.usd_per_mtok_output) / 1e6)
    assert a.usd_per_answered == pytest.approx(a.usd_per_attempt / 0.8)
    rows = kv_comparison(model, dep, [long, short], ["mla", "gqa:8", "mha"])
    mla, gqa, mha = (rows[v][0] for v in ("mla", "gqa:8", "mha"))
    assert mla.decode_batch_per_gpu > 4 * gqa.decode_batch_per_gpu > 4 * mha.decode_batch_per_gpu
    assert mla.usd_per_answered < gqa.usd_per_answered < mha.usd_per_answered
    with pytest.raises(ConfigError, match="NAME:TOKENS:ACCURACY"):
        ReasoningModel.parse("long:8000")
    with pytest.raises(ConfigError, match="accuracy"):
        ReasoningModel.parse("long:8000:0")


def test_every_gpu_preset_has_both_links():
    for gpu in GPUS.values():
        assert gpu.scaleup_bw > gpu.scaleout_bw > 0 and gpu.link_source


@pytest.mark.parametrize("change, message", [
    ({"decode": PhasePlan(ep=100)}, "multiple of 8"), ({"decode": PhasePlan(ep=48)}, "do not split evenly"),
    ({"prefill": PhasePlan(ep=1)}, "do not fit"), ({"prefix_cache_hit": 1.0}, "prefix_cache_hit"),
    ({"link_efficiency": 0.0}, "link_efficiency"), ({"decode_batch": 10_000}, "does not fit"),
    ({"min_user_tokens_per_s": 10_000.0}, "even one sequence"), ({"decode": PhasePlan(8, scheme="x")}, "scheme"),
    ({"prefix_cache_hit": "x"}, "must be a number"), ({"decode": PhasePlan(0)}, "positive integer"),
])
def test_bad_deployments_raise_one_clear_config_error(change, message):
    with pytest.raises(ConfigError, match=message):
        fleet(load_model("v3-671b"), dataclasses.replace(DEEPSEEK_2025_02.deployment, **change))


def test_cli_scenario_and_deployment_json(capsys, tmp_path):
    assert cost_cmd.run(_args("--scenario", "deepseek-2025-02", "--json")) == 0
    out = json.loads(capsys.readouterr().out)
    pred = out["predicted"]
    for key in ("prefill_tokens_per_s_per_node", "decode_tokens_per_s_per_node", "comm_time_s", "compute_time_s",
                "memory_time_s", "nodes_needed", "usd_per_day", "revenue_per_day", "margin"):
        assert pred[key] is not None, key
    assert set(pred["comm_time_s"]) == {"prefill", "decode"}
    assert out["published"]["decode_tokens_per_s_per_node"] == 14.8e3
    argv = ("--gpu", "h800", "--context", "4989", "--prefill-ep", "32", "--decode-ep", "144",
            "--redundant-experts", "32", "--microbatches", "2", "--prompt-tokens", "4989",
            "--prefix-cache-hit", str(342 / 608), "--min-user-tps", "20", "--usd-per-gpu-hour", "2",
            "--input-tokens-per-day", "608e9", "--output-tokens-per-day", "168e9", "--prices", "0.14,0.55,2.19")
    assert cost_cmd.run(_args(*argv, "--json")) == 0
    flags = json.loads(capsys.readouterr().out)
    assert flags["nodes_needed"] == pytest.approx(pred["nodes_needed"])  # the flags rebuild the scenario
    path = tmp_path / "dep.json"
    path.write_text(json.dumps({"prefill": {"ep": 32, "redundant_experts": 32, "microbatches": 2,
                                            "scheme": "hierarchical"},
                                "decode": {"ep": 144, "redundant_experts": 32, "microbatches": 2},
                                "prompt_tokens": 4989, "prefix_cache_hit": 342 / 608, "min_user_tokens_per_s": 20,
                                "usd_per_gpu_hour": 2.0}))
    assert cost_cmd.run(_args("--gpu", "h800", "--context", "4989", "--deployment", str(path), "--json")) == 0
    from_file = json.loads(capsys.readouterr().out)
    assert from_file["decode_tokens_per_s_per_node"] == pytest.approx(pred["decode_tokens_per_s_per_node"])
    assert cost_cmd.run(_args("--scenario", "deepseek-2025-02", "--reasoning", "a:4000:0.7")) == 0
    text = capsys.readouterr().out
    assert "predicted / published" in text and "answered" in text
    assert cost_cmd.run(_args("--scenario", "deepseek-2025-02", "--reasoning", "a:4000:0.7", "--json")) == 0
    reasoning = json.loads(capsys.readouterr().out)["reasoning"]
    assert reasoning["mla"][0]["usd_per_answered"] < reasoning["mha"][0]["usd_per_answered"]
    assert cost_cmd.run(_args("--gpu", "h200", "--prefill-ep", "16", "--decode-ep", "32", "--prefix-cache-hit", "0.5",
                              "--output-tokens-per-day", "1e9", "--json")) == 0
    decode_only = json.loads(capsys.readouterr().out)
    assert decode_only["prefill_nodes"] == 0 and decode_only["nodes_needed"] == pytest.approx(
        1e9 / 86_400 / decode_only["decode_tokens_per_s_per_node"])
    assert decode_only["revenue_per_day"] is None
    path.write_text(json.dumps({"decode": {"ep": 8, "typo": 1}}))
    with pytest.raises(ConfigError, match="decode must be an object"):
        load_deployment(path, Scenario())
    with pytest.raises(ConfigError, match="unknown scenario"):
        cost_cmd.run(_args("--scenario", "nope"))
    with pytest.raises(ConfigError, match="needs a deployment"):
        cost_cmd.run(_args("--reasoning", "a:1:1"))
