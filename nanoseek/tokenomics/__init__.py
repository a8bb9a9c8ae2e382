"""Serving-cost model ("tokenomics"), pure arithmetic and no torch.

- `cost_model`: what a model is for costing (`CostModel`), read from a preset or a config.json.
- `roofline`: one replica whose GPUs share the whole model, network free (memory, roofline speed, $ per token).
- `sweeps`: attention kinds compared, one input swept, the plot.
- `deployment`: disaggregated prefill / decode units with expert parallelism (per-GPU experts and KV,
  all-to-all bytes over NVLink and InfiniBand, dual-microbatch overlap) and fleet economics.
- `scenarios`: published deployments to check the model against (DeepSeek, February 2025).
- `reasoning`: cost per answered question of reasoning models, and what the KV cache kind does to it.
"""
from nanoseek.tokenomics.roofline import (
    DTYPE_BYTES,
    GB,
    GIB,
    GPUS,
    HOURS_PER_YEAR,
    CostModel,
    CostResult,
    GPUSpec,
    MemoryPlan,
    Scenario,
    StepTimes,
    TCOInputs,
    attention_flops_per_position,
    check_batch_fits,
    cost_per_answer,
    decode_step,
    deepseek_hf_to_model_config,
    evaluate,
    expected_distinct_experts,
    from_gqa_hf_config,
    from_hf_config,
    from_model_config,
    kv_heads,
    kv_numbers_per_token_layer,
    load_model,
    memory_plan,
    normalize_attention,
    prefill_time,
    resolve_gpu,
    step_times,
    tco_per_gpu_hour,
    usd_per_mtok,
    weight_bytes_read,
)
from nanoseek.tokenomics.sweeps import SWEEPS, Comparison, compare, default_variants, plot_sweep, sweep

__all__ = [
    "DTYPE_BYTES", "GB", "GIB", "GPUS", "HOURS_PER_YEAR", "SWEEPS", "Comparison", "CostModel", "CostResult",
    "GPUSpec", "MemoryPlan", "Scenario", "StepTimes", "TCOInputs", "attention_flops_per_position", "check_batch_fits",
    "compare", "cost_per_answer", "decode_step", "deepseek_hf_to_model_config", "default_variants", "evaluate",
    "expected_distinct_experts", "from_gqa_hf_config", "from_hf_config", "from_model_config", "kv_heads",
    "kv_numbers_per_token_layer", "load_model", "memory_plan", "normalize_attention", "plot_sweep",
    "prefill_time", "resolve_gpu", "step_times", "sweep", "tco_per_gpu_hour", "usd_per_mtok", "weight_bytes_read",
]
