"""DeepSeek-V2 (`DeepseekV2ForCausalLM`) import and export (nanoseek.hf) against transformers: softmax gate, its
top-k methods (greedy; group-limited greedy, groups ranked by their best expert), no selection bias, V2's MLA
with and without q LoRA, YaRN. Logits agree both ways; greedy generation of an imported V2 run equals
transformers `generate` for 32 tokens; what V2 cannot hold is refused in one line."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import require_module
from safetensors.torch import load_file, save_file

transformers = require_module("transformers")
from hf_fixture import MESSAGES, build_checkpoint  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, DeepseekV2Config, DeepseekV2ForCausalLM  # noqa: E402

from nanoseek.commands.generate import load_engine  # noqa: E402
from nanoseek.config import ConfigError, ModelConfig  # noqa: E402
from nanoseek.hf import from_hf, to_hf  # noqa: E402
from nanoseek.hf_import import import_checkpoint  # noqa: E402
from nanoseek.model import Transformer  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
        "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}
CASES = {
    "group-limited-top1group": dict(n_group=4, topk_group=1, num_experts_per_tok=3, topk_method="group_limited_greedy"),
    "group-limited-top2groups": dict(n_group=4, topk_group=2, num_experts_per_tok=3, topk_method="group_limited_greedy",
                                     routed_scaling_factor=16.0),
    "greedy": dict(topk_method="greedy", n_group=None, topk_group=None, num_experts_per_tok=3),
    "qlora-yarn-2shared": dict(q_lora_rank=24, n_shared_experts=2, rope_parameters=YARN, n_group=4, topk_group=1,
                               num_experts_per_tok=2, topk_method="group_limited_greedy"),
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def v2_config(**kw) -> DeepseekV2Config:
    base = dict(vocab_size=96, hidden_size=48, intermediate_size=80, moe_intermediate_size=16, num_hidden_layers=3,
                first_k_dense_replace=1, num_attention_heads=3, n_routed_experts=16, n_shared_experts=1,
                routed_scaling_factor=1.0, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8,
                qk_rope_head_dim=8, v_head_dim=12, max_position_embeddings=64)
    base.update(kw)
    return DeepseekV2Config(**base)


def random_v2(config: DeepseekV2Config) -> DeepseekV2ForCausalLM:
    model = DeepseekV2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p)) if "norm" in name else p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("name", list(CASES))
def test_v2_import_logits(name, tmp_path):
    theirs = random_v2(v2_config(**CASES[name]))
    theirs.save_pretrained(tmp_path)
    ours = from_hf(tmp_path, verbose=False).eval()
    assert ours.cfg.score_func == "softmax" and not ours.cfg.normalizes_topk
    assert all(not m.gate.bias.any() for m in ours.moe_layers())
    ids = torch.randint(0, 96, (2, 40))
    with torch.no_grad():
        a, b = theirs(ids).logits, ours(ids)
    assert a.abs().mean() > 0.1 and rel_err(b, a) < 1e-4


def test_group_limited_differs_from_greedy(tmp_path):
    """The test bites: reading group_limited_greedy as greedy (or V3's top-2-sum group score) changes the logits."""
    theirs = random_v2(v2_config(**CASES["group-limited-top1group"]))
    theirs.save_pretrained(tmp_path)
    greedy = json.loads((tmp_path / "config.json").read_text()) | {"topk_method": "greedy"}
    (tmp_path / "config.json").write_text(json.dumps(greedy))
    ids = torch.randint(0, 96, (2, 40))
    with torch.no_grad():
        assert rel_err(from_hf(tmp_path, verbose=False).eval()(ids), theirs(ids).logits) > 1e-2


@pytest.mark.parametrize("groups", [(1, 1), (4, 2)])
def test_v2_export_logits(groups, tmp_path):
    cfg = ModelConfig(vocab_size=96, dim=48, inter_dim=80, moe_inter_dim=16, n_layers=3, n_dense_layers=1, n_heads=3,
                      n_routed_experts=8, n_shared_experts=1, n_activated_experts=2, n_expert_groups=groups[0],
                      n_limited_groups=groups[1], score_func="softmax", route_scale=2.0, q_lora_rank=0,
                      kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, max_seq_len=64,
                      original_seq_len=64, n_mtp=0, init_std=0.1).validate()
    ours = Transformer(cfg).eval()
    to_hf(ours, tmp_path)
    theirs, info = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, output_loading_info=True)
    assert type(theirs).__name__ == "DeepseekV2ForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = torch.randint(0, 96, (2, 40))
    with torch.no_grad():
        assert rel_err(ours(ids), theirs.eval()(ids).logits) < 1e-4
    back = from_hf(tmp_path, verbose=False)
    assert back.cfg.n_expert_groups == groups[0] and back.cfg.score_func == "softmax"


def test_v2_export_refuses_what_v2_cannot_hold(tmp_path):
    base = dict(vocab_size=96, dim=48, inter_dim=80, moe_inter_dim=16, n_layers=2, n_dense_layers=1, n_heads=3,
                n_routed_experts=8, n_shared_experts=1, n_activated_experts=2, score_func="softmax", q_lora_rank=0,
                kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, max_seq_len=64,
                original_seq_len=64, n_mtp=0)
    with pytest.raises(ConfigError, match="does not renormalize"):
        to_hf(Transformer(ModelConfig(**base, norm_topk_prob=True).validate()), tmp_path / "a")
    model = Transformer(ModelConfig(**base).validate())
    model.moe_layers()[0].gate.bias.fill_(0.1)
    with pytest.raises(ConfigError, match="selection bias"):
        to_hf(model, tmp_path / "b")


def test_v2_bad_configs(tmp_path):
    random_v2(v2_config(**CASES["greedy"])).save_pretrained(tmp_path / "ok")
    for edit, msg in [({"topk_method": "noaux_tc"}, "topk_method 'noaux_tc'"), ({"moe_layer_freq": 2}, "moe_layer_freq"),
                      ({"scoring_func": "sigmoid"}, "scoring_func")]:
        d = tmp_path / "bad"
        shutil.copytree(tmp_path / "ok", d, dirs_exist_ok=True)
        (d / "config.json").write_text(json.dumps(json.loads((tmp_path / "ok" / "config.json").read_text()) | edit))
        with pytest.raises(ConfigError, match=msg):
            from_hf(d, verbose=False)
    tensors = load_file(tmp_path / "ok" / "model.safetensors")  # V3's selection bias in a V2 checkpoint
    tensors["model.layers.1.mlp.gate.e_score_correction_bias"] = torch.zeros(16)
    save_file(tensors, tmp_path / "ok" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="unexpected key in checkpoint: model.layers.1.mlp.gate.e_score"):
        from_hf(tmp_path / "ok", verbose=False)


def test_v2_run_greedy_equals_transformers(tmp_path):
    ckpt = build_checkpoint(tmp_path / "v2", arch="v2")
    run = import_checkpoint(ckpt, tmp_path / "run", verbose=False)
    hf_tok = AutoTokenizer.from_pretrained(ckpt)
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    assert type(hf).__name__ == "DeepseekV2ForCausalLM"
    prompt = hf_tok.apply_chat_template(MESSAGES, add_generation_prompt=True)["input_ids"]
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)[0, len(prompt):].tolist()
    engine = load_engine(str(run))
    assert engine.tokenizer.chat_ids(MESSAGES) == prompt
    assert engine.generate([prompt], 32)[0].tokens == theirs


# config.json of deepseek-ai/DeepSeek-V2-Lite as published (trust_remote_code era keys included)
V2_LITE = {"architectures": ["DeepseekV2ForCausalLM"], "aux_loss_alpha": 0.001, "bos_token_id": 100000,
           "eos_token_id": 100001, "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 2048,
           "initializer_range": 0.02, "intermediate_size": 10944, "kv_lora_rank": 512,
           "max_position_embeddings": 163840, "model_type": "deepseek_v2", "moe_intermediate_size": 1408,
           "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64, "n_shared_experts": 2, "norm_topk_prob": False,
           "num_attention_heads": 16, "num_experts_per_tok": 6, "num_hidden_layers": 27, "num_key_value_heads": 16,
           "q_lora_rank": None, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
           "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                            "original_max_position_embeddings": 4096, "type": "yarn"},
           "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": True,
           "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16",
           "v_head_dim": 128, "vocab_size": 102400}


def test_v2_lite_config_is_the_preset():
    """V2-Lite's config.json maps onto nanoseek's `v2-lite-16b` preset (what `nanoseek info` shows), and back."""
    from nanoseek.hf import config_from_hf, config_to_hf

    preset = ModelConfig.preset("v2-lite-16b")
    got = config_from_hf(V2_LITE)
    skip = {"init_std", "norm_eps", "norm_topk_prob"}  # None (softmax default) and False both mean "no"
    assert got.normalizes_topk is preset.normalizes_topk is False
    assert {k: v for k, v in got.to_dict().items() if k not in skip} == \
        {k: v for k, v in preset.to_dict().items() if k not in skip}
    assert config_from_hf(config_to_hf(got)).to_dict() == got.to_dict()
