"""Hugging Face interop for DeepSeek-V3.2 (transformers `DeepseekV32ForCausalLM`, model_type deepseek_v32):
DeepSeek-V3 plus DeepSeek Sparse Attention (V3.2-Exp report sec. 2.1; nanoseek/model/indexer.py).

Everything but the indexer is V3, so this module only translates the config; nanoseek.hf's `from_hf` /
`to_hf` read and write the weights (they dispatch here on model_type deepseek_v32 / a sparse ModelConfig).
The indexer's tensors map one to one: `layers.N.attn.indexer.{wq_b,wk,k_norm,weights_proj}` <->
`model.layers.N.self_attn.indexer.{same}` (k_norm is a LayerNorm: weight and bias), also in MTP layers.
The indexer's rope rows stay in transformers' half-split layout (nanoseek rotates them that way), so unlike
MLA's rows nothing is permuted; `weights_proj` stays float32 on load, as transformers keeps it.

Differences from DeepSeek's own V3.2 kernels, shared with transformers: no Hadamard rotation of the indexer's
q and k (orthogonal, so the scores are unchanged up to rounding) and float32 scoring instead of FP8.
transformers' V3.2 attention has no full-rank query (q_lora_rank must be > 0) and always uses the interleaved
MLA rope layout.
"""
from __future__ import annotations

import dataclasses

from nanoseek.config import ConfigError, ModelConfig


def config_to_hf(cfg: ModelConfig) -> dict:
    """A DeepseekV32 config.json for a sparse-attention ModelConfig."""
    from nanoseek import hf

    if not cfg.sparse_attention:
        raise ConfigError("a DeepseekV32 checkpoint needs sparse attention (index_topk > 0)")
    out = hf.config_to_hf(dataclasses.replace(cfg, index_topk=0, index_n_heads=0, index_head_dim=0))
    out.pop("rope_interleave", None)  # V3.2 always interleaves MLA's rope rows and has no such field
    moe = cfg.n_routed_experts > 0
    n_dense = cfg.n_dense_layers if moe else cfg.n_layers
    out.update({"architectures": ["DeepseekV32ForCausalLM"], "model_type": "deepseek_v32",
                "index_topk": cfg.index_topk, "index_n_heads": cfg.index_n_heads,
                "index_head_dim": cfg.index_head_dim,
                "mlp_layer_types": ["dense"] * n_dense + ["sparse"] * (cfg.n_layers - n_dense)})
    return out


def config_from_hf(conf: dict) -> ModelConfig:
    """ModelConfig of a deepseek_v32 config.json: the V3 fields as nanoseek.hf reads them, plus the indexer's."""
    from nanoseek import hf

    if conf.get("rope_interleave") is False:
        raise ConfigError("deepseek_v32 with rope_interleave=false is not supported (transformers' V3.2 ignores "
                          "the flag and always uses the interleaved layout)")
    n_layers, first_dense = conf.get("num_hidden_layers", 0), conf.get("first_k_dense_replace", 0)
    types = conf.get("mlp_layer_types")
    n_dense = min(first_dense, n_layers)
    if types is not None and list(types) != ["dense"] * n_dense + ["sparse"] * (n_layers - n_dense):
        raise ConfigError(f"mlp_layer_types {types} is not supported: nanoseek's MoE layers are the ones after "
                          f"first_k_dense_replace={first_dense}")
    missing = [k for k in ("index_topk", "index_n_heads", "index_head_dim") if k not in conf]
    if missing:
        raise ConfigError(f"deepseek_v32 config.json lacks required field(s): {', '.join(missing)}")
    base = hf.config_from_hf({k: v for k, v in conf.items() if k != "model_type"} | {"model_type": "deepseek_v3"})
    cfg = dataclasses.replace(base, index_topk=int(conf["index_topk"]), index_n_heads=int(conf["index_n_heads"]),
                              index_head_dim=int(conf["index_head_dim"]))
    if cfg.index_topk <= 0:
        raise ConfigError(f"index_topk must be positive in a deepseek_v32 config, got {cfg.index_topk}")
    return cfg.validate()
