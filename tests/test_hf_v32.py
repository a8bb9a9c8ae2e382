"""DeepSeek-V3.2 interop (nanoseek/hf_v32.py through nanoseek.hf's from_hf / to_hf): logits parity with
transformers' DeepseekV32ForCausalLM both ways on random tiny configs, with top-k dropping tokens (and a
check that it does: the dense twin's logits differ) and with index_topk >= L; greedy tokens equal to
transformers' generate (its indexer-key cache) both ways; config round trip and refusals."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import require_module
from test_hf import rel_err, yarn

transformers = require_module("transformers")
from transformers import AutoModelForCausalLM, DeepseekV32Config, DeepseekV32ForCausalLM  # noqa: E402

from nanoseek.config import ConfigError, ModelConfig  # noqa: E402
from nanoseek.engine.engine import Engine  # noqa: E402
from nanoseek.hf import config_from_hf, config_to_hf, from_hf, to_hf  # noqa: E402
from nanoseek.model import Transformer  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

L = 40  # test sequence length; the sparse cases keep index_topk well below it


def nano_cfg(**kw) -> ModelConfig:
    base = {"vocab_size": 96, "dim": 48, "inter_dim": 80, "moe_inter_dim": 16, "n_layers": 3,
            "n_dense_layers": 1, "n_heads": 3, "n_routed_experts": 8, "n_shared_experts": 1,
            "n_activated_experts": 2, "q_lora_rank": 24, "kv_lora_rank": 16, "qk_nope_head_dim": 8,
            "qk_rope_head_dim": 8, "v_head_dim": 12, "max_seq_len": 64, "original_seq_len": 64, "n_mtp": 0,
            "init_std": 0.1, "index_n_heads": 8, "index_head_dim": 16, "index_topk": 8}
    base.update(kw)
    return ModelConfig(**base).validate()


def random_nano(cfg: ModelConfig) -> Transformer:
    """Random weights: norms (RMS and the indexer's LayerNorm weight and bias) perturbed, selection bias set."""
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
        for m in model.moe_layers():
            m.gate.bias.normal_(0, 0.05)
    return model


def hf_config(**kw) -> DeepseekV32Config:
    base = {"vocab_size": 96, "hidden_size": 48, "intermediate_size": 80, "moe_intermediate_size": 16,
            "num_hidden_layers": 3, "first_k_dense_replace": 1, "num_attention_heads": 3,
            "num_key_value_heads": 3, "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2,
            "n_group": 1, "topk_group": 1, "routed_scaling_factor": 2.5, "q_lora_rank": 24,
            "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 12,
            "max_position_embeddings": 64, "index_topk": 8, "index_n_heads": 8, "index_head_dim": 16}
    base.update(kw)
    return DeepseekV32Config(**base)


def random_hf(config: DeepseekV32Config) -> DeepseekV32ForCausalLM:
    model = DeepseekV32ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.bias"):
                p.normal_(0, 0.1)
            elif "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.1)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.05)
    return model


def dense_logits(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    """The same model with every indexer's top-k lifted past the length: dense attention."""
    saved = [m.indexer.topk for m in model.modules() if getattr(m, "indexer", None) is not None]
    for m in model.modules():
        if getattr(m, "indexer", None) is not None:
            m.indexer.topk = 10 ** 9
    try:
        return model(ids)
    finally:
        for m, k in zip([m for m in model.modules() if getattr(m, "indexer", None) is not None], saved):
            m.indexer.topk = k


NANO_CASES = {
    "drop": nano_cfg(),
    "drop-yarn-groups-mtp-wide-index": nano_cfg(n_expert_groups=4, n_limited_groups=2, n_activated_experts=3,
                                                 route_scale=2.5, rope_factor=4.0, mscale=0.707,
                                                 original_seq_len=16, n_mtp=1, index_head_dim=24, index_topk=5),
    "dense-ffn-drop-rope-only-index": nano_cfg(n_routed_experts=0, n_dense_layers=3, index_head_dim=8,
                                               index_n_heads=12, index_topk=11),
    "topk-at-least-length": nano_cfg(index_topk=L),
}


@pytest.mark.parametrize("name", list(NANO_CASES))
def test_nanoseek_to_transformers_logits(name, tmp_path):
    """nanoseek -> to_hf -> AutoModelForCausalLM (DeepseekV32ForCausalLM): every weight consumed, float32 logits
    within 1e-4 relative error; where top-k drops tokens the dense logits differ (the selection matters)."""
    cfg = NANO_CASES[name]
    ours = random_nano(cfg)
    to_hf(ours, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["DeepseekV32ForCausalLM"]
    hf, info = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, output_loading_info=True)
    assert type(hf).__name__ == "DeepseekV32ForCausalLM"
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert all(k.startswith(f"model.layers.{cfg.n_layers}.") for k in info["unexpected_keys"])  # MTP only
    ids = torch.randint(0, cfg.vocab_size, (2, L))
    with torch.no_grad():
        theirs = hf.eval()(ids).logits
        mine = ours(ids)
        dense = dense_logits(ours, ids)
    assert theirs.abs().mean() > 0.1
    assert rel_err(mine, theirs) < 1e-4
    if cfg.index_topk < L:
        assert rel_err(dense, theirs) > 1e-2
    else:
        assert torch.equal(dense, mine)


HF_CASES = {
    "drop-single-file": (hf_config(), None),
    "drop-yarn-groups-sharded": (hf_config(n_group=4, topk_group=2, num_experts_per_tok=3, index_topk=6,
                                           rope_parameters=yarn(4.0, 16, 0.707)), "30KB"),
    "all-moe-mtp-declared-topk4": (hf_config(first_k_dense_replace=0, num_nextn_predict_layers=1, index_topk=4,
                                             index_head_dim=12), None),
}


@pytest.mark.parametrize("name", list(HF_CASES))
def test_transformers_to_nanoseek_logits(name, tmp_path):
    """Random DeepseekV32ForCausalLM -> save_pretrained -> from_hf: same float32 logits (1e-4 relative), the
    indexer's LayerNorm bias and weights_proj included."""
    config, shard = HF_CASES[name]
    hf = random_hf(config)
    hf.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    ours = from_hf(tmp_path, verbose=False).eval()
    assert ours.cfg.index_topk == config.index_topk and ours.cfg.index_head_dim == config.index_head_dim
    ids = torch.randint(0, config.vocab_size, (2, L))
    with torch.no_grad():
        theirs = hf(ids).logits
        mine = ours(ids)
        dense = dense_logits(ours, ids)
    assert rel_err(mine, theirs) < 1e-4
    assert rel_err(dense, theirs) > 1e-2


def _hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                      eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("direction", ["nanoseek-to-hf", "hf-to-nanoseek"])
def test_greedy_tokens_match_transformers_generate(direction, tmp_path):
    """Greedy continuations of 28 tokens after prompts of 12-20 (index_topk 6: decode drops most of the
    context): nanoseek's Engine (latent + indexer-key cache, absorbed decode) gives transformers' generate
    tokens (its DynamicCache with the indexer cache), in both directions of conversion."""
    if direction == "nanoseek-to-hf":
        ours = random_nano(nano_cfg(index_topk=6))
        to_hf(ours, tmp_path)
        hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    else:
        hf = random_hf(hf_config(index_topk=6))
        hf.save_pretrained(tmp_path)
        ours = from_hf(tmp_path, verbose=False).eval()
    prompts = [torch.randint(2, 96, (n,)).tolist() for n in (20, 12, 17)]
    engine = Engine(ours, eos_id=-1)
    gens = engine.generate(prompts, max_new_tokens=28)  # ragged batch: left padding masked
    for p, g in zip(prompts, gens):
        assert g.tokens == _hf_greedy(hf, p, 28)


def test_config_round_trip_and_refusals():
    """to_hf's config.json reads back to the same ModelConfig; a V3 model still exports as DeepseekV3; V3.2
    without a query latent, with a custom MLP pattern, or lacking index fields is a one-line ConfigError."""
    cfg = nano_cfg(rope_factor=4.0, mscale=0.707, original_seq_len=16, n_mtp=1, norm_topk_prob=True)
    conf = config_to_hf(cfg)
    assert conf["model_type"] == "deepseek_v32" and "rope_interleave" not in conf
    assert config_from_hf(json.loads(json.dumps(conf))) == cfg
    assert DeepseekV32Config(**conf).index_topk == cfg.index_topk
    dense = ModelConfig(q_lora_rank=24)
    assert config_to_hf(dense)["model_type"] == "deepseek_v3"
    with pytest.raises(ConfigError, match="q_lora_rank"):
        config_from_hf({**conf, "q_lora_rank": None})
    with pytest.raises(ConfigError, match="mlp_layer_types"):
        config_from_hf({**conf, "mlp_layer_types": ["sparse", "dense", "sparse"]})
    with pytest.raises(ConfigError, match="index_head_dim"):
        config_from_hf({k: v for k, v in conf.items() if k != "index_head_dim"})
