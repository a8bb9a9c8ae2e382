"""Disaggregated expert-parallel serving: prefill and decode units costed separately, with the network.

DeepSeek serves V3/R1 this way (DeepSeek-V3 report sec. 3.4; Open Source Week day 6, "DeepSeek-V3/R1
Inference System Overview"): a *unit* of N GPUs on N / g nodes (g GPUs per node) holds the E routed experts
of every MoE layer once, plus R redundant copies of hot experts (EP N, (E + R) / N expert slots per GPU),
while every GPU keeps its own copy of attention, dense FFNs, shared experts and head and serves its own
sequences (DP N). Prefill units and decode units are separate fleets.

Per GPU and per step (b_w, b_kv, b_disp, b_comb: bytes of a weight, a cached number, a dispatched and a
combined number; L layers of which L_moe MoE; K of E routed experts per token; d hidden size):
- Memory: weights = (params_total - routed params) + slots x L_moe x expert params, times b_w;
  KV room = HBM x mem_fraction - workspace - weights; decode sequences that fit = room / (KV bytes/token x C).
- Tokens per expert slot per step: each GPU sends T tokens x K picks and, balanced, receives as many,
  so a slot sees T K / slots tokens (`tokens_per_expert`).
- Roofline (the `roofline` module's formulas, per GPU): FLOPs = T x 2 x matmul params (active) + attention.
  Bytes = M x (dense weights + the slots' experts touched by one microbatch) + KV: with M microbatches each
  one reads the weights again (decode pays for the overlap in HBM traffic). An expert slot is touched by a
  microbatch of N T / M tokens in the unit with probability 1 - (1 - K/E)^(N T / M).
  Decode: T = b sequences at mean KV length C; prefill: T = a chunk of computed (cache-miss) prompt tokens;
  a prompt of P tokens with hit rate h has h P cached tokens, so a computed token attends to
  h P + ((1 - h) P + 1) / 2 positions on average and h / (1 - h) cached tokens per computed one are loaded.
  compute_time = FLOPs / (peak x mfu), memory_time = bytes / (HBM bandwidth x mbu), work = their max.
- All-to-all per token per MoE layer, bytes per copy: dispatch d b_disp (+ one fp32 scale per 128 numbers
  when FP8, as DeepEP sends), combine d b_comb. Copies, with experts spread evenly (1 / N of the routed
  load per GPU):
  * "direct" (DeepEP low-latency kernels, used for decode): each of the K picks travels point to point:
    K (g - 1) / N copies over NVLink, K (N - g) / N over InfiniBand, K / N stay on the GPU.
  * "hierarchical" (DeepEP normal kernels, used for prefill; V3 report sec. 3.2.2): one InfiniBand copy per
    remote node hosting a pick, sent to the GPU with the sender's in-node index, then NVLink copies to
    every other GPU hosting a pick. With q(f) = 1 - prod_{j<K} (E (1 - f) - j) / (E - j) the probability
    that a share f of the experts holds at least one pick: IB copies (N/g - 1) q(g/N), NVLink copies
    (N - N/g) q(1/N). Combine mirrors dispatch (partial sums reduced per node before crossing IB).
  comm_time = max(NVLink bytes / (scale-up bw x link_efficiency), IB bytes / (scale-out bw x
  link_efficiency)): each GPU sends and receives that much per direction, and the two links run
  concurrently.
- Overlap with M microbatches (dual microbatch: M = 2), stated: step = max(work, comm) + exposed, where
  exposed = min(work, comm) x ((1 - overlap_efficiency) + overlap_efficiency / (M x L_moe)), the second
  term being the first dispatch and the last combine of a step, which nothing hides. M = 1: work + comm.
- Decode batch per GPU: the largest that fits the KV room and (if set) keeps tokens/s per user at or
  above `min_user_tokens_per_s`; or a fixed `decode_batch`.
- Fleet: nodes needed = mean input tokens/s / prefill input tokens/s per node (cache hits included)
  + mean output tokens/s / decode tokens/s per node; USD per day = nodes x g x 24 x USD per GPU-hour
  (a lease price, or the TCO of `roofline.tco_per_gpu_hour`); revenue = tokens x prices;
  margin = revenue / cost - 1 (DeepSeek's "cost profit margin").

Simplifications, on purpose: routing is uniform and perfectly balanced (redundant experts and EPLB are
assumed to succeed; node-limited routing is not modelled); a redundant slot is touched with the probability
of its expert; routing metadata, TP inside attention, the MTP module and speculative decoding, scheduling
gaps, the on-disk cache's I/O and load below capacity (the load factor) are not modelled; links have one
bandwidth each (no latency term: DeepEP's low-latency timings are bandwidth-bound at these sizes).
With N = 1 (one GPU, no network) every number equals `roofline.evaluate` on one GPU.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from nanoseek.config import ConfigError
from nanoseek.tokenomics.roofline import (
    DTYPE_BYTES,
    GIB,
    CostModel,
    GPUSpec,
    Scenario,
    kv_numbers_per_token_layer,
    normalize_attention,
    read_json_object,
    resolve_gpu,
    step_times,
    tco_per_gpu_hour,
    weight_bytes_read,
)

SCHEMES = ("direct", "hierarchical")
FP8_SCALE_BLOCK = 128  # numbers per fp32 scale in an FP8 dispatch (DeepEP, V3 fine-grained quantization)
SECONDS_PER_DAY = 86_400.0


# ---- inputs ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PhasePlan:
    """One phase's deployment unit: EP = DP = `ep` GPUs."""
    ep: int = 1
    redundant_experts: int = 0  # extra expert slots for copies of hot experts, over the whole unit
    microbatches: int = 1  # 2 = dual-microbatch overlap of communication and computation
    scheme: str = "direct"  # all-to-all: "direct" (point to point) or "hierarchical" (IB to node, then NVLink)

    def validate(self, model: CostModel, gpus_per_node: int, phase: str) -> PhasePlan:
        if not (isinstance(self.ep, int) and self.ep >= 1):
            raise ConfigError(f"{phase} ep must be a positive integer, got {self.ep}")
        if not (isinstance(self.redundant_experts, int) and self.redundant_experts >= 0):
            raise ConfigError(f"{phase} redundant_experts must be a non-negative integer, got {self.redundant_experts}")
        if not (isinstance(self.microbatches, int) and 1 <= self.microbatches <= 16):
            raise ConfigError(f"{phase} microbatches must be an integer in [1, 16], got {self.microbatches}")
        if self.scheme not in SCHEMES:
            raise ConfigError(f"{phase} scheme must be one of {', '.join(SCHEMES)}, got {self.scheme!r}")
        if self.ep > gpus_per_node and self.ep % gpus_per_node:
            raise ConfigError(f"{phase} ep {self.ep} spans nodes of {gpus_per_node} GPUs: use a multiple of "
                              f"{gpus_per_node}")
        slots = model.n_routed_experts + self.redundant_experts
        if model.n_routed_experts and slots % self.ep:
            raise ConfigError(f"{phase}: {model.n_routed_experts} routed + {self.redundant_experts} redundant "
                              f"experts do not split evenly over ep {self.ep}")
        if not model.n_routed_experts and (self.ep > 1 or self.redundant_experts):
            raise ConfigError(f"{phase}: {model.name} has no routed experts; expert parallelism needs an MoE model")
        return self


@dataclass(frozen=True)
class Deployment:
    """Disaggregated serving of one model. `serving` supplies the GPU, dtypes, attention override, mean KV
    length per decoded token (`context`), utilizations and TCO; its `gpus` and `batch` are not used."""
    serving: Scenario = field(default_factory=lambda: Scenario(gpu="h800"))
    prefill: PhasePlan = field(default_factory=PhasePlan)
    decode: PhasePlan = field(default_factory=PhasePlan)
    gpus_per_node: int = 8
    prompt_tokens: int = 4096  # mean prompt length, cached prefix included
    prefix_cache_hit: float = 0.0  # fraction of prompt tokens served from the prefix (KV) cache
    prefill_chunk: int = 4096  # computed prompt tokens per GPU per prefill forward
    decode_batch: int | None = None  # sequences per GPU; None = the largest that fits (and meets the SLO)
    min_user_tokens_per_s: float = 0.0  # decode SLO; 0 = none
    link_efficiency: float = 0.8  # fraction of link bandwidth reached (DeepEP on H800: ~160 of 200 GB/s NVLink,
    #                               39-46 of 50 GB/s RDMA at EP 64-256)
    overlap_efficiency: float = 1.0  # share of min(work, comm) that the other microbatch hides
    dispatch_dtype: str = "fp8"
    combine_dtype: str = "bf16"
    usd_per_gpu_hour: float | None = None  # a lease price; None = the TCO of `serving.tco`

    def validate(self, model: CostModel) -> Deployment:
        self.serving.validate()
        for name in ("prefix_cache_hit", "min_user_tokens_per_s", "link_efficiency", "overlap_efficiency"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ConfigError(f"{name} must be a number, got {v!r}")
        if self.usd_per_gpu_hour is not None and (isinstance(self.usd_per_gpu_hour, bool)
                                                  or not isinstance(self.usd_per_gpu_hour, (int, float))):
            raise ConfigError(f"usd_per_gpu_hour must be a number, got {self.usd_per_gpu_hour!r}")
        if not (isinstance(self.gpus_per_node, int) and self.gpus_per_node >= 1):
            raise ConfigError(f"gpus_per_node must be a positive integer, got {self.gpus_per_node}")
        for name in ("prompt_tokens", "prefill_chunk"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 1):
                raise ConfigError(f"{name} must be a positive integer, got {v}")
        if self.decode_batch is not None and not (isinstance(self.decode_batch, int) and self.decode_batch >= 1):
            raise ConfigError(f"decode_batch must be a positive integer, got {self.decode_batch}")
        if not 0 <= self.prefix_cache_hit < 1:
            raise ConfigError(f"prefix_cache_hit must be in [0, 1), got {self.prefix_cache_hit}")
        for name in ("link_efficiency", "overlap_efficiency"):
            v = getattr(self, name)
            if not 0 < v <= 1:
                raise ConfigError(f"{name} must be in (0, 1], got {v}")
        if not self.min_user_tokens_per_s >= 0:
            raise ConfigError(f"min_user_tokens_per_s must be >= 0, got {self.min_user_tokens_per_s}")
        if self.usd_per_gpu_hour is not None and not self.usd_per_gpu_hour > 0:
            raise ConfigError(f"usd_per_gpu_hour must be positive, got {self.usd_per_gpu_hour}")
        for name in ("dispatch_dtype", "combine_dtype"):
            if getattr(self, name) not in DTYPE_BYTES:
                raise ConfigError(f"{name} must be one of {', '.join(DTYPE_BYTES)}, got {getattr(self, name)!r}")
        self.prefill.validate(model, self.gpus_per_node, "prefill")
        self.decode.validate(model, self.gpus_per_node, "decode")
        normalize_attention(model, self.serving.attention)
        return self


@dataclass(frozen=True)
class Traffic:
    """A day of tokens (or any period, scaled to a day by `seconds`)."""
    input_tokens: float
    cache_hit_tokens: float
    output_tokens: float
    seconds: float = SECONDS_PER_DAY

    @property
    def cache_hit_fraction(self) -> float:
        return self.cache_hit_tokens / self.input_tokens if self.input_tokens else 0.0

    def validate(self) -> Traffic:
        if not (self.input_tokens >= 0 and self.output_tokens >= 0 and 0 <= self.cache_hit_tokens <= self.input_tokens
                and self.seconds > 0):
            raise ConfigError("traffic needs input >= cache hits >= 0, output >= 0 tokens and a positive period")
        return self


@dataclass(frozen=True)
class Prices:
    """USD per million tokens."""
    input_cache_hit: float
    input_cache_miss: float
    output: float


# ---- communication -----------------------------------------------------------------------------------
def p_any_pick(n_experts: int, k: int, share: float) -> float:
    """Probability that a token's K distinct picks (of E experts) hit a set holding `share` of them:
    1 - prod_{j<K} (E (1 - share) - j) / (E - j) (hypergeometric, real-valued set size)."""
    if share >= 1:
        return 1.0
    miss = 1.0
    for j in range(k):
        miss *= max(n_experts * (1 - share) - j, 0.0) / (n_experts - j)
    return 1.0 - miss


def copies_per_token(model: CostModel, ep: int, gpus_per_node: int, scheme: str) -> dict[str, float]:
    """Expected copies of one token's hidden vector per MoE layer: {'local', 'nvlink', 'ib'}."""
    k, e = model.n_activated_experts, model.n_routed_experts
    if not model.n_moe_layers or ep == 1:
        return {"local": float(k if model.n_moe_layers else 0), "nvlink": 0.0, "ib": 0.0}
    g = min(gpus_per_node, ep)
    nodes = ep // g
    if scheme == "direct":
        return {"local": k / ep, "nvlink": k * (g - 1) / ep, "ib": k * (ep - g) / ep}
    q_gpu, q_node = p_any_pick(e, k, 1 / ep), p_any_pick(e, k, g / ep)
    return {"local": q_gpu, "nvlink": (ep - nodes) * q_gpu, "ib": (nodes - 1) * q_node}


def bytes_per_copy(model_dim: int, dispatch_dtype: str, combine_dtype: str) -> tuple[float, float]:
    """(dispatch, combine) bytes of one token copy: FP8 dispatch carries an fp32 scale per 128 numbers."""
    scales = math.ceil(model_dim / FP8_SCALE_BLOCK) * 4 if dispatch_dtype == "fp8" else 0
    return model_dim * DTYPE_BYTES[dispatch_dtype] + scales, model_dim * DTYPE_BYTES[combine_dtype]


@dataclass(frozen=True)
class CommPlan:
    scheme: str
    copies_per_token: dict[str, float]  # per MoE layer
    dispatch_bytes: float  # per GPU per step, NVLink + IB (what leaves the GPU)
    combine_bytes: float
    nvlink_bytes: float  # dispatch + combine
    ib_bytes: float
    nvlink_time_s: float
    ib_time_s: float
    time_s: float


def comm_plan(model: CostModel, dep: Deployment, plan: PhasePlan, tokens: float, gpu: GPUSpec) -> CommPlan:
    """All-to-all bytes and time for `tokens` tokens leaving one GPU in one step (all MoE layers)."""
    copies = copies_per_token(model, plan.ep, dep.gpus_per_node, plan.scheme)
    if copies["nvlink"] == copies["ib"] == 0:
        return CommPlan(plan.scheme, copies, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    disp, comb = bytes_per_copy(model_dim(model), dep.dispatch_dtype, dep.combine_dtype)
    per_layer = tokens * model.n_moe_layers
    nvl, ib = per_layer * copies["nvlink"], per_layer * copies["ib"]
    nvl_bytes, ib_bytes = nvl * (disp + comb), ib * (disp + comb)

    def t(b: float, bw: float, link: str) -> float:
        if b == 0:
            return 0.0
        if bw <= 0:
            raise ConfigError(f"{gpu.name} has no {link} bandwidth in its preset, but ep {plan.ep} needs it")
        return b / (bw * dep.link_efficiency)

    t_nvl, t_ib = t(nvl_bytes, gpu.scaleup_bw, "scale-up (NVLink)"), t(ib_bytes, gpu.scaleout_bw, "scale-out")
    return CommPlan(plan.scheme, copies, (nvl + ib) * disp, (nvl + ib) * comb, nvl_bytes, ib_bytes, t_nvl, t_ib,
                    max(t_nvl, t_ib))


def model_dim(model: CostModel) -> int:
    if not model.hidden_size:
        raise ConfigError(f"{model.name}: the hidden size is unknown, so all-to-all bytes cannot be counted")
    return model.hidden_size


# ---- one phase -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PhaseResult:
    phase: str
    ep: int
    nodes: float  # nodes one unit spans (a fraction for a unit smaller than a node)
    redundant_experts: int
    experts_per_gpu: int  # routed expert slots per GPU per MoE layer
    shared_experts_per_gpu: int
    microbatches: int
    weight_bytes_per_gpu: float
    kv_room_bytes_per_gpu: float
    kv_bytes_per_token: int
    tokens_per_gpu_per_step: float  # decode: sequences per GPU; prefill: computed prompt tokens per forward
    tokens_per_expert_per_step: float  # per routed expert slot per MoE layer
    comm: CommPlan
    memory_time_s: float
    compute_time_s: float
    memory_time_parts_s: dict[str, float]  # 'weights' (every microbatch), 'kv'
    compute_time_parts_s: dict[str, float]  # 'matmul', 'attention'
    work_time_s: float  # max(memory, compute)
    comm_time_s: float
    exposed_time_s: float  # the non-overlapped part
    step_s: float
    bound: str  # "memory", "compute" or "comm": the largest of the three
    tokens_per_s_per_gpu: float  # decode: output tokens; prefill: input tokens, cache hits included
    tokens_per_s_per_node: float
    computed_tokens_per_s_per_gpu: float  # prefill: cache misses only; decode: = tokens_per_s_per_gpu
    tokens_per_s_per_user: float | None = None  # decode
    max_batch_per_gpu: int | None = None  # decode: sequences the KV room holds
    batch_limited_by: str | None = None  # decode: "memory", "slo" or "fixed"


def _weights_per_gpu(model: CostModel, plan: PhasePlan) -> tuple[int, float]:
    slots = (model.n_routed_experts + plan.redundant_experts) // plan.ep if model.n_routed_experts else 0
    params = model.params_total - model.routed_params + slots * model.n_moe_layers * model.expert_params
    return slots, params


def _phase(model: CostModel, dep: Deployment, phase: str, tokens: float) -> PhaseResult:
    """Time of one step of `tokens` tokens per GPU (decode: sequences; prefill: computed prompt tokens)."""
    sc, plan = dep.serving, getattr(dep, phase)
    gpu, attention = resolve_gpu(sc.gpu), normalize_attention(model, sc.attention)
    b_w, b_kv = DTYPE_BYTES[sc.weight_dtype], DTYPE_BYTES[sc.cache_dtype]
    kv_per_token = kv_numbers_per_token_layer(model, attention) * b_kv * model.n_layers
    slots, params = _weights_per_gpu(model, plan)
    weights = params * b_w
    room = gpu.hbm_bytes * sc.mem_fraction - sc.workspace_gib * GIB - weights
    if room <= 0:
        raise ConfigError(f"{phase}: {weights / 1e9:,.1f} GB of {sc.weight_dtype} weights per GPU (ep {plan.ep}, "
                          f"{slots} expert slots) do not fit a {gpu.name} at mem_fraction {sc.mem_fraction}; "
                          f"raise --{phase}-ep" + (" or use --weight-dtype fp8" if sc.weight_dtype != "fp8" else ""))
    m = plan.microbatches
    # every microbatch (of ep x tokens / m tokens in the unit) reads the dense weights and its touched experts
    weights_read = m * weight_bytes_read(model, plan.ep * tokens / m, b_w, slots)
    if phase == "decode":
        positions = sc.context
        kv_bytes = tokens * positions * kv_per_token
    else:
        h, p = dep.prefix_cache_hit, dep.prompt_tokens
        positions = h * p + ((1 - h) * p + 1) / 2  # attended per computed token: the cached prefix + causal
        kv_bytes = tokens * kv_per_token * (1 + h / (1 - h))  # written, plus the cached prefix loaded
    times = step_times(model, sc, attention, phase, tokens, positions, weights_read, kv_bytes)
    mem_parts, cmp_parts = times.memory_parts_s, times.compute_parts_s
    t_mem, t_cmp = times.memory_s, times.compute_s
    work = max(t_mem, t_cmp)
    comm = comm_plan(model, dep, plan, tokens, gpu)
    lo = min(work, comm.time_s)
    if m == 1:
        exposed = lo
    else:
        exposed = lo * ((1 - dep.overlap_efficiency) + dep.overlap_efficiency / (m * max(model.n_moe_layers, 1)))
    step = max(work, comm.time_s) + exposed
    bound = max((t_mem, "memory"), (t_cmp, "compute"), (comm.time_s, "comm"))[1]
    computed = tokens / step
    per_gpu = computed / (1 - dep.prefix_cache_hit) if phase == "prefill" else computed
    return PhaseResult(
        phase=phase, ep=plan.ep, nodes=plan.ep / dep.gpus_per_node, redundant_experts=plan.redundant_experts,
        experts_per_gpu=slots, shared_experts_per_gpu=model.n_shared_experts if model.n_moe_layers else 0,
        microbatches=m, weight_bytes_per_gpu=weights, kv_room_bytes_per_gpu=room, kv_bytes_per_token=kv_per_token,
        tokens_per_gpu_per_step=tokens,
        tokens_per_expert_per_step=tokens * model.n_activated_experts / slots if slots else 0.0,
        comm=comm, memory_time_s=t_mem, compute_time_s=t_cmp, memory_time_parts_s=mem_parts,
        compute_time_parts_s=cmp_parts, work_time_s=work, comm_time_s=comm.time_s,
        exposed_time_s=exposed, step_s=step, bound=bound, tokens_per_s_per_gpu=per_gpu,
        tokens_per_s_per_node=per_gpu * dep.gpus_per_node, computed_tokens_per_s_per_gpu=computed)


def prefill(model: CostModel, dep: Deployment) -> PhaseResult:
    """Prefill unit throughput: input tokens/s per GPU and node (cache hits included)."""
    dep.validate(model)
    return _phase(model, dep, "prefill", dep.prefill_chunk)


def decode(model: CostModel, dep: Deployment) -> PhaseResult:
    """Decode unit throughput at the batch per GPU that `dep` asks for or allows (see the module docstring)."""
    dep.validate(model)
    probe = _phase(model, dep, "decode", 1)
    max_batch = int(probe.kv_room_bytes_per_gpu // (probe.kv_bytes_per_token * dep.serving.context))
    if max_batch < 1:
        raise ConfigError(f"decode: not one sequence of {dep.serving.context:,} tokens fits the "
                          f"{probe.kv_room_bytes_per_gpu / 1e9:,.1f} GB of KV room per GPU")
    if dep.decode_batch is not None:
        if dep.decode_batch > max_batch:
            raise ConfigError(f"decode batch {dep.decode_batch} per GPU does not fit: the KV room holds {max_batch} "
                              f"sequences of {dep.serving.context:,} tokens")
        batch, limit = dep.decode_batch, "fixed"
    else:
        slo = dep.min_user_tokens_per_s

        def meets(b: int) -> bool:
            return not slo or 1 / _phase(model, dep, "decode", b).step_s >= slo

        if not meets(1):
            raise ConfigError(f"decode: even one sequence per GPU is slower than {slo:g} tokens/s per user")
        lo, hi = 1, max_batch  # largest b in [lo, hi] that meets the SLO (step time grows with b)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if meets(mid) else (lo, mid - 1)
        batch, limit = lo, "memory" if lo == max_batch else "slo"
    r = _phase(model, dep, "decode", batch)
    return dataclasses.replace(r, tokens_per_s_per_user=1 / r.step_s, max_batch_per_gpu=max_batch,
                               batch_limited_by=limit)


# ---- fleet -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FleetResult:
    prefill: PhaseResult
    decode: PhaseResult
    usd_per_gpu_hour: float
    usd_per_mtok_input: float  # prefill GPU-time per million input tokens (cache hits included)
    usd_per_mtok_output: float
    prefill_nodes: float | None = None
    decode_nodes: float | None = None
    nodes_needed: float | None = None
    usd_per_day: float | None = None
    revenue_per_day: float | None = None
    margin: float | None = None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["prefill_tokens_per_s_per_node"] = self.prefill.tokens_per_s_per_node
        d["decode_tokens_per_s_per_node"] = self.decode.tokens_per_s_per_node
        for key in ("comm_time_s", "compute_time_s", "memory_time_s", "step_s"):
            d[key] = {"prefill": getattr(self.prefill, key), "decode": getattr(self.decode, key)}
        return d


def gpu_hour_price(dep: Deployment) -> float:
    if dep.usd_per_gpu_hour is not None:
        return dep.usd_per_gpu_hour
    return tco_per_gpu_hour(resolve_gpu(dep.serving.gpu), dep.serving.tco)["total"]


def fleet(model: CostModel, dep: Deployment, traffic: Traffic | None = None,
          prices: Prices | None = None) -> FleetResult:
    """Both phases, $ per million tokens, and with `traffic` the nodes, cost, revenue and margin of serving it."""
    p, d = prefill(model, dep), decode(model, dep)
    usd = gpu_hour_price(dep)
    load = dep.serving.load
    out = FleetResult(p, d, usd, usd / (p.tokens_per_s_per_gpu * 3600 * load) * 1e6,
                      usd / (d.tokens_per_s_per_gpu * 3600 * load) * 1e6)
    if traffic is None:
        return out
    traffic.validate()
    if traffic.input_tokens and abs(traffic.cache_hit_fraction - dep.prefix_cache_hit) > 1e-9:
        raise ConfigError(f"traffic's cache hit fraction {traffic.cache_hit_fraction:.4f} differs from the "
                          f"deployment's prefix_cache_hit {dep.prefix_cache_hit:.4f}")
    pn = traffic.input_tokens / traffic.seconds / (p.tokens_per_s_per_node * load)
    dn = traffic.output_tokens / traffic.seconds / (d.tokens_per_s_per_node * load)
    nodes = pn + dn
    cost = nodes * dep.gpus_per_node * usd * 24
    revenue = margin = None
    if prices is not None:
        miss = traffic.input_tokens - traffic.cache_hit_tokens
        revenue = (traffic.cache_hit_tokens * prices.input_cache_hit + miss * prices.input_cache_miss
                   + traffic.output_tokens * prices.output) / 1e6 * (SECONDS_PER_DAY / traffic.seconds)
        margin = revenue / cost - 1
    return dataclasses.replace(out, prefill_nodes=pn, decode_nodes=dn, nodes_needed=nodes, usd_per_day=cost,
                               revenue_per_day=revenue, margin=margin)


def load_deployment(path, serving: Scenario) -> Deployment:
    """A deployment JSON: Deployment's fields (prefill / decode as objects of PhasePlan's fields), except
    `serving`, which comes from the command line (GPU, dtypes, context, utilizations, TCO)."""
    d = read_json_object(path, "deployment file")
    fields = {f.name for f in dataclasses.fields(Deployment)} - {"serving"}
    plan_fields = {f.name for f in dataclasses.fields(PhasePlan)}
    unknown = set(d) - fields
    if unknown:
        raise ConfigError(f"deployment file {path}: unknown key(s) {', '.join(sorted(unknown))}; "
                          f"known: {', '.join(sorted(fields))}")
    for phase in ("prefill", "decode"):
        if phase in d:
            if not isinstance(d[phase], dict) or set(d[phase]) - plan_fields:
                raise ConfigError(f"deployment file {path}: {phase} must be an object with keys among "
                                  f"{', '.join(sorted(plan_fields))}")
            d[phase] = PhasePlan(**d[phase])
    return Deployment(serving=serving, **d)
