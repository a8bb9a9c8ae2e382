"""Published serving deployments, to hold the cost model against measured numbers.

`deepseek-2025-02`: DeepSeek's V3/R1 online service over 24 hours (UTC+8 2025-02-27 12:00 to 02-28 12:00),
Open Source Week day 6, "DeepSeek-V3/R1 Inference System Overview" (github.com/deepseek-ai/open-infra-index,
202502OpenSourceWeek/day_6_one_more_thing_deepseekV3R1_inference_system_overview.md). Every input below is
a published figure; the utilizations (MFU, MBU, link and overlap efficiency, HBM fraction, workspace) are
the tool's defaults used for every other scenario, not fitted. Two inputs are not published and are
stated as such: the mean prompt length (the published mean KV length per output token stands in for it)
and the prefill chunk (the tool's default).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from nanoseek.config import ConfigError
from nanoseek.tokenomics.deployment import Deployment, FleetResult, PhasePlan, Prices, Traffic, decode, fleet
from nanoseek.tokenomics.roofline import CostModel, Scenario, load_model

DAY6 = "open-infra-index day 6 (Inference System Overview)"


@dataclass(frozen=True)
class PublishedScenario:
    name: str
    title: str
    preset: str
    deployment: Deployment
    traffic: Traffic
    prices: Prices
    published: dict[str, float]  # the figures the model is compared with
    sources: dict[str, str] = field(default_factory=dict)  # input or published figure -> where it comes from
    published_ranges: dict[str, tuple[float, float]] = field(default_factory=dict)

    def model(self) -> CostModel:
        return load_model(self.preset)

    def run(self) -> FleetResult:
        return fleet(self.model(), self.deployment, self.traffic, self.prices)


DEEPSEEK_2025_02 = PublishedScenario(
    name="deepseek-2025-02",
    title="DeepSeek-V3/R1 online service, 24 h from 2025-02-27 12:00 UTC+8, H800",
    preset="v3-671b",
    deployment=Deployment(
        serving=Scenario(gpu="h800", weight_dtype="fp8", cache_dtype="bf16", context=4989),
        prefill=PhasePlan(ep=32, redundant_experts=32, microbatches=2, scheme="hierarchical"),
        decode=PhasePlan(ep=144, redundant_experts=32, microbatches=2, scheme="direct"),
        gpus_per_node=8, prompt_tokens=4989, prefix_cache_hit=342 / 608, min_user_tokens_per_s=20.0,
        dispatch_dtype="fp8", combine_dtype="bf16", usd_per_gpu_hour=2.0),
    traffic=Traffic(input_tokens=608e9, cache_hit_tokens=342e9, output_tokens=168e9),
    prices=Prices(input_cache_hit=0.14, input_cache_miss=0.55, output=2.19),
    published={
        "prefill_tokens_per_s_per_node": 73.7e3, "decode_tokens_per_s_per_node": 14.8e3,
        "nodes_needed": 226.75, "peak_nodes": 278, "usd_per_day": 87_072, "revenue_per_day": 562_027,
        "margin": 5.45, "prefill_nodes_per_unit": 4, "decode_nodes_per_unit": 18,
        "prefill_routed_experts_per_gpu": 9, "decode_routed_experts_per_gpu": 2, "shared_experts_per_gpu": 1,
    },
    published_ranges={"tokens_per_s_per_user": (20.0, 22.0)},
    sources={
        "model": "DeepSeek-V3 config (V3 and R1 share it): v3-671b preset, 671B total / 37B activated",
        "gpu": f"H800: {DAY6} 'served on H800 GPUs'; specs: H100 SXM compute and HBM, NVLink 400 GB/s, "
               "one 400 Gb/s CX7 InfiniBand NIC per GPU (DeepEP README, V3 report sec. 3.1-3.2.2)",
        "weight_dtype": f"FP8 matmuls: {DAY6} 'matrix multiplications and dispatch transmissions adopt the FP8 "
                        "format'",
        "cache_dtype": f"BF16 MLA core: {DAY6} 'core MLA computations and combine transmissions use the BF16 "
                       "format'",
        "dispatch_dtype": f"FP8: {DAY6}", "combine_dtype": f"BF16: {DAY6}",
        "prefill": f"EP32 / DP32 over 4 nodes, 32 redundant experts, 9 routed + 1 shared per GPU: {DAY6}; "
                   "hierarchical all-to-all (IB to node, then NVLink): V3 report sec. 3.4.1",
        "decode": f"EP144 / DP144 over 18 nodes, 32 redundant experts, 2 routed + 1 shared per GPU: {DAY6}; "
                  "point-to-point IB all-to-all (DeepEP low-latency kernels): V3 report sec. 3.4.2",
        "microbatches": f"dual-microbatch overlap in both phases: {DAY6}",
        "traffic": f"608B input tokens of which 342B (56.3%) hit the on-disk KV cache, 168B output tokens: {DAY6}",
        "context": f"average KV cache length per output token 4,989: {DAY6}",
        "prompt_tokens": "not published; the mean KV length per output token (4,989) stands in for it",
        "prefill_chunk": "not published; the tool's default (4,096 computed tokens per GPU per forward)",
        "min_user_tokens_per_s": f"average output speed 20-22 tokens/s per user: {DAY6}; the lower end is "
                                 "the decode SLO",
        "usd_per_gpu_hour": f"$2 per H800 GPU-hour lease: {DAY6}",
        "prices": f"R1 pricing $0.14 / $0.55 per M input tokens (cache hit / miss), $2.19 per M output: {DAY6}",
        "published": f"~73.7k input tok/s per node in prefill (cache hits included), ~14.8k output tok/s per "
                     f"node in decode, 226.75 nodes on average (278 peak), $87,072/day, $562,027/day revenue, "
                     f"545% cost profit margin: {DAY6}",
    },
)

SCENARIOS: dict[str, PublishedScenario] = {DEEPSEEK_2025_02.name: DEEPSEEK_2025_02}


def get_scenario(name: str) -> PublishedScenario:
    if name not in SCENARIOS:
        raise ConfigError(f"unknown scenario {name!r}; choose one of: {', '.join(SCENARIOS)}")
    return SCENARIOS[name]


# ---- predicted vs published -------------------------------------------------------------------------------
COMPARED = (  # (key, label): FleetResult attribute or phase attribute, published figure
    ("prefill_tokens_per_s_per_node", "prefill input tokens/s per node (cache hits included)"),
    ("decode_tokens_per_s_per_node", "decode output tokens/s per node"),
    ("tokens_per_s_per_user", "decode tokens/s per user"),
    ("nodes_needed", "nodes for the day's tokens (average)"),
    ("usd_per_day", "cost per day, USD"),
    ("revenue_per_day", "revenue per day at R1 prices, USD"),
    ("margin", "cost profit margin"),
)


def predicted_value(result: FleetResult, key: str) -> float:
    if key == "prefill_tokens_per_s_per_node":
        return result.prefill.tokens_per_s_per_node
    if key in ("decode_tokens_per_s_per_node", "tokens_per_s_per_user"):
        return getattr(result.decode, key.replace("decode_", ""))
    return getattr(result, key)


def published_value(sc: PublishedScenario, key: str) -> float | tuple[float, float]:
    return sc.published_ranges[key] if key in sc.published_ranges else sc.published[key]


def side_by_side(sc: PublishedScenario, result: FleetResult) -> list[dict]:
    """Rows of predicted vs published, with predicted / published (a range's midpoint)."""
    rows = []
    for key, label in COMPARED:
        pub = published_value(sc, key)
        mid = sum(pub) / 2 if isinstance(pub, tuple) else pub
        pred = predicted_value(result, key)
        rows.append({"key": key, "label": label, "predicted": pred, "published": pub, "ratio": pred / mid})
    return rows


def diagnostics(sc: PublishedScenario, result: FleetResult) -> dict[str, float]:
    """What the published figures imply, to locate a miss (not used to fit anything):
    the decode batch per GPU they imply (tokens/s per GPU / tokens/s per user, range midpoint), the
    model's decode step at that batch against the published 1 / (tokens/s per user) (and the same step with
    memory and compute time added instead of overlapped: the roofline's max is the optimistic end), and the MFU at
    which a compute-bound prefill would match the published throughput."""
    dep, model = sc.deployment, sc.model()
    lo, hi = sc.published_ranges["tokens_per_s_per_user"]
    user = (lo + hi) / 2
    batch = sc.published["decode_tokens_per_s_per_node"] / dep.gpus_per_node / user
    at = decode(model, dataclasses.replace(dep, decode_batch=max(1, round(batch))))
    ratio = sc.published["prefill_tokens_per_s_per_node"] / result.prefill.tokens_per_s_per_node
    return {
        "implied_decode_batch_per_gpu": batch, "decode_step_at_implied_batch_s": at.step_s,
        "published_decode_step_s": 1 / user, "decode_memory_time_at_implied_batch_s": at.memory_time_s,
        "decode_compute_time_at_implied_batch_s": at.compute_time_s,
        "decode_comm_time_at_implied_batch_s": at.comm_time_s,
        # memory-bound and compute-bound kernels one after the other instead of overlapped (comm still hidden)
        "decode_step_no_mem_compute_overlap_s": at.memory_time_s + at.compute_time_s + at.exposed_time_s,
        "prefill_mfu_matching_published": dep.serving.mfu * ratio if result.prefill.bound == "compute" else None,
    }
