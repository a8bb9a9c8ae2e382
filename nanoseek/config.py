"""Model configuration: one dataclass, a few size presets, JSON round trip, parameter counting.

Field names follow the DeepSeek-V3 reference `ModelArgs` (inference/model.py). The presets `v2-lite-16b`
and `v3-671b` are shapes only: they feed parameter counts and the serving-cost model, and are never
instantiated on a laptop.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path


class ConfigError(ValueError):
    """A user-fixable configuration problem; the CLI prints it as one line."""


@dataclass
class ModelConfig:
    vocab_size: int = 512
    dim: int = 128
    inter_dim: int = 384  # dense SwiGLU hidden size (first n_dense_layers)
    moe_inter_dim: int = 128  # hidden size of each routed / shared expert
    n_layers: int = 4
    n_dense_layers: int = 1
    n_heads: int = 4
    # MoE
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    n_activated_experts: int = 2
    n_expert_groups: int = 1
    n_limited_groups: int = 1
    score_func: str = "sigmoid"  # "sigmoid" (V3) or "softmax" (V2)
    route_scale: float = 1.0
    # normalize the K selected affinities to sum 1 (before route_scale); None = the scoring function's own
    # default: True for sigmoid (V3), False for softmax (V2). transformers' `norm_topk_prob`.
    norm_topk_prob: bool | None = None
    # MLA
    q_lora_rank: int = 0  # 0 = a single full-rank W_Q
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    # RoPE / YaRN (YaRN is active when rope_factor > 1)
    max_seq_len: int = 256
    original_seq_len: int = 256
    rope_theta: float = 10000.0
    rope_factor: float = 1.0
    beta_fast: int = 32
    beta_slow: int = 1
    mscale: float = 1.0
    # Multi-token prediction depth D (0 = none)
    n_mtp: int = 1
    norm_eps: float = 1e-6
    init_std: float = 0.006
    fp8: bool = False  # simulate FP8 fine-grained (1x128 / 128x128) quantized matmuls
    # DeepSeek Sparse Attention (V3.2-Exp, model/indexer.py), transformers' names: each query attends to the
    # index_topk earlier tokens its lightning indexer scores highest. index_topk = 0: dense attention.
    index_n_heads: int = 0
    index_head_dim: int = 0
    index_topk: int = 0

    # ---- derived -------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def normalizes_topk(self) -> bool:
        """Whether the gate renormalizes the selected affinities (norm_topk_prob resolved)."""
        return self.score_func == "sigmoid" if self.norm_topk_prob is None else self.norm_topk_prob

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.n_dense_layers if self.n_routed_experts > 0 else 0

    @property
    def sparse_attention(self) -> bool:
        return self.index_topk > 0

    @property
    def kv_cache_numbers_per_token_layer(self) -> int:
        """MLA caches only the normalized latent c_KV and the shared rope key (plus, with sparse attention, the
        indexer's key: V3.2's indexer cache, kept in the same row)."""
        return self.kv_lora_rank + self.qk_rope_head_dim + (self.index_head_dim if self.sparse_attention else 0)

    @property
    def softmax_scale(self) -> float:
        scale = self.qk_head_dim ** -0.5
        if self.rope_factor > 1:
            m = 0.1 * self.mscale * math.log(self.rope_factor) + 1.0
            scale = scale * m * m
        return scale

    # ---- validation ----------------------------------------------------------------------
    def validate(self) -> "ModelConfig":
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        for name in ("vocab_size", "dim", "n_layers", "n_heads", "kv_lora_rank", "qk_rope_head_dim",
                     "v_head_dim", "max_seq_len", "original_seq_len"):
            need(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        need(self.qk_rope_head_dim % 2 == 0, f"qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        need(0 <= self.n_dense_layers <= self.n_layers,
             f"n_dense_layers must be within [0, n_layers={self.n_layers}], got {self.n_dense_layers}")
        need(self.q_lora_rank >= 0 and self.n_mtp >= 0, "q_lora_rank and n_mtp must be >= 0")
        need(self.score_func in ("sigmoid", "softmax"), f"score_func must be sigmoid or softmax, got {self.score_func!r}")
        need(self.norm_topk_prob in (None, True, False), f"norm_topk_prob must be true, false or null, got {self.norm_topk_prob!r}")
        if self.n_routed_experts > 0 and self.n_dense_layers < self.n_layers:
            need(self.moe_inter_dim > 0, "moe_inter_dim must be positive")
            need(1 <= self.n_activated_experts <= self.n_routed_experts,
                 f"n_activated_experts must be in [1, n_routed_experts={self.n_routed_experts}], got {self.n_activated_experts}")
            need(self.n_expert_groups >= 1 and self.n_routed_experts % self.n_expert_groups == 0,
                 f"n_routed_experts ({self.n_routed_experts}) must be divisible by n_expert_groups ({self.n_expert_groups})")
            need(1 <= self.n_limited_groups <= self.n_expert_groups,
                 f"n_limited_groups must be in [1, n_expert_groups={self.n_expert_groups}], got {self.n_limited_groups}")
            per_group = self.n_routed_experts // self.n_expert_groups
            need(per_group * self.n_limited_groups >= self.n_activated_experts,
                 "n_limited_groups groups must hold at least n_activated_experts experts")
            if self.n_expert_groups > 1:
                need(per_group >= 2, "group-limited routing needs at least 2 experts per group (top-2 group score)")
        if self.n_dense_layers > 0:
            need(self.inter_dim > 0, "inter_dim must be positive when there are dense layers")
        need(self.rope_factor >= 1, f"rope_factor must be >= 1, got {self.rope_factor}")
        need(min(self.index_topk, self.index_n_heads, self.index_head_dim) >= 0, "index_* fields must be >= 0")
        if self.sparse_attention:
            need(self.q_lora_rank > 0, "sparse attention (index_topk > 0) needs q_lora_rank > 0: the indexer's "
                                       "queries come from MLA's query latent (as in DeepSeek-V3.2)")
            need(self.index_n_heads > 0, "sparse attention (index_topk > 0) needs index_n_heads > 0")
            need(self.index_head_dim >= self.qk_rope_head_dim,
                 f"index_head_dim ({self.index_head_dim}) must be >= qk_rope_head_dim ({self.qk_rope_head_dim}): "
                 "the indexer's rope part is its first qk_rope_head_dim numbers")
        return self

    # ---- JSON ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown model config field(s): {', '.join(unknown)}")
        return cls(**d).validate()

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            from nanoseek.io import atomic_write_text
            atomic_write_text(path, text + "\n")
        return text

    @classmethod
    def from_json(cls, path_or_text: str | Path) -> "ModelConfig":
        p = Path(path_or_text)
        try:
            text = p.read_text() if (isinstance(path_or_text, Path) or not str(path_or_text).lstrip().startswith("{")) else str(path_or_text)
        except FileNotFoundError:
            raise ConfigError(f"model config not found: {path_or_text}") from None
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise ConfigError(f"model config is not valid JSON ({path_or_text}): {e}") from None

    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides).validate()

    # ---- counting ------------------------------------------------------------------------
    def param_counts(self) -> dict[str, int]:
        """Parameters by part, plus `total` and `active` (per token) for the main model (MTP excluded)
        and `mtp` for the MTP modules (their embedding and head are shared, so not counted again)."""
        d = self.dim
        if self.q_lora_rank > 0:
            q = d * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * self.n_heads * self.qk_head_dim
        else:
            q = d * self.n_heads * self.qk_head_dim
        kv = (d * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
              + self.kv_lora_rank * self.n_heads * (self.qk_nope_head_dim + self.v_head_dim))
        attn = q + kv + self.n_heads * self.v_head_dim * d
        indexer = 0
        if self.sparse_attention:  # wq_b, wk, k_norm (LayerNorm weight + bias), weights_proj
            idx_h, idx_d = self.index_n_heads, self.index_head_dim
            indexer = self.q_lora_rank * idx_h * idx_d + d * idx_d + 2 * idx_d + d * idx_h
        norms = 2 * d
        dense_ffn = 3 * d * self.inter_dim
        expert = 3 * d * self.moe_inter_dim
        gate = self.n_routed_experts * d
        moe_total = (self.n_routed_experts + self.n_shared_experts) * expert + gate
        moe_active = (self.n_activated_experts + self.n_shared_experts) * expert + gate
        n_moe = self.n_moe_layers
        n_dense = self.n_layers - n_moe
        embed = self.vocab_size * d
        head = self.vocab_size * d
        layers_total = self.n_layers * (attn + indexer + norms) + n_dense * dense_ffn + n_moe * moe_total
        layers_active = self.n_layers * (attn + indexer + norms) + n_dense * dense_ffn + n_moe * moe_active
        total = embed + layers_total + d + head
        # Per-token activated parameters: the embedding row lookup is not a matmul, V3's 37B counts it anyway
        # (DeepSeek's figure includes embedding and head), so we do too.
        active = embed + layers_active + d + head
        mtp_block = attn + indexer + norms + (moe_total if n_moe else dense_ffn)
        mtp = self.n_mtp * (2 * d + 2 * d * d + mtp_block + d)
        return {"embed": embed, "head": head, "attention_per_layer": attn,
                "indexer_per_layer": indexer, "dense_ffn_per_layer": dense_ffn,
                "moe_per_layer": moe_total if n_moe else 0, "expert": expert,
                "total": total, "active": active, "mtp": mtp, "total_with_mtp": total + mtp}


PRESETS: dict[str, ModelConfig] = {
    # ~2M parameters: trains on a laptop CPU in minutes. init_std 0.02 rather than V3's 0.006 (chosen for
    # d=7168): at d=128 the small init left the demo base at 34.5% greedy after 1000 steps, 0.02 gave 77%
    # (held-out CE 0.434 -> 0.397; docs/pretrain.md).
    "tiny": ModelConfig(init_std=0.02),
    "small": ModelConfig(init_std=0.02, vocab_size=4096, dim=384, inter_dim=1024, moe_inter_dim=256, n_layers=8, n_dense_layers=1,
                         n_heads=6, n_routed_experts=16, n_shared_experts=1, n_activated_experts=4, n_expert_groups=4,
                         n_limited_groups=2, route_scale=1.0, q_lora_rank=192, kv_lora_rank=128, qk_nope_head_dim=48,
                         qk_rope_head_dim=16, v_head_dim=48, max_seq_len=1024, original_seq_len=1024),
    # Dense students for distillation (R1 sec. 2.4 distils into dense Qwen/Llama models): MLA kept, every layer
    # a dense SwiGLU, no routed experts, no MTP (optional: pass n_mtp=1). tiny-dense has tiny's shape with
    # inter_dim 384 = tiny's activated FFN width (2 routed + 1 shared experts of 128), so it matches tiny's
    # activated parameters per token and has about half its total; small-dense likewise for small.
    "tiny-dense": ModelConfig(init_std=0.02, n_routed_experts=0, n_dense_layers=4, inter_dim=384, n_mtp=0),
    "small-dense": ModelConfig(init_std=0.02, vocab_size=4096, dim=384, inter_dim=1280, n_layers=8, n_dense_layers=8,
                               n_heads=6, n_routed_experts=0, q_lora_rank=192, kv_lora_rank=128,
                               qk_nope_head_dim=48, qk_rope_head_dim=16, v_head_dim=48, max_seq_len=1024,
                               original_seq_len=1024, n_mtp=0),
    # DeepSeek-V2-Lite (arXiv 2405.04434): 15.7B total, 2.4B active; softmax gating, no q low-rank.
    "v2-lite-16b": ModelConfig(vocab_size=102400, dim=2048, inter_dim=10944, moe_inter_dim=1408, n_layers=27,
                               n_dense_layers=1, n_heads=16, n_routed_experts=64, n_shared_experts=2,
                               n_activated_experts=6, n_expert_groups=1, n_limited_groups=1, score_func="softmax",
                               route_scale=1.0, q_lora_rank=0, kv_lora_rank=512, qk_nope_head_dim=128,
                               qk_rope_head_dim=64, v_head_dim=128, max_seq_len=163840, original_seq_len=4096,
                               rope_factor=40, n_mtp=0, mscale=0.707),
    # DeepSeek-V3 (arXiv 2412.19437, config_671B.json of the reference code).
    "v3-671b": ModelConfig(vocab_size=129280, dim=7168, inter_dim=18432, moe_inter_dim=2048, n_layers=61,
                           n_dense_layers=3, n_heads=128, n_routed_experts=256, n_shared_experts=1,
                           n_activated_experts=8, n_expert_groups=8, n_limited_groups=4, route_scale=2.5,
                           q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                           v_head_dim=128, max_seq_len=163840, original_seq_len=4096, rope_factor=40, n_mtp=1),
}

