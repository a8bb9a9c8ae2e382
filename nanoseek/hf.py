"""Hugging Face interop: read and write transformers `DeepseekV3ForCausalLM` and `DeepseekV2ForCausalLM`
checkpoint directories (config.json + safetensors, single file or sharded with an index).

DeepSeek-V2 (model_type deepseek_v2) shares V3's weight names and MLA; what differs is the gate: a softmax over
all experts (ModelConfig.score_func="softmax"), no selection bias (`e_score_correction_bias`; nanoseek's gate
bias stays zero), `topk_method` "greedy" (one group) or "group_limited_greedy" (groups ranked by their best
expert's affinity, the top `topk_group` kept), `norm_topk_prob` (false in the released V2 / V2-Lite), no MTP.
transformers 5's DeepseekV2 router ignores `norm_topk_prob`, so a nanoseek softmax model that renormalizes is
refused on export; on import the flag is honoured as DeepSeek's own V2 code does.

Weight names are mapped one to one (ours are the reference code's short names). RoPE: nanoseek uses the
interleaved layout, which is what DeepSeek's released weights and transformers' default
`rope_interleave=True` use; a checkpoint with `rope_interleave=False` has its rope rows permuted on load.
MTP modules live at `model.layers.{num_hidden_layers + k}` with `enorm`, `hnorm`, `eh_proj`,
`shared_head.norm` (and copies of the shared `embed_tokens` / `shared_head.head`), as in the V3 release.
Block-quantized FP8 checkpoints (`weight_scale_inv`, blocks of `quantization_config.weight_block_size`,
128x128 when absent) are dequantized on load. `norm_topk_prob: false` maps to ModelConfig.norm_topk_prob.
Loading streams: the model is built on the meta device, tensor names and shapes are checked from the
shards' headers, then each shard is opened once and each tensor read (plain file reads, no mmap) straight
into its parameter, or through one temporary when it must be cast, dequantized or permuted.
"""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from nanoseek.config import ConfigError, ModelConfig
from nanoseek.hf_shards import _ST_DTYPES, CheckpointError, _Entry, _open_shard, _read_tensor, _shard_headers  # noqa: F401
from nanoseek.io import atomic_write, atomic_write_text
from nanoseek.model import Transformer
from nanoseek.model.rope import rope_cos_sin




_LAYER_RENAMES = [
    ("attn_norm.weight", "input_layernorm.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("attn.wq.", "self_attn.q_proj."), ("attn.wq_a.", "self_attn.q_a_proj."),
    ("attn.q_norm.", "self_attn.q_a_layernorm."), ("attn.wq_b.", "self_attn.q_b_proj."),
    ("attn.wkv_a.", "self_attn.kv_a_proj_with_mqa."), ("attn.kv_norm.", "self_attn.kv_a_layernorm."),
    ("attn.wkv_b.", "self_attn.kv_b_proj."), ("attn.wo.", "self_attn.o_proj."),
    ("ffn.gate.bias", "mlp.gate.e_score_correction_bias"), ("ffn.gate.weight", "mlp.gate.weight"),
    ("attn.indexer.", "self_attn.indexer."),  # DeepSeek-V3.2's lightning indexer (nanoseek/hf_v32.py)
]
_FFN = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}


def _block_name(rest: str) -> str:
    for ours, theirs in _LAYER_RENAMES:
        if rest.startswith(ours):
            return theirs + rest[len(ours):]
    m = re.fullmatch(r"ffn\.(?:(experts\.\d+|shared_experts)\.)?(w[123])\.weight", rest)
    if m:
        return "mlp." + (m.group(1) + "." if m.group(1) else "") + _FFN[m.group(2)] + ".weight"
    raise KeyError(rest)


def hf_name(name: str, n_layers: int) -> str:
    """nanoseek state-dict key -> transformers key."""
    fixed = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "head.weight": "lm_head.weight"}
    if name in fixed:
        return fixed[name]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if m:
        return f"model.layers.{m.group(1)}.{_block_name(m.group(2))}"
    m = re.fullmatch(r"mtp\.(\d+)\.(.+)", name)
    if m:
        layer, rest = n_layers + int(m.group(1)), m.group(2)
        if rest.startswith("block."):
            return f"model.layers.{layer}.{_block_name(rest[len('block.'):])}"
        rest = {"norm.weight": "shared_head.norm.weight"}.get(rest, rest)
        return f"model.layers.{layer}.{rest}"
    raise KeyError(name)


# ---- config ----------------------------------------------------------------------------------------
def config_to_hf(cfg: ModelConfig) -> dict:
    """A transformers config.json: DeepseekV3 for the sigmoid gate, DeepseekV2 for the softmax one."""
    if cfg.score_func == "softmax":
        return _config_to_hf_v2(cfg)
    if cfg.n_routed_experts > 0 and cfg.n_dense_layers < cfg.n_layers and cfg.n_shared_experts < 1:
        raise ConfigError("transformers' DeepseekV3 needs at least one shared expert")
    if cfg.sparse_attention:  # DeepSeek Sparse Attention: a DeepseekV32 config (nanoseek/hf_v32.py)
        from nanoseek import hf_v32
        return hf_v32.config_to_hf(cfg)
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_factor > 1:
        rope = {"rope_type": "yarn", "rope_theta": cfg.rope_theta, "factor": cfg.rope_factor,
                "original_max_position_embeddings": cfg.original_seq_len, "beta_fast": cfg.beta_fast,
                "beta_slow": cfg.beta_slow, "mscale": cfg.mscale, "mscale_all_dim": cfg.mscale}
    moe = cfg.n_routed_experts > 0
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.inter_dim,
        "moe_intermediate_size": cfg.moe_inter_dim, "num_hidden_layers": cfg.n_layers,
        "first_k_dense_replace": cfg.n_dense_layers if moe else cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_heads,
        "n_routed_experts": max(cfg.n_routed_experts, 1), "n_shared_experts": cfg.n_shared_experts,
        "num_experts_per_tok": cfg.n_activated_experts, "n_group": cfg.n_expert_groups,
        "topk_group": cfg.n_limited_groups, "routed_scaling_factor": cfg.route_scale,
        "norm_topk_prob": cfg.normalizes_topk,
        "q_lora_rank": cfg.q_lora_rank or None, "kv_lora_rank": cfg.kv_lora_rank,
        "qk_nope_head_dim": cfg.qk_nope_head_dim, "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "v_head_dim": cfg.v_head_dim, "head_dim": cfg.qk_rope_head_dim,
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_scaling": rope if cfg.rope_factor > 1 else None,
        "rope_parameters": rope, "rope_interleave": True, "num_nextn_predict_layers": cfg.n_mtp,
        "tie_word_embeddings": False, "initializer_range": cfg.init_std, "hidden_act": "silu",
        "attention_bias": False, "torch_dtype": "float32", "bos_token_id": 0, "eos_token_id": 1,
    }


def _config_to_hf_v2(cfg: ModelConfig) -> dict:
    if cfg.normalizes_topk:
        raise ConfigError("transformers' DeepseekV2 does not renormalize the top-k gate weights (it ignores "
                          "norm_topk_prob): export a softmax-gate model with norm_topk_prob=False")
    if cfg.n_mtp:
        raise ConfigError("DeepseekV2 has no MTP modules: export with include_mtp=False")
    hf = config_to_hf(dataclasses.replace(cfg, score_func="sigmoid", norm_topk_prob=False))
    for key in ("num_nextn_predict_layers", "rope_interleave"):
        hf.pop(key)
    hf.update({"architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
               "topk_method": "group_limited_greedy" if cfg.n_expert_groups > 1 else "greedy",
               "norm_topk_prob": False, "scoring_func": "softmax"})
    return hf


# model_type -> what nanoseek would need to run it (architectures it refuses, each naming what is missing)
_UNSUPPORTED = {
    "deepseek_v4": "DeepSeek-V4's architecture is not implemented",
    "deepseek": "DeepSeek-MoE (V1) uses multi-head attention, not MLA",
}


def check_architecture(hf: dict) -> None:
    """Refuse every config.json nanoseek cannot run, naming what is missing (before any weight is read)."""
    model_type = hf.get("model_type")
    if model_type in ("deepseek_v3", "deepseek_v2", "deepseek_v32", None):
        return
    if model_type in _UNSUPPORTED:
        raise ConfigError(f"model_type {model_type!r} is not supported: {_UNSUPPORTED[model_type]}; nanoseek "
                          "imports DeepseekV3ForCausalLM, DeepseekV32ForCausalLM and DeepseekV2ForCausalLM checkpoints")
    arch = ", ".join(hf.get("architectures") or []) or "unknown architecture"
    raise ConfigError(f"unknown model_type {model_type!r} ({arch}): nanoseek imports DeepseekV3ForCausalLM "
                      "(model_type 'deepseek_v3') and DeepseekV2ForCausalLM ('deepseek_v2') checkpoints only")


def config_from_hf(hf: dict) -> ModelConfig:
    if hf.get("model_type") == "deepseek_v32":  # V3 + DeepSeek Sparse Attention (nanoseek/hf_v32.py)
        from nanoseek import hf_v32
        return hf_v32.config_from_hf(hf)

    def get(key, default=None):
        return hf.get(key, default)

    check_architecture(hf)
    missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                           "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim") if k not in hf]
    if missing:
        raise ConfigError(f"config.json lacks required field(s): {', '.join(missing)}")
    rope = get("rope_scaling") or get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    factor = 1.0
    extra = {}
    if rope_type == "yarn":
        factor = float(rope["factor"])
        mscale, mscale_all = rope.get("mscale", 1.0), rope.get("mscale_all_dim", 0)
        if not mscale_all or mscale != mscale_all:
            raise ConfigError(f"YaRN with mscale={mscale} != mscale_all_dim={mscale_all} is not supported")
        extra = dict(original_seq_len=int(rope["original_max_position_embeddings"]),
                     beta_fast=rope.get("beta_fast", 32), beta_slow=rope.get("beta_slow", 1), mscale=float(mscale))
    elif rope_type != "default":
        raise ConfigError(f"unsupported rope type {rope_type!r} (default or yarn)")
    max_len = int(get("max_position_embeddings", 4096))
    if get("num_key_value_heads", get("num_attention_heads")) != get("num_attention_heads"):
        raise ConfigError("MLA needs num_key_value_heads == num_attention_heads")
    v2 = get("model_type") == "deepseek_v2"
    groups = (get("n_group", 1) or 1, get("topk_group", 1) or 1)
    gate: dict = {}
    if v2:
        method = get("topk_method", "greedy")
        if method not in ("greedy", "group_limited_greedy"):
            raise ConfigError(f"DeepSeek-V2 topk_method {method!r} is not supported (greedy, group_limited_greedy)")
        if (get("moe_layer_freq", 1) or 1) != 1:
            raise ConfigError(f"moe_layer_freq={get('moe_layer_freq')} is not supported (every layer after "
                              "first_k_dense_replace is MoE in nanoseek)")
        if get("scoring_func", "softmax") != "softmax":
            raise ConfigError(f"DeepSeek-V2 scoring_func={get('scoring_func')!r} is not supported (softmax)")
        groups = groups if method == "group_limited_greedy" else (1, 1)
        gate = {"score_func": "softmax", "norm_topk_prob": bool(get("norm_topk_prob", False))}
    elif get("scoring_func", "sigmoid") != "sigmoid":
        raise ConfigError(f"scoring_func={get('scoring_func')!r} is not supported by DeepseekV3 checkpoints")
    else:
        gate = {"norm_topk_prob": get("norm_topk_prob") is not False}
    cfg = ModelConfig(
        vocab_size=get("vocab_size"), dim=get("hidden_size"), inter_dim=get("intermediate_size", 0),
        moe_inter_dim=get("moe_intermediate_size", 0), n_layers=get("num_hidden_layers"),
        n_dense_layers=min(get("first_k_dense_replace", 0), get("num_hidden_layers")),
        n_heads=get("num_attention_heads"), n_routed_experts=get("n_routed_experts", 0) or 0,
        n_shared_experts=get("n_shared_experts", 0) or 0, n_activated_experts=get("num_experts_per_tok", 1),
        n_expert_groups=groups[0], n_limited_groups=groups[1],
        route_scale=float(get("routed_scaling_factor", 1.0)), q_lora_rank=get("q_lora_rank") or 0,
        kv_lora_rank=get("kv_lora_rank"), qk_nope_head_dim=get("qk_nope_head_dim"),
        qk_rope_head_dim=get("qk_rope_head_dim"), v_head_dim=get("v_head_dim"), max_seq_len=max_len,
        original_seq_len=extra.pop("original_seq_len", max_len), rope_theta=float(rope.get("rope_theta", get("rope_theta", 10000.0))),
        rope_factor=factor, n_mtp=get("num_nextn_predict_layers", 0) or 0, norm_eps=get("rms_norm_eps", 1e-6),
        init_std=get("initializer_range", 0.006), **gate, **extra)
    return cfg.validate()


# ---- reading (the shard primitives: hf_shards.py) -------------------------------------------------
def _rope_perm(d: int) -> torch.Tensor:
    """Half-split rope rows (x_j pairs with x_{j+d/2}) -> interleaved rows (pairs adjacent)."""
    return torch.stack([torch.arange(d // 2), torch.arange(d // 2) + d // 2], dim=-1).flatten()


def _scale_key(key: str) -> str:
    return key[:-len(".weight")] + ".weight_scale_inv" if key.endswith(".weight") else key + "_scale_inv"


def from_hf(path: str | Path, dtype: torch.dtype | None = None, load_mtp: bool = True,
            verbose: bool = True) -> Transformer:
    """Build a nanoseek Transformer from a transformers DeepSeek-V3 checkpoint directory.

    dtype: the parameters' dtype; None keeps the checkpoint's (that of `model.embed_tokens.weight`; FP8
    weights are dequantized to it), `torch.float32` gives a training-ready copy. The gate's weight and
    selection bias are always float32 (the gate runs in FP32). The model is built on the meta device and
    each parameter is read once, straight from its shard (opened one at a time), so peak memory is about the
    model's size plus one tensor (bench/hf_import_memory.py, docs/hf.md).
    """
    path = Path(path)
    if not (path / "config.json").exists():
        raise CheckpointError(f"{path} has no config.json (expected a transformers checkpoint directory)")
    hf_cfg = json.loads((path / "config.json").read_text())
    cfg = config_from_hf(hf_cfg)
    block = (hf_cfg.get("quantization_config") or {}).get("weight_block_size") or [128, 128]
    if len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block):
        raise CheckpointError(f"quantization_config.weight_block_size must be two positive ints, got {block}")
    headers = _shard_headers(path)
    where = {k: f for f, h in headers.items() for k in h}
    info = {k: v for h in headers.values() for k, v in h.items()}
    n_declared = hf_cfg.get("num_nextn_predict_layers", 0) or 0
    mtp_present = cfg.n_mtp > 0 and any(k.startswith(f"model.layers.{cfg.n_layers}.") for k in where)
    if cfg.n_mtp > 0 and not (mtp_present and load_mtp):
        if verbose:
            reason = "not loaded (load_mtp=False)" if mtp_present else "not found in the checkpoint"
            print(f"note: {cfg.n_mtp} MTP module(s) {reason}; the model is loaded without MTP")
        cfg.n_mtp = 0
    with torch.device("meta"):
        model = Transformer(cfg)
    targets = model.state_dict(keep_vars=True)  # our name -> the (meta) parameter or buffer
    v2 = hf_cfg.get("model_type") == "deepseek_v2"  # no selection bias in the checkpoint: ours stays zero
    expected = {hf_name(k, cfg.n_layers): k for k in targets if not (v2 and k.endswith("gate.bias"))}
    shared_copies = {f"model.layers.{cfg.n_layers + k}.{s}" for k in range(n_declared)
                     for s in ("embed_tokens.weight", "shared_head.head.weight")}
    skip_prefixes = tuple(f"model.layers.{cfg.n_layers + k}." for k in range(n_declared)) if cfg.n_mtp == 0 else ()
    # validate names and shapes from the headers before anything is allocated
    for k in where:
        if k.endswith("weight_scale_inv") or k.endswith("rotary_emb.inv_freq"):
            continue
        if k not in expected and k not in shared_copies and not (skip_prefixes and k.startswith(skip_prefixes)):
            raise CheckpointError(f"unexpected key in checkpoint: {k}")
    for hk, ok in expected.items():
        if hk not in info:
            raise CheckpointError(f"missing key in checkpoint: {hk}")
        st_dtype, shape = info[hk].dtype, info[hk].shape
        if st_dtype not in _ST_DTYPES:
            raise CheckpointError(f"unsupported dtype {st_dtype} for {hk}")
        want = tuple(targets[ok].shape)
        if shape != want:
            raise CheckpointError(f"shape mismatch for {hk}: checkpoint {shape}, config expects {want}")
        if st_dtype == "F8_E4M3":
            sk = _scale_key(hk)
            blocks = tuple(-(-n // b) for n, b in zip(shape, block))
            if sk not in info:
                raise CheckpointError(f"FP8 tensor {hk} has no {sk}")
            if len(shape) != 2 or info[sk].shape != blocks:
                raise CheckpointError(f"{sk} has shape {info[sk].shape}, expected {blocks} for {shape} in "
                                      f"{block[0]}x{block[1]} blocks")
    ckpt_dtype = _ST_DTYPES[info["model.embed_tokens.weight"].dtype]
    target = dtype or (ckpt_dtype if ckpt_dtype.is_floating_point and ckpt_dtype.itemsize >= 2 else torch.float32)
    for name, p in model.named_parameters():
        if not name.endswith(("gate.weight", "indexer.weights_proj.weight")):  # both float32, as transformers
            p.data = p.data.to(target)
    model = model.to_empty(device="cpu")  # allocated, untouched: pages become resident as they are written
    targets = model.state_dict(keep_vars=True)
    interleave = hf_cfg.get("rope_interleave", True)
    perm = _rope_perm(cfg.qk_rope_head_dim)
    with torch.no_grad():
        for f, header in headers.items():
            keys = [k for k in header if k in expected]
            if not keys:
                continue
            with _open_shard(f) as fh:
                for hk in keys:
                    ok, e, dest = expected[hk], header[hk], targets[expected[hk]]
                    permute = not interleave and ok.endswith(_ROPE_ROW_KEYS)
                    if e.dtype != "F8_E4M3" and not permute and _ST_DTYPES[e.dtype] == dest.dtype \
                            and dest.is_contiguous():
                        _read_tensor(fh, e, dest)  # straight into the parameter: no copy at all
                        continue
                    t = _read_tensor(fh, e)
                    if e.dtype == "F8_E4M3":
                        sk = _scale_key(hk)
                        if where[sk] == f:
                            s = _read_tensor(fh, info[sk])
                        else:  # scale in another shard (unusual): open it for this one tensor
                            with _open_shard(where[sk]) as other:
                                s = _read_tensor(other, info[sk])
                        t = _dequant_fp8(t, s, block)
                    if permute:
                        t = _permute_rope_rows(ok, t, cfg, perm)
                    dest.copy_(t)  # casts to the parameter's dtype
                    del t
    cos, sin = rope_cos_sin(cfg)
    model.rope_cos.copy_(cos)
    model.rope_sin.copy_(sin)
    for m in model.moe_layers():
        m.last_load.zero_()
        m.load_accum.zero_()
        if v2:
            m.gate.bias.zero_()
    return model


def _dequant_fp8(t: torch.Tensor, scale_inv: torch.Tensor, block: list[int]) -> torch.Tensor:
    """q * scale_inv per (block[0] x block[1]) block, in float32 (edge blocks partial)."""
    r, c = t.shape
    full = scale_inv.float().repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:r, :c]
    return t.float() * full


_ROPE_ROW_KEYS = ("attn.wkv_a.weight", "attn.wq.weight", "attn.wq_b.weight")


def _permute_rope_rows(name: str, t: torch.Tensor, cfg: ModelConfig, perm: torch.Tensor) -> torch.Tensor:
    """Reorder the output rows that produce rope dims from half-split to interleaved layout."""
    nope, rope = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
    if name.endswith("attn.wkv_a.weight"):
        t = t.clone()
        t[cfg.kv_lora_rank:] = t[cfg.kv_lora_rank:][perm]
    elif name.endswith("attn.wq.weight") or name.endswith("attn.wq_b.weight"):
        t = t.view(cfg.n_heads, nope + rope, -1).clone()
        t[:, nope:] = t[:, nope:][:, perm]
        t = t.flatten(0, 1)
    return t


# ---- writing ---------------------------------------------------------------------------------------
def to_hf(model: Transformer, path: str | Path, include_mtp: bool = True, max_shard_bytes: int | None = None,
          tokenizer_file: str | Path | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write `model` as a transformers DeepseekV3ForCausalLM directory (config.json + safetensors)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    v2 = cfg.score_func == "softmax"
    include_mtp = include_mtp and not v2
    hf_cfg = config_to_hf(dataclasses.replace(cfg, n_mtp=0) if v2 else cfg)
    if not include_mtp and not v2:
        hf_cfg["num_nextn_predict_layers"] = 0
    tensors: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if name.startswith("mtp.") and not include_mtp:
            continue
        if v2 and name.endswith("gate.bias"):
            if t.any():
                raise ConfigError(f"{name} (the gate's selection bias) is nonzero: DeepseekV2 has no place for it")
            continue
        t = t.detach().cpu()
        if dtype is not None and t.is_floating_point() and not name.endswith(("gate.bias", "gate.weight")):
            t = t.to(dtype)
        tensors[hf_name(name, cfg.n_layers)] = t.contiguous().clone()
    if include_mtp:
        for k in range(cfg.n_mtp):
            layer = cfg.n_layers + k
            tensors[f"model.layers.{layer}.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
            tensors[f"model.layers.{layer}.shared_head.head.weight"] = tensors["lm_head.weight"].clone()
    shards = _split_shards(tensors, max_shard_bytes)
    for old in list(path.glob("*.safetensors")) + [path / "model.safetensors.index.json"]:
        if old.exists():
            old.unlink()
    if len(shards) == 1:
        atomic_write(path / "model.safetensors", lambda tmp: save_file(shards[0], tmp, metadata={"format": "pt"}))
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            atomic_write(path / fname, lambda tmp, s=shard: save_file(s, tmp, metadata={"format": "pt"}))
            weight_map.update({k: fname for k in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        atomic_write_text(path / "model.safetensors.index.json",
                          json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    atomic_write_text(path / "config.json", json.dumps(hf_cfg, indent=2))
    atomic_write_text(path / "generation_config.json", json.dumps({"bos_token_id": 0, "eos_token_id": 1}, indent=2))
    if tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, path / "tokenizer.json")
    return path


def _split_shards(tensors: dict[str, torch.Tensor], max_bytes: int | None) -> list[dict[str, torch.Tensor]]:
    if not max_bytes:
        return [tensors]
    shards, cur, size = [], {}, 0
    for k, t in tensors.items():
        n = t.numel() * t.element_size()
        if cur and size + n > max_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = t
        size += n
    if cur:
        shards.append(cur)
    return shards
