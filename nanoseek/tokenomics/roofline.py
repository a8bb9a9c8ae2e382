"""Serving-cost model ("tokenomics"): memory, speed and dollars of serving a model, from its shapes and a
GPU datasheet. Pure arithmetic; no torch.

A model for costing (`CostModel`) is built from a nanoseek `ModelConfig` (a preset or a config JSON) or
from a transformers `config.json` (DeepSeek-V2/V3 via `model_type`, or a Llama/Qwen/Mistral-style GQA
model, dense or MoE). It runs on one replica of `gpus` identical GPUs serving `batch` sequences that each
hold `context` tokens of KV cache.

Formulas (b_w, b_kv: bytes per weight / cached number; G GPUs; B batch; C context):
- KV numbers per token per layer: MLA `kv_lora_rank + qk_rope_head_dim` (the latent c_KV and the shared
  rope key, DeepSeek-V2 sec. 2.1); MHA/GQA/MQA `n_kv x (d_k + d_v)` with n_kv = n_heads / N / 1.
  For an MLA model overridden to MHA/GQA/MQA, d_k = qk_head_dim (nope + rope, 192 in V3) and
  d_v = v_head_dim (128 in V3): the per-head shapes that the MLA model materializes in its naive path.
  KV bytes per token = n_layers x numbers x b_kv.
- Memory: room for KV = G x (HBM x mem_fraction - workspace) - params_total x b_w;
  max concurrent sequences = floor(room / (KV bytes per token x C)).
- Decode step (B tokens, roofline): bytes = weights read + B x C x KV bytes per token;
  t_mem = bytes / (G x HBM bandwidth x mbu).
  FLOPs = B x 2 x matmul params (active, without the embedding lookup) at the weight dtype's peak
        + B x n_layers x C x attention FLOPs per cached position at the cache dtype's peak;
  t_compute = FLOPs / (G x peak x mfu). Step = max(t_mem, t_compute); `bound` names the larger.
  Attention FLOPs per cached position and layer: MLA decode is the absorbed form, scores over
  kv_lora_rank + rope and values over kv_lora_rank for every query head: 2 n_h (2 kv_lora_rank + rope);
  MHA/GQA/MQA: 2 n_h (d_k + d_v) (GQA shares K/V across heads but every query head still multiplies).
- MoE weights read per step: the dense part (attention, dense FFNs, shared experts, router, head) plus,
  per MoE layer, the experts that the step's tokens touch. Under uniform routing a token picks K of E
  experts, so one expert stays untouched by T tokens with probability (1 - K/E)^T and the expected number
  of distinct experts is E (1 - (1 - K/E)^T) (`expected_distinct_experts`).
- Prefill of the batch (B x C tokens): same roofline with T = B x C tokens; attention is the naive path
  (MLA decompresses K and V per head): 2 n_h (d_k + d_v) per (query, key) pair, C (C + 1) / 2 pairs causal.
- Cost: GPU-hour = capex annuity (capex x r / (1 - (1 + r)^-years), or capex / years at r = 0) / 8766 h
  + power (W x PUE / 1000 x $/kWh) + hosting. $ per million tokens = GPU-hour / (tokens/s per GPU x 3600
  x load) x 1e6; output tokens are priced at decode speed and input tokens at prefill speed, each as if
  the GPUs did only that phase.

Simplifications, on purpose:
- The attention override changes only the KV cache (its bytes, and attention FLOPs); weights stay those
  of the model, so MLA vs GQA vs MHA is compared at equal parameters and only the cache differs.
- Every sequence holds the full `context` during decode (the worst case of a sequence growing to C);
  `cost_per_answer` integrates over a growing context instead.
- Weights are split evenly over the GPUs (TP/EP) and communication is free (`deployment` models expert-
  parallel units with their all-to-all traffic, and reduces to this model for one GPU); MTP modules are not served
  (params exclude them); FP8 block scales and KV quantization scales are not counted; the embedding is a
  lookup (not read in full, no FLOPs) unless tied to the output head.
- GPU memory is the datasheet figure in decimal GB; FLOP/s are dense (no sparsity). An A100 has no FP8
  tensor cores: FP8 weights there are stored in FP8 and multiplied at the BF16 rate.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from nanoseek.config import ConfigError, ModelConfig

DTYPE_BYTES: dict[str, int] = {"bf16": 2, "fp8": 1}
HOURS_PER_YEAR = 8766.0  # 365.25 days
GB = 1e9
GIB = 2 ** 30


# ---- hardware --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GPUSpec:
    """Datasheet numbers of one GPU (dense tensor-core peaks), its links, and a rough all-in price.
    Link bandwidths are per GPU and per direction: scale-up is the NVLink share of one GPU (datasheet total,
    which counts both directions, halved), scale-out the node's NICs divided by its GPUs."""
    name: str
    hbm_bytes: float
    hbm_bw: float  # bytes/s
    bf16_flops: float
    fp8_flops: float
    tdp_w: float
    capex_usd: float  # default price per GPU including its share of the server (override with TCOInputs)
    source: str
    scaleup_bw: float = 0.0  # bytes/s per direction inside a node (NVLink); 0 = none
    scaleout_bw: float = 0.0  # bytes/s per direction to other nodes (InfiniBand / RoCE); 0 = none
    link_source: str = ""

    def peak_flops(self, dtype: str) -> float:
        return self.fp8_flops if dtype == "fp8" else self.bf16_flops


_IB_8X400 = "8 x ConnectX-7 400 Gb/s per 8-GPU node: 50 GB/s per GPU"
GPUS: dict[str, GPUSpec] = {
    "h100": GPUSpec("H100 SXM5 80GB", 80 * GB, 3.35e12, 989.4e12, 1978.9e12, 700, 45_000,
                    "NVIDIA H100 Tensor Core GPU datasheet (SXM5: 80 GB HBM3, 3.35 TB/s, BF16 1,979 / FP8 3,958 "
                    "TFLOP/s with sparsity, halved here; up to 700 W); capex: SPEC sec. 4, 40-50k USD all-in",
                    450 * GB, 50 * GB, f"datasheet NVLink 900 GB/s (both directions); DGX H100 {_IB_8X400}"),
    "h800": GPUSpec("H800 SXM5 80GB", 80 * GB, 3.35e12, 989.4e12, 1978.9e12, 700, 45_000,
                    "H100 SXM5 compute and HBM (DeepSeek-V3 report sec. 3.1; DeepEP README); capex assumed equal "
                    "to the H100's",
                    200 * GB, 50 * GB, "NVLink cut to 400 GB/s (both directions), DeepEP measures ~160 GB/s; "
                    "DeepSeek's nodes: one CX7 400 Gb/s InfiniBand NIC per GPU, ~50 GB/s (DeepEP README, "
                    "V3 report sec. 3.2.2)"),
    "h200": GPUSpec("H200 SXM 141GB", 141 * GB, 4.8e12, 989.4e12, 1978.9e12, 700, 55_000,
                    "NVIDIA H200 Tensor Core GPU datasheet (SXM: 141 GB HBM3e, 4.8 TB/s, same tensor cores as "
                    "H100 SXM, up to 700 W); capex: H100 estimate plus the memory premium",
                    450 * GB, 50 * GB, f"datasheet NVLink 900 GB/s (both directions); HGX H200 with {_IB_8X400}"),
    "h20": GPUSpec("H20 96GB", 96 * GB, 4.0e12, 148e12, 296e12, 400, 20_000,
                   "NVIDIA H20 (China-market Hopper; product-brief figures as reported by resellers: 96 GB HBM3, "
                   "4.0 TB/s, BF16 148 / FP8 296 TFLOP/s dense, 400 W); capex: rough estimate",
                   450 * GB, 50 * GB, f"NVLink 900 GB/s (both directions); scale-out assumed {_IB_8X400}"),
    "a100": GPUSpec("A100 SXM4 80GB", 80 * GB, 2.039e12, 312e12, 312e12, 400, 20_000,
                    "NVIDIA A100 Tensor Core GPU datasheet (SXM4 80 GB HBM2e, 2,039 GB/s, BF16 312 TFLOP/s dense, "
                    "400 W; no FP8 tensor cores, so FP8 = BF16 rate); capex: rough 2024-25 estimate",
                    300 * GB, 25 * GB, "datasheet NVLink 600 GB/s (both directions); DGX A100 8 x 200 Gb/s HDR "
                    "InfiniBand: 25 GB/s per GPU"),
    "b200": GPUSpec("B200 HGX 180GB", 180 * GB, 8.0e12, 2250e12, 4500e12, 1000, 65_000,
                    "NVIDIA HGX B200 datasheet (8 GPUs: 1.44 TB HBM3e, 64 TB/s, BF16 36 / FP8 72 PFLOP/s sparse, "
                    "i.e. per GPU 180 GB, 8 TB/s, 2.25 / 4.5 PFLOP/s dense; 1,000 W); capex: rough estimate",
                    900 * GB, 50 * GB, f"NVLink 5: 1.8 TB/s per GPU (both directions); DGX B200 {_IB_8X400}"),
}


def resolve_gpu(gpu: str | GPUSpec) -> GPUSpec:
    if isinstance(gpu, GPUSpec):
        return gpu
    key = str(gpu).lower()
    if key not in GPUS:
        raise ConfigError(f"unknown GPU {gpu!r}; choose one of: {', '.join(GPUS)}")
    return GPUS[key]


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


# ---- attention kinds ---------------------------------------------------------------------------------
def normalize_attention(model: CostModel, attention: str | None) -> str:
    """'mla' | 'mha' | 'mqa' | 'gqa:N' (None = the model's own), checked against the model's heads."""
    if attention is None:
        return model.native_attention
    a = attention.strip().lower()
    if a == "mla":
        if not model.is_mla:
            raise ConfigError(f"--attention mla needs an MLA model (DeepSeek-V2/V3 shapes); {model.name} is "
                              f"{model.native_attention}")
        return a
    if a in ("mha", "mqa"):
        return a
    if a.startswith("gqa:"):
        try:
            n = int(a[4:])
        except ValueError:
            raise ConfigError(f"gqa needs a number of KV heads, e.g. gqa:8; got {attention!r}") from None
        if not (1 <= n <= model.n_heads and model.n_heads % n == 0):
            raise ConfigError(f"gqa:{n} needs a divisor of n_heads={model.n_heads}")
        return f"gqa:{n}"
    raise ConfigError(f"unknown attention {attention!r}; choose mla, mha, mqa or gqa:N")


def kv_heads(model: CostModel, attention: str) -> int:
    return {"mha": model.n_heads, "mqa": 1}.get(attention) or int(attention.split(":")[1])


def kv_numbers_per_token_layer(model: CostModel, attention: str) -> int:
    if attention == "mla":
        return model.kv_lora_rank + model.qk_rope_head_dim
    return kv_heads(model, attention) * (model.qk_head_dim + model.v_head_dim)


def attention_flops_per_position(model: CostModel, attention: str, phase: str) -> int:
    """FLOPs of one query against one cached position in one layer (scores + weighted values)."""
    if attention == "mla" and phase == "decode":
        return 2 * model.n_heads * (2 * model.kv_lora_rank + model.qk_rope_head_dim)
    return 2 * model.n_heads * (model.qk_head_dim + model.v_head_dim)


def expected_distinct_experts(n_experts: int, k: int, tokens: float, slots: float | None = None) -> float:
    """E (1 - (1 - K/E)^T): experts that T tokens touch in one layer under uniform top-K routing; with `slots`,
    how many of that many expert slots are touched (each holds one expert, touched with probability
    1 - (1 - K/E)^T)."""
    if n_experts <= 0:
        return 0.0
    return (n_experts if slots is None else slots) * (1.0 - (1.0 - k / n_experts) ** tokens)


def weight_bytes_read(model: CostModel, tokens: float, weight_bytes: int, slots: int | None = None) -> float:
    """Bytes of weights one forward over `tokens` tokens reads: dense part + the experts they touch (of `slots`
    expert slots per MoE layer on this GPU; default: all E experts, one GPU)."""
    dense = model.params_total - model.lookup_params - model.routed_params
    touched = model.n_moe_layers * expected_distinct_experts(model.n_routed_experts, model.n_activated_experts,
                                                             tokens, slots) * model.expert_params
    return (dense + touched) * weight_bytes


@dataclass(frozen=True)
class StepTimes:
    """The roofline of one forward, split into its parts (seconds)."""

    memory_parts_s: dict[str, float]  # 'weights', 'kv'
    compute_parts_s: dict[str, float]  # 'matmul', 'attention'

    @property
    def memory_s(self) -> float:
        return sum(self.memory_parts_s.values())

    @property
    def compute_s(self) -> float:
        return sum(self.compute_parts_s.values())


def step_times(model: CostModel, sc: Scenario, attention: str, phase: str, tokens: float, positions: float,
               weight_bytes: float, kv_bytes: float, gpus: int = 1) -> StepTimes:
    """The one roofline formula (module docstring), used by `evaluate` and by `deployment`: a forward over
    `tokens` new tokens that each attend to `positions` positions on average, reading `weight_bytes` of
    weights and `kv_bytes` of cache, on `gpus` GPUs. Memory = bytes / (G x HBM bandwidth x mbu); compute =
    (2 x matmul params x tokens at the weight dtype's peak + attention FLOPs at the cache dtype's peak) /
    (G x mfu)."""
    gpu = resolve_gpu(sc.gpu)
    bandwidth = gpus * gpu.hbm_bw * sc.mbu
    flops_w = tokens * 2 * model.matmul_params_active
    flops_kv = tokens * model.n_layers * positions * attention_flops_per_position(model, attention, phase)
    return StepTimes({"weights": weight_bytes / bandwidth, "kv": kv_bytes / bandwidth},
                     {"matmul": flops_w / gpu.peak_flops(sc.weight_dtype) / (gpus * sc.mfu),
                      "attention": flops_kv / gpu.peak_flops(sc.cache_dtype) / (gpus * sc.mfu)})


# ---- inputs ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TCOInputs:
    """Total cost of ownership per GPU. None = the GPU preset's capex / TDP."""
    capex_usd: float | None = None  # GPU plus its share of the server, network and install
    years: float = 4.0  # depreciation life
    cost_of_capital: float = 0.10  # per year
    power_w: float | None = None  # average draw per GPU
    pue: float = 1.3
    usd_per_kwh: float = 0.10
    hosting_usd_per_gpu_hour: float = 0.20  # colocation space, network, operations

    def validate(self) -> TCOInputs:
        for name in ("capex_usd", "power_w"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ConfigError(f"{name} must be positive, got {v}")
        if not self.years > 0:
            raise ConfigError(f"years must be positive, got {self.years}")
        if not self.pue >= 1:
            raise ConfigError(f"pue must be >= 1, got {self.pue}")
        for name in ("cost_of_capital", "usd_per_kwh", "hosting_usd_per_gpu_hour"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        return self


@dataclass(frozen=True)
class Scenario:
    """How the model is served: hardware, dtypes, load shape and utilization assumptions."""
    gpu: str | GPUSpec = "h200"
    gpus: int = 8
    attention: str | None = None  # None = the model's own
    weight_dtype: str = "fp8"
    cache_dtype: str = "bf16"
    context: int = 4096  # KV tokens held per sequence
    batch: int = 32  # concurrent sequences on the whole replica
    mfu: float = 0.5  # fraction of peak FLOP/s reached
    mbu: float = 0.7  # fraction of peak HBM bandwidth reached
    mem_fraction: float = 0.9  # HBM usable by the server (the rest: CUDA context, fragmentation)
    workspace_gib: float = 2.0  # activations and scratch per GPU
    load: float = 1.0  # fraction of hours the replica serves at this batch
    tco: TCOInputs = field(default_factory=TCOInputs)

    def validate(self) -> Scenario:
        resolve_gpu(self.gpu)
        for name in ("gpus", "context", "batch"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 1):
                raise ConfigError(f"{name} must be a positive integer, got {v}")
        for name in ("mfu", "mbu", "mem_fraction", "load"):
            v = getattr(self, name)
            if not 0 < v <= 1:
                raise ConfigError(f"{name} must be in (0, 1], got {v}")
        if not self.workspace_gib >= 0:
            raise ConfigError(f"workspace_gib must be >= 0, got {self.workspace_gib}")
        for name in ("weight_dtype", "cache_dtype"):
            if getattr(self, name) not in DTYPE_BYTES:
                raise ConfigError(f"{name} must be one of {', '.join(DTYPE_BYTES)}, got {getattr(self, name)!r}")
        self.tco.validate()
        return self


# ---- results -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryPlan:
    attention: str
    weight_bytes: float
    weight_bytes_per_gpu: float
    kv_bytes_per_token_layer: int
    kv_bytes_per_token: int
    kv_bytes_per_sequence: int
    kv_room_bytes: float
    max_concurrent_tokens: int
    max_concurrent_sequences: int


@dataclass(frozen=True)
class CostResult:
    model: str
    gpu: str
    gpus: int
    weight_dtype: str
    cache_dtype: str
    context: int
    batch: int
    params_total: int
    params_active: int
    memory: MemoryPlan
    attention: str
    kv_bytes_per_token: int
    max_concurrent_sequences: int
    experts_touched_per_layer: float | None  # decode step, of n_routed_experts
    decode_step_s: float
    decode_time_memory_s: float
    decode_time_compute_s: float
    bound: str  # "memory" or "compute": which roofline side sets the decode step
    decode_tokens_per_s: float  # per GPU
    decode_tokens_per_s_replica: float
    tokens_per_s_per_sequence: float  # what one user sees
    prefill_tokens_per_s: float  # per GPU
    prefill_bound: str
    tco: dict[str, float]  # USD per GPU-hour: capex, power, hosting, total; capex_share
    usd_per_mtok_output: float
    usd_per_mtok_input: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---- the model ---------------------------------------------------------------------------------------
def tco_per_gpu_hour(gpu: GPUSpec, tco: TCOInputs) -> dict[str, float]:
    """USD per GPU-hour by part. Capex is an annuity: equal yearly payments that repay it with interest."""
    capex, r, years = tco.capex_usd or gpu.capex_usd, tco.cost_of_capital, tco.years
    per_year = capex / years if r == 0 else capex * r / (1 - (1 + r) ** -years)
    parts = {"capex": per_year / HOURS_PER_YEAR,
             "power": (tco.power_w or gpu.tdp_w) * tco.pue / 1000 * tco.usd_per_kwh,
             "hosting": tco.hosting_usd_per_gpu_hour}
    total = sum(parts.values())
    return {**parts, "total": total, "capex_share": parts["capex"] / total}


def memory_plan(model: CostModel, sc: Scenario) -> MemoryPlan:
    """Where the HBM goes; raises ConfigError when the weights alone do not fit."""
    sc.validate()
    gpu, attention = resolve_gpu(sc.gpu), normalize_attention(model, sc.attention)
    weights = model.params_total * DTYPE_BYTES[sc.weight_dtype]
    usable_per_gpu = gpu.hbm_bytes * sc.mem_fraction - sc.workspace_gib * GIB
    room = sc.gpus * usable_per_gpu - weights
    if room <= 0:
        need = math.ceil(weights / usable_per_gpu) if usable_per_gpu > 0 else None
        fixes = [f"--gpus {need}" if need else "a smaller --workspace-gib", "a bigger --gpu"]
        fixes += ["--weight-dtype fp8"] if sc.weight_dtype != "fp8" else []
        hint = ", ".join(fixes[:-1]) + " or " + fixes[-1]
        raise ConfigError(f"{model.name} does not fit: {weights / GB:,.0f} GB of {sc.weight_dtype} weights, "
                          f"{sc.gpus} x {gpu.name} offer {sc.gpus * max(usable_per_gpu, 0) / GB:,.0f} GB usable; "
                          f"use {hint}")
    per_layer = kv_numbers_per_token_layer(model, attention) * DTYPE_BYTES[sc.cache_dtype]
    per_token = per_layer * model.n_layers
    max_tokens = int(room // per_token)
    return MemoryPlan(attention, weights, weights / sc.gpus, per_layer, per_token, per_token * sc.context, room,
                      max_tokens, max_tokens // sc.context)


def decode_step(model: CostModel, sc: Scenario, plan: MemoryPlan) -> tuple[float, float]:
    """(t_mem, t_compute) of one decode step on the replica: every sequence emits one token reading C cached
    tokens."""
    b, c = sc.batch, sc.context
    t = step_times(model, sc, plan.attention, "decode", b, c, weight_bytes_read(model, b, DTYPE_BYTES[sc.weight_dtype]),
                   b * c * plan.kv_bytes_per_token, sc.gpus)
    return t.memory_s, t.compute_s


def prefill_time(model: CostModel, sc: Scenario, plan: MemoryPlan) -> tuple[float, float]:
    """(t_mem, t_compute) of prefilling the whole batch of C-token prompts in one pass (causal: a token
    attends to (C + 1) / 2 positions on average)."""
    tokens = sc.batch * sc.context
    t = step_times(model, sc, plan.attention, "prefill", tokens, (sc.context + 1) / 2,
                   weight_bytes_read(model, tokens, DTYPE_BYTES[sc.weight_dtype]), tokens * plan.kv_bytes_per_token,
                   sc.gpus)
    return t.memory_s, t.compute_s


def usd_per_mtok(usd_per_gpu_hour: float, tokens_per_s_per_gpu: float, load: float) -> float:
    return usd_per_gpu_hour / (tokens_per_s_per_gpu * 3600 * load) * 1e6


def check_batch_fits(plan: MemoryPlan, sc: Scenario) -> None:
    if sc.batch > plan.max_concurrent_sequences:
        raise ConfigError(
            f"batch {sc.batch} does not fit: at context {sc.context:,} the {plan.kv_room_bytes / GB:,.0f} GB left for "
            f"the {plan.attention} KV cache hold {plan.max_concurrent_sequences} sequence(s); lower --batch or "
            f"--context, use --cache-dtype fp8, or add GPUs")


def evaluate(model: CostModel, sc: Scenario) -> CostResult:
    """Memory, roofline speed and cost of serving `model` under `sc`; ConfigError if it does not fit."""
    plan = memory_plan(model, sc)
    check_batch_fits(plan, sc)
    gpu = resolve_gpu(sc.gpu)
    t_mem, t_cmp = decode_step(model, sc, plan)
    step = max(t_mem, t_cmp)
    p_mem, p_cmp = prefill_time(model, sc, plan)
    decode_per_gpu = sc.batch / step / sc.gpus
    prefill_per_gpu = sc.batch * sc.context / max(p_mem, p_cmp) / sc.gpus
    tco = tco_per_gpu_hour(gpu, sc.tco)
    touched = (expected_distinct_experts(model.n_routed_experts, model.n_activated_experts, sc.batch)
               if model.n_moe_layers else None)
    return CostResult(
        model=model.name, gpu=gpu.name, gpus=sc.gpus, weight_dtype=sc.weight_dtype, cache_dtype=sc.cache_dtype,
        context=sc.context, batch=sc.batch, params_total=model.params_total, params_active=model.params_active,
        memory=plan, attention=plan.attention, kv_bytes_per_token=plan.kv_bytes_per_token,
        max_concurrent_sequences=plan.max_concurrent_sequences, experts_touched_per_layer=touched,
        decode_step_s=step, decode_time_memory_s=t_mem, decode_time_compute_s=t_cmp,
        bound="memory" if t_mem >= t_cmp else "compute", decode_tokens_per_s=decode_per_gpu,
        decode_tokens_per_s_replica=decode_per_gpu * sc.gpus, tokens_per_s_per_sequence=1 / step,
        prefill_tokens_per_s=prefill_per_gpu, prefill_bound="memory" if p_mem >= p_cmp else "compute", tco=tco,
        usd_per_mtok_output=usd_per_mtok(tco["total"], decode_per_gpu, sc.load),
        usd_per_mtok_input=usd_per_mtok(tco["total"], prefill_per_gpu, sc.load))


def cost_per_answer(model: CostModel, sc: Scenario, prompt_tokens: int, output_tokens: int,
                    segments: int = 16) -> dict[str, float]:
    """USD of one answer: the prompt at prefill price, then output tokens priced at the context they are
    generated at (midpoints of `segments` equal slices). The batch shrinks to what fits at the final
    context, which is why long reasoning costs more than linearly."""
    if prompt_tokens < 1 or output_tokens < 1:
        raise ConfigError("prompt_tokens and output_tokens must be positive")
    final = dataclasses.replace(sc, context=prompt_tokens + output_tokens, batch=1)
    batch = min(sc.batch, memory_plan(model, final).max_concurrent_sequences)
    if batch < 1:
        raise ConfigError(f"not one sequence of {final.context:,} tokens fits in the KV cache")
    def at(ctx: float):
        return evaluate(model, dataclasses.replace(sc, context=max(1, round(ctx)), batch=batch))

    input_usd = prompt_tokens * at(prompt_tokens).usd_per_mtok_input / 1e6
    width = output_tokens / segments
    output_usd = sum(width * at(prompt_tokens + (i + 0.5) * width).usd_per_mtok_output / 1e6 for i in range(segments))
    return {"usd": input_usd + output_usd, "input_usd": input_usd, "output_usd": output_usd, "batch": batch}


# ---- comparisons and sweeps --------------------------------------------------------------------------
def default_variants(model: CostModel) -> list[str]:
    """The model's own attention first, then MLA (if it has the shapes), GQA with 8 KV heads, MHA, MQA."""
    out = [model.native_attention]
    if model.is_mla:
        out.append("mla")
    if model.n_heads % 8 == 0 and model.n_heads > 8:
        out.append("gqa:8")
    out += ["mha", "mqa"]
    return list(dict.fromkeys(out))


@dataclass(frozen=True)
class Comparison:
    plan: MemoryPlan
    at_batch: CostResult | None  # None where the requested batch does not fit
    at_max_batch: CostResult | None  # at the largest batch that fits; None where not one sequence fits


def compare(model: CostModel, sc: Scenario, variants: list[str] | None = None) -> list[Comparison]:
    """Each attention variant at the requested batch and at the largest batch its KV cache allows: the
    second is where a smaller cache pays, since more sequences share each read of the weights."""
    rows = []
    for v in variants or default_variants(model):
        s = dataclasses.replace(sc, attention=v)
        plan = memory_plan(model, s)
        at_batch = evaluate(model, s) if sc.batch <= plan.max_concurrent_sequences else None
        at_max = (evaluate(model, dataclasses.replace(s, batch=plan.max_concurrent_sequences))
                  if plan.max_concurrent_sequences >= 1 else None)
        rows.append(Comparison(plan, at_batch, at_max))
    return rows


SWEEPS: dict[str, list[int]] = {
    "batch": [2 ** i for i in range(13)],
    "context": [2 ** i for i in range(9, 18)],
}


def sweep(model: CostModel, sc: Scenario, kind: str, variants: list[str] | None = None,
          values: list[int] | None = None) -> dict[str, list[CostResult]]:
    """variant -> results along `kind` ('batch' or 'context'), keeping only the points that fit."""
    if kind not in SWEEPS:
        raise ConfigError(f"unknown sweep {kind!r}; choose one of: {', '.join(SWEEPS)}")
    memory_plan(model, sc)  # the weights must fit before anything is swept
    out: dict[str, list[CostResult]] = {}
    for v in variants or default_variants(model):
        xs = list(values or SWEEPS[kind])
        if kind == "batch":  # end each curve at the variant's own largest batch
            cap = memory_plan(model, dataclasses.replace(sc, attention=v)).max_concurrent_sequences
            xs = sorted({x for x in xs if x <= cap} | ({cap} if 1 <= cap <= max(xs) else set()))
        points = []
        for x in xs:
            s = dataclasses.replace(sc, attention=v, **{kind: x})
            if s.batch <= memory_plan(model, s).max_concurrent_sequences:
                points.append(evaluate(model, s))
        out[v] = points
    return out


def plot_sweep(results: dict[str, list[CostResult]], kind: str, path: str | Path, title: str) -> Path:
    """Two panels, decode tokens/s per GPU and $ per million output tokens against `kind`, one line per
    attention variant; written atomically as PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nanoseek.io import atomic_write

    fig, (ax_t, ax_c) = plt.subplots(1, 2, figsize=(11, 4.2))
    for variant, points in results.items():
        xs = [getattr(r, kind) for r in points]
        label = variant if points else f"{variant} (does not fit)"
        ax_t.plot(xs, [r.decode_tokens_per_s for r in points], marker="o", ms=3, label=label)
        ax_c.plot(xs, [r.usd_per_mtok_output for r in points], marker="o", ms=3, label=label)
    for ax, ylabel in ((ax_t, "decode tokens/s per GPU"), (ax_c, "USD per million output tokens")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(kind)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(title="attention")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return path
