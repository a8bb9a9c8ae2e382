"""Serving-cost model ("tokenomics"): memory, speed and dollars of serving a model, from its shapes and a
GPU datasheet. Pure arithmetic; no torch.

A model for costing (`CostModel`, cost_model.py) is built from a nanoseek `ModelConfig` (a preset or a config JSON) or
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
import math
from dataclasses import dataclass, field

from nanoseek.config import ConfigError
from nanoseek.tokenomics.cost_model import (  # noqa: F401  (re-exported: the model side of the cost)
    CostModel, deepseek_hf_to_model_config, from_gqa_hf_config, from_hf_config, from_model_config, load_model,
    read_json_object,
)



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
