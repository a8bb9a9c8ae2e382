"""What a model is, as far as serving cost is concerned (`CostModel`), and how one is read: from a nanoseek
`ModelConfig` (a preset or its JSON), or from a transformers `config.json` (DeepSeek-V2/V3 via `model_type`, or
a Llama/Qwen/Mistral-style GQA model, dense or MoE). Pure arithmetic on shapes; no torch. The formulas that use
a CostModel live in `roofline.py`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from nanoseek.config import ConfigError, ModelConfig

# ---- the model, as far as cost is concerned ---------------------------------------------------------
@dataclass(frozen=True)
class CostModel:
    """Shapes and parameter counts that decide memory and speed; nothing else of the network."""
    name: str
    n_layers: int
    n_heads: int
    qk_head_dim: int  # K numbers per head when K is materialized (MLA: nope + rope)
    v_head_dim: int
    params_total: int  # main model, MTP excluded
    params_active: int  # per token, embedding included (DeepSeek's convention for "37B activated")
    lookup_params: int  # embedding rows looked up, not multiplied (0 when tied to the output head)
    native_attention: str  # "mla", "mha", "mqa" or "gqa:N"
    kv_lora_rank: int = 0  # MLA only
    qk_rope_head_dim: int = 0
    n_moe_layers: int = 0
    n_routed_experts: int = 0
    n_activated_experts: int = 0
    expert_params: int = 0  # one routed expert of one layer
    hidden_size: int = 0  # d: the width of what expert-parallel all-to-alls send (0 = unknown)
    n_shared_experts: int = 0

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def matmul_params_active(self) -> int:
        return self.params_active - self.lookup_params

    @property
    def routed_params(self) -> int:
        return self.n_moe_layers * self.n_routed_experts * self.expert_params


def from_model_config(cfg: ModelConfig, name: str = "model") -> CostModel:
    counts = cfg.param_counts()
    moe = cfg.n_moe_layers > 0
    return CostModel(
        name=name, n_layers=cfg.n_layers, n_heads=cfg.n_heads, qk_head_dim=cfg.qk_head_dim,
        v_head_dim=cfg.v_head_dim, params_total=counts["total"], params_active=counts["active"],
        lookup_params=counts["embed"], native_attention="mla", kv_lora_rank=cfg.kv_lora_rank,
        qk_rope_head_dim=cfg.qk_rope_head_dim, n_moe_layers=cfg.n_moe_layers,
        n_routed_experts=cfg.n_routed_experts if moe else 0, n_activated_experts=cfg.n_activated_experts if moe else 0,
        expert_params=counts["expert"] if moe else 0, hidden_size=cfg.dim,
        n_shared_experts=cfg.n_shared_experts if moe else 0)


def _require(d: dict, keys: tuple[str, ...], what: str) -> None:
    missing = [k for k in keys if d.get(k) in (None, "")]
    if missing:
        raise ConfigError(f"{what} config.json lacks required field(s): {', '.join(missing)}")


def deepseek_hf_to_model_config(d: dict) -> ModelConfig:
    """transformers DeepSeek-V2/V3 config.json -> ModelConfig, shapes only. Unlike `nanoseek.hf.config_from_hf`
    this accepts V2's softmax gating and any RoPE scaling, since neither changes a cost, and needs no torch."""
    _require(d, ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                 "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"), str(d.get("model_type")))
    if (d.get("moe_layer_freq") or 1) != 1:
        raise ConfigError(f"moe_layer_freq={d['moe_layer_freq']} is not supported (every layer after "
                          "first_k_dense_replace must be MoE)")
    n_layers = d["num_hidden_layers"]
    n_routed = d.get("n_routed_experts") or 0
    max_len = d.get("max_position_embeddings") or 4096
    cfg = ModelConfig(
        vocab_size=d["vocab_size"], dim=d["hidden_size"], inter_dim=d.get("intermediate_size") or 0,
        moe_inter_dim=d.get("moe_intermediate_size") or 0, n_layers=n_layers,
        n_dense_layers=min(d.get("first_k_dense_replace") or 0, n_layers) if n_routed else n_layers,
        n_heads=d["num_attention_heads"], n_routed_experts=n_routed, n_shared_experts=d.get("n_shared_experts") or 0,
        n_activated_experts=d.get("num_experts_per_tok") or 1, n_expert_groups=d.get("n_group") or 1,
        n_limited_groups=d.get("topk_group") or 1,
        score_func="softmax" if d.get("scoring_func") == "softmax" else "sigmoid",
        q_lora_rank=d.get("q_lora_rank") or 0, kv_lora_rank=d["kv_lora_rank"],
        qk_nope_head_dim=d["qk_nope_head_dim"], qk_rope_head_dim=d["qk_rope_head_dim"],
        v_head_dim=d["v_head_dim"], max_seq_len=max_len, original_seq_len=max_len,
        n_mtp=d.get("num_nextn_predict_layers") or 0)
    return cfg.validate()


def _gqa_kind(n_heads: int, n_kv: int) -> str:
    return "mha" if n_kv == n_heads else "mqa" if n_kv == 1 else f"gqa:{n_kv}"


def from_gqa_hf_config(d: dict, name: str = "model") -> CostModel:
    """Llama/Qwen/Mistral-style config.json (dense, or MoE with num_local_experts / num_experts) -> CostModel.
    Counts q/k/v/o projections (+ q/k/v biases for Qwen2 or attention_bias, q/k norms for Qwen3), SwiGLU
    FFNs, RMSNorms, router and an optional Qwen2-MoE shared expert."""
    _require(d, ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"),
             str(d.get("model_type", "GQA")))
    h, n_layers, n_heads, vocab = d["hidden_size"], d["num_hidden_layers"], d["num_attention_heads"], d["vocab_size"]
    n_kv = d.get("num_key_value_heads") or n_heads
    hd = d.get("head_dim") or h // n_heads
    if min(h, n_layers, n_heads, vocab, n_kv, hd) <= 0 or n_heads % n_kv:
        raise ConfigError(f"config.json has inconsistent attention shapes "
                          f"(heads={n_heads}, kv heads={n_kv}, head_dim={hd})")
    model_type = str(d.get("model_type", ""))
    attn = h * n_heads * hd + 2 * h * n_kv * hd + n_heads * hd * h
    if d.get("attention_bias") or model_type in ("qwen2", "qwen2_moe"):
        attn += n_heads * hd + 2 * n_kv * hd
    if model_type.startswith("qwen3"):
        attn += 2 * hd
    n_experts = d.get("num_local_experts") or d.get("num_experts") or 0
    if n_experts:
        if (d.get("decoder_sparse_step") or 1) != 1 or d.get("mlp_only_layers"):
            raise ConfigError("MoE configs with dense layers (decoder_sparse_step / mlp_only_layers) are not supported")
        k = d.get("num_experts_per_tok") or 2
        expert = 3 * h * (d.get("moe_intermediate_size") or d["intermediate_size"])
        shared_inter = d.get("shared_expert_intermediate_size") or 0
        shared = 3 * h * shared_inter + (h if shared_inter else 0)  # + Qwen2-MoE's shared_expert_gate
        ffn_total, ffn_active = n_experts * expert + shared + n_experts * h, k * expert + shared + n_experts * h
    else:
        k, expert = 0, 0
        ffn_total = ffn_active = 3 * h * d["intermediate_size"]
    tied = bool(d.get("tie_word_embeddings", False))
    embed, head = vocab * h, 0 if tied else vocab * h
    per_layer_fixed = attn + 2 * h
    total = embed + head + n_layers * (per_layer_fixed + ffn_total) + h
    active = embed + head + n_layers * (per_layer_fixed + ffn_active) + h
    return CostModel(name=name, n_layers=n_layers, n_heads=n_heads, qk_head_dim=hd, v_head_dim=hd,
                     params_total=total, params_active=active, lookup_params=0 if tied else embed,
                     native_attention=_gqa_kind(n_heads, n_kv), n_moe_layers=n_layers if n_experts else 0,
                     n_routed_experts=n_experts, n_activated_experts=k, expert_params=expert, hidden_size=h,
                     n_shared_experts=1 if n_experts and d.get("shared_expert_intermediate_size") else 0)


def from_hf_config(d: dict, name: str = "model") -> CostModel:
    if d.get("model_type") in ("deepseek_v3", "deepseek_v2"):
        return from_model_config(deepseek_hf_to_model_config(d), name)
    return from_gqa_hf_config(d, name)


def read_json_object(path: str | Path, what: str) -> dict:
    """The JSON object in file `path`; a missing file, bad JSON or a non-object is one ConfigError naming `what`."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what} is not valid JSON ({path}): {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{what} must be a JSON object: {path}")
    return d


def load_model(preset: str | None = None, config: str | Path | None = None) -> CostModel:
    """A preset name, or a JSON file that is either a nanoseek ModelConfig or a transformers config.json."""
    if config is None:
        return from_model_config(ModelConfig.preset(preset or "v3-671b"), preset or "v3-671b")
    path = Path(config)
    d = read_json_object(path, "model config")
    name = path.parent.name if path.name == "config.json" and path.parent.name else path.stem
    if "hidden_size" in d or "model_type" in d:
        return from_hf_config(d, name)
    return from_model_config(ModelConfig.from_dict(d), name)
