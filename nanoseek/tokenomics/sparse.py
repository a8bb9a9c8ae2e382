"""What DeepSeek Sparse Attention (DeepSeek-V3.2-Exp, sec. 2 and 3 of its report) changes in the cost of serving
an MLA model: the same roofline as `roofline.evaluate` (one replica, network free), with each query attending to
`index_topk` cached tokens chosen by a lightning indexer that scores every cached token.

Per token and layer, at a cache of C tokens (k = index_topk, n_h heads, r = kv_lora_rank, d_r = rope dims,
n_I / d_I = indexer heads / head size):
- cache: MLA's r + d_r numbers plus the indexer key, d_I numbers (V3.2: 656 + 128 -> 784 per token and layer);
- decode FLOPs: indexer 2 n_I d_I C (q . k for every head) + 2 n_I C (the head weights) over ALL C tokens, then
  MLA in its absorbed (MQA) form over min(k, C) tokens: 2 n_h (2 r + d_r) each (V3: over all C);
- decode bytes: every cached indexer key (C d_I) plus the min(k, C) selected latents (V3: C (r + d_r));
- prefill FLOPs per token at position t: the indexer over t tokens plus the cheaper of MLA's absorbed form over
  min(k, t) selected tokens and its naive (MHA) form over all t with a mask, 2 n_h (d_qk + d_v) per token
  (DeepSeek implements DSA in MLA's MQA mode and simulates it with a masked MHA mode for short prefills);
- indexer weights (wq_b, wk, its LayerNorm, weights_proj) are read and multiplied once per token like any weight.

Simplifications, on purpose: the indexer keys are stored and scored in the cache dtype (DeepSeek: FP8 with a
scale, scored in FP8, so this over-counts that part of the cache and its FLOPs at most 2x); the top-k
selection itself (a partial sort over C scores) is not counted; gathering k scattered cache rows is priced as a
contiguous read. The dense V3 figures are `roofline.evaluate`'s, unchanged.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from nanoseek.cli_config import knob
from nanoseek.config import ConfigError
from nanoseek.tokenomics.roofline import (
    DTYPE_BYTES,
    CostModel,
    CostResult,
    Scenario,
    attention_flops_per_position,
    evaluate,
    memory_plan,
    resolve_gpu,
    step_times,
    tco_per_gpu_hour,
    usd_per_mtok,
    weight_bytes_read,
)


@dataclass(frozen=True)
class SparseAttentionCost:
    """The lightning indexer and top-k of a V3.2 row (defaults: DeepSeek-V3.2-Exp's config.json)."""

    index_topk: int = knob(0, help="cost a V3.2 row beside the model's: DeepSeek Sparse Attention with this top-k "
                           "(DeepSeek-V3.2-Exp: 2048; 0 = no V3.2 row)")
    index_n_heads: int = knob(64, help="indexer heads of the V3.2 row")
    index_head_dim: int = knob(128, help="indexer head size of the V3.2 row")
    q_lora_rank: int = 0  # the indexer's query input (the model's query latent; CostModel does not hold it)

    def validate(self, model: CostModel) -> SparseAttentionCost:
        if min(self.index_topk, self.index_n_heads, self.index_head_dim) < 1:
            raise ConfigError("--index-topk, --index-n-heads and --index-head-dim must be >= 1 for a V3.2 row")
        if not model.is_mla:
            raise ConfigError(f"a V3.2 row needs an MLA model (DeepSeek-V3 shapes); {model.name} is "
                              f"{model.native_attention}")
        return self


@dataclass(frozen=True)
class SparseRow:
    """Per-token figures of one model served dense (V3) or with DSA (V3.2) at one context."""

    name: str
    context: int
    attention_flops_per_token: float  # all layers, decode of one token at `context`
    indexer_flops_per_token: float  # included in the line above (0 for dense)
    prefill_attention_flops_per_token: float  # mean over the positions of a `context`-token prompt
    cache_bytes_per_token: int  # all layers
    indexer_cache_bytes_per_token: int
    max_concurrent_sequences: int
    batch: int  # min(the scenario's batch, max_concurrent_sequences): what the speeds below are at
    decode_tokens_per_s: float  # per GPU
    prefill_tokens_per_s: float  # per GPU
    usd_per_mtok_output: float
    usd_per_mtok_input: float


def indexer_params_per_layer(model: CostModel, dsa: SparseAttentionCost) -> int:
    """wq_b (q_lora_rank -> n_I d_I), wk (d -> d_I), LayerNorm (2 d_I), weights_proj (d -> n_I). Without a query
    latent wq_b reads the hidden state (d)."""
    q_in = dsa.q_lora_rank or model.hidden_size
    return (q_in * dsa.index_n_heads * dsa.index_head_dim + model.hidden_size * (dsa.index_head_dim + dsa.index_n_heads)
            + 2 * dsa.index_head_dim)


def indexer_flops_per_position(dsa: SparseAttentionCost) -> int:
    return 2 * dsa.index_n_heads * dsa.index_head_dim + 2 * dsa.index_n_heads


def mean_selected(k: int, context: int) -> float:
    """Mean over positions t = 1..C of min(k, t): keys a prompt token attends to under causal top-k."""
    if context <= k:
        return (context + 1) / 2
    return (k * (k + 1) / 2 + (context - k) * k) / context


def dsa_attention_flops(model: CostModel, dsa: SparseAttentionCost, phase: str, context: int) -> tuple[float, float]:
    """(attention incl. indexer, indexer) FLOPs per token and layer. decode: one query at a cache of `context`;
    prefill: the mean over a `context`-token prompt's positions (see the module docstring)."""
    mqa = attention_flops_per_position(model, "mla", "decode")
    if phase == "decode":
        idx = indexer_flops_per_position(dsa) * context
        return idx + mqa * min(dsa.index_topk, context), idx
    mha = attention_flops_per_position(model, "mla", "prefill")
    mean_t = (context + 1) / 2
    idx = indexer_flops_per_position(dsa) * mean_t
    return idx + min(mqa * mean_selected(dsa.index_topk, context), mha * mean_t), idx


def sparse_row(model: CostModel, sc: Scenario, dsa: SparseAttentionCost) -> SparseRow:
    """The V3.2 row: `model` with DSA under `sc` (its batch capped at what the larger cache holds)."""
    dsa.validate(model)
    if sc.attention not in (None, "mla"):
        raise ConfigError("a V3.2 row is MLA with an indexer: drop --attention")
    base = memory_plan(model, sc)
    b_kv, b_w = DTYPE_BYTES[sc.cache_dtype], DTYPE_BYTES[sc.weight_dtype]
    idx_bytes = dsa.index_head_dim * b_kv * model.n_layers
    per_token = base.kv_bytes_per_token + idx_bytes
    idx_weights = indexer_params_per_layer(model, dsa) * model.n_layers * b_w
    room = base.kv_room_bytes - idx_weights
    max_seq = int(room // (per_token * sc.context))
    if max_seq < 1:
        raise ConfigError(f"not one sequence of {sc.context:,} tokens fits beside the V3.2 weights")
    b, c, L = min(sc.batch, max_seq), sc.context, model.n_layers
    gpu = resolve_gpu(sc.gpu)
    # decode: step_times' attention term is tokens x n_layers x positions x (MLA's per-position FLOPs), so the
    # DSA FLOPs enter as the number of positions that costs the same; the indexer's weights as extra params
    dec, dec_idx = dsa_attention_flops(model, dsa, "decode", c)
    mqa = attention_flops_per_position(model, "mla", "decode")
    kv_read = b * L * (c * dsa.index_head_dim + min(dsa.index_topk, c) * (model.kv_lora_rank + model.qk_rope_head_dim))
    heavier = dataclasses.replace(model, params_active=model.params_active + idx_weights // b_w,
                                  params_total=model.params_total + idx_weights // b_w)
    t = step_times(heavier, sc, "mla", "decode", b, dec / mqa, weight_bytes_read(heavier, b, b_w), kv_read * b_kv,
                   sc.gpus)
    decode_per_gpu = b / max(t.memory_s, t.compute_s) / sc.gpus
    pre, _ = dsa_attention_flops(model, dsa, "prefill", c)
    mha = attention_flops_per_position(model, "mla", "prefill")
    tokens = b * c
    p = step_times(heavier, sc, "mla", "prefill", tokens, pre / mha, weight_bytes_read(heavier, tokens, b_w),
                   tokens * per_token, sc.gpus)
    prefill_per_gpu = tokens / max(p.memory_s, p.compute_s) / sc.gpus
    tco = tco_per_gpu_hour(gpu, sc.tco)["total"]
    return SparseRow(f"{model.name} + DSA k={dsa.index_topk}", c, L * dec, L * dec_idx, L * pre, per_token, idx_bytes,
                     max_seq, b, decode_per_gpu, prefill_per_gpu, usd_per_mtok(tco, decode_per_gpu, sc.load),
                     usd_per_mtok(tco, prefill_per_gpu, sc.load))


def dense_row(model: CostModel, sc: Scenario) -> SparseRow:
    """The dense model's row in the same units (roofline.evaluate at the batch that fits)."""
    plan = memory_plan(model, sc)
    b = min(sc.batch, plan.max_concurrent_sequences)
    if b < 1:
        raise ConfigError(f"not one sequence of {sc.context:,} tokens fits beside the weights")
    r: CostResult = evaluate(model, dataclasses.replace(sc, batch=b))
    attn = model.n_layers * attention_flops_per_position(model, r.attention, "decode") * sc.context
    pre = model.n_layers * attention_flops_per_position(model, r.attention, "prefill") * (sc.context + 1) / 2
    return SparseRow(model.name, sc.context, attn, 0.0, pre, r.kv_bytes_per_token, 0, plan.max_concurrent_sequences, b,
                     r.decode_tokens_per_s, r.prefill_tokens_per_s, r.usd_per_mtok_output, r.usd_per_mtok_input)
