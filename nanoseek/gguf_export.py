"""Export a nanoseek model as a GGUF file for llama.cpp's `deepseek2` architecture (the `gguf` package writes it).

The tensors follow llama.cpp's `convert_hf_to_gguf.py` (DeepseekV2Model, which also converts DeepseekV3): each
nanoseek weight takes its transformers name (nanoseek.hf.hf_name), which gguf's TensorNameMap maps to the GGUF
name, with the converter's three rewrites:
- `kv_b_proj` (H*(nope+v), r) is split per head into `attn_k_b` = W_UK^T (H, r, nope) and `attn_v_b` = W_UV
  (H, v, r): llama.cpp's absorbed MLA (its PR #12801) attends over the latent cache as nanoseek's decode does;
- the routed experts of a layer are stacked into `ffn_{gate,up,down}_exps` (E, out, in);
- `e_score_correction_bias` (nanoseek's selection bias) becomes `exp_probs_b.bias`.
Metadata: the `deepseek2` keys the converter writes (MLA ranks and head sizes, MQA with one kv head, leading
dense blocks, expert counts, shared experts, `expert_weights_norm`, `expert_weights_scale` (route_scale),
`expert_gating_func` (sigmoid for V3, softmax for V2), group-limited routing counts, RoPE base, YaRN), plus the
tokenizer and chat template (nanoseek.gguf_tokenizer). `q_lora_rank` is always written (0 = a full-rank W_Q):
llama.cpp reads it for every deepseek2 model except 26/27-layer ones, which it takes for V2-Lite.

dtypes as the converter's: f32 everything; f16 / bf16 / q8_0 for the 2-D weights, while norms, 1-D tensors, the
router (`ffn_gate_inp`) and the selection bias stay f32, and a tensor whose rows do not fill q8_0's 32-value
blocks falls back to f16 (printed).

What llama.cpp's deepseek2 cannot hold is said on export, never silently lost: MTP modules are dropped (printed;
llama.cpp loads DeepSeek's MTP only through its GLM-style NextN path, which needs q_lora_rank > 0 and is not
used for plain decoding); simulated FP8 (`fp8`) exports the full-precision master weights (printed: llama.cpp's
result is the unquantized model's). Refused in one line: sparse attention (V3.2's indexer, another
architecture), a MoE without a shared expert (deepseek2 requires one), a softmax gate with group-limited routing
(V2 ranks groups by their best expert, llama.cpp by the top-2 sum), a q low-rank on 26/27 layers (see above).
YaRN (rope_factor > 1) is written as the converter writes it (`rope_scaling.*`, `yarn_log_mul` = 0.1 * mscale)
and checked against nanoseek in tests/test_gguf.py.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import gguf
import numpy as np
import torch

from nanoseek.config import ConfigError, ModelConfig
from nanoseek.gguf_tokenizer import add_tokenizer, vocab_metadata
from nanoseek.hf import hf_name
from nanoseek.io import atomic_write

ARCH = gguf.MODEL_ARCH.DEEPSEEK2
_QTYPE = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
          "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}
_FTYPE = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
          "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}


def check_exportable(cfg: ModelConfig) -> list[str]:
    """Refuse what llama.cpp's deepseek2 cannot run (ConfigError); return the notes to print for what it drops."""
    if cfg.sparse_attention:
        raise ConfigError("sparse attention (index_topk > 0) is DeepSeek-V3.2's architecture, not deepseek2: "
                          "export a dense-attention model")
    moe = cfg.n_routed_experts > 0 and cfg.n_dense_layers < cfg.n_layers
    if moe and cfg.n_shared_experts < 1:
        raise ConfigError("llama.cpp's deepseek2 needs at least one shared expert per MoE layer")
    if moe and cfg.score_func == "softmax" and cfg.n_limited_groups < cfg.n_expert_groups:
        raise ConfigError("a softmax gate with group-limited routing ranks groups by their best expert (V2); "
                          "llama.cpp ranks them by the top-2 sum: not representable")
    if cfg.n_layers in (26, 27) and cfg.q_lora_rank > 0:
        raise ConfigError(f"llama.cpp reads a {cfg.n_layers}-layer deepseek2 as DeepSeek-V2-Lite (no q_lora_rank): "
                          "a model with q_lora_rank > 0 would not load")
    notes = []
    if cfg.n_mtp:
        notes.append(f"dropped {cfg.n_mtp} MTP module(s): llama.cpp's deepseek2 decodes without them")
    if cfg.fp8:
        notes.append("fp8 simulation is not represented: the full-precision master weights are exported")
    if cfg.rope_factor > 1:
        notes.append(f"YaRN (factor {cfg.rope_factor}) written as llama.cpp's rope_scaling.* keys")
    return notes


def _metadata(w: gguf.GGUFWriter, cfg: ModelConfig, dtype: str) -> None:
    moe = cfg.n_routed_experts > 0 and cfg.n_dense_layers < cfg.n_layers
    w.add_name("nanoseek")
    w.add_block_count(cfg.n_layers)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_feed_forward_length(cfg.inter_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(1)  # absorbed MLA is MQA over the latent
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_leading_dense_block_count(cfg.n_dense_layers if moe else cfg.n_layers)
    w.add_vocab_size(cfg.vocab_size)
    w.add_q_lora_rank(cfg.q_lora_rank)
    w.add_kv_lora_rank(cfg.kv_lora_rank)
    w.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    w.add_value_length(cfg.kv_lora_rank)
    w.add_key_length_mla(cfg.qk_head_dim)
    w.add_value_length_mla(cfg.v_head_dim)
    w.add_rope_dimension_count(cfg.qk_rope_head_dim)
    w.add_expert_feed_forward_length(cfg.moe_inter_dim if moe else cfg.inter_dim)
    w.add_expert_shared_count(cfg.n_shared_experts if moe else 0)
    if moe:
        w.add_expert_count(cfg.n_routed_experts)
        w.add_expert_used_count(cfg.n_activated_experts)
        limited = cfg.n_limited_groups < cfg.n_expert_groups  # all groups kept = plain top-k (llama.cpp: 1 group)
        w.add_expert_group_count(cfg.n_expert_groups if limited else 1)
        w.add_expert_group_used_count(cfg.n_limited_groups if limited else 1)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if cfg.score_func == "sigmoid"
                                 else gguf.ExpertGatingFuncType.SOFTMAX)
        w.add_expert_weights_scale(cfg.route_scale)
        w.add_expert_weights_norm(cfg.normalizes_topk)
    if cfg.rope_factor > 1:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(cfg.rope_factor)
        w.add_rope_scaling_orig_ctx_len(cfg.original_seq_len)
        w.add_rope_scaling_yarn_beta_fast(cfg.beta_fast)
        w.add_rope_scaling_yarn_beta_slow(cfg.beta_slow)
        w.add_rope_scaling_yarn_log_mul(0.1 * cfg.mscale)  # the converter's 0.1 * mscale_all_dim
    w.add_file_type(_FTYPE[dtype])


def hf_tensors(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """transformers-named float32 tensors after convert_hf_to_gguf's DeepseekV2 rewrites (experts stacked,
    kv_b split into k_b / v_b, the selection bias as `.bias`), MTP dropped, in nanoseek's order."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, torch.Tensor]] = {}
    for name, t in state.items():
        if name.startswith("mtp."):
            continue
        key, t = hf_name(name, cfg.n_layers), t.detach().float().cpu()
        m = re.fullmatch(r"(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(\w+)\.weight", key)
        if m:
            stacked = f"{m.group(1)}.{m.group(3)}.weight"
            experts.setdefault(stacked, {})[int(m.group(2))] = t
            if len(experts[stacked]) == cfg.n_routed_experts:
                out[stacked] = torch.stack([experts[stacked][e] for e in range(cfg.n_routed_experts)])
            continue
        if key.endswith("kv_b_proj.weight"):
            kv_b = t.view(cfg.n_heads, cfg.qk_nope_head_dim + cfg.v_head_dim, cfg.kv_lora_rank)
            k_b, v_b = kv_b.split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=1)
            out[key.replace("kv_b_proj", "k_b_proj")] = k_b.transpose(1, 2).contiguous()
            out[key.replace("kv_b_proj", "v_b_proj")] = v_b.contiguous()
            continue
        out[key.replace("e_score_correction_bias", "e_score_correction.bias")] = t
    return out


def gguf_tensors(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """GGUF name -> float32 array (numpy shape; GGUF stores the dimensions reversed)."""
    names = gguf.get_tensor_name_map(ARCH, cfg.n_layers)
    out = {}
    for key, t in hf_tensors(state, cfg).items():
        new = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ConfigError(f"no GGUF name for tensor {key}")
        out[new] = t.numpy()
    return out


def _qtype(name: str, data: np.ndarray, dtype: str) -> gguf.GGMLQuantizationType:
    """The converter's rule: norms, 1-D tensors, the router and anything not a `.weight` stay f32."""
    if data.ndim <= 1 or name.endswith("_norm.weight") or ".ffn_gate_inp." in name or not name.endswith(".weight"):
        return gguf.GGMLQuantizationType.F32
    return _QTYPE[dtype]


def write_gguf(model: torch.nn.Module, tokenizer_file: str | Path, path: str | Path, dtype: str = "f32",
               verbose: bool = True) -> Path:
    """Write `model` (a nanoseek Transformer) and its tokenizer as one GGUF file, atomically."""
    if dtype not in _QTYPE:
        raise ConfigError(f"dtype must be one of {', '.join(_QTYPE)}, got {dtype!r}")
    cfg: ModelConfig = model.cfg
    notes = check_exportable(cfg)
    meta = vocab_metadata(tokenizer_file, cfg.vocab_size)
    tensors = gguf_tensors(model.state_dict(), cfg)
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a directory: give a file name (e.g. {path / 'model.gguf'})")

    def write(tmp: str) -> None:
        w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[ARCH])
        _metadata(w, cfg, dtype)
        add_tokenizer(w, meta)
        for name, data in tensors.items():
            qtype = _qtype(name, data, dtype)
            try:
                raw = gguf.quants.quantize(data, qtype)
            except gguf.QuantError:  # rows not a multiple of the block size: the converter's f16 fallback
                notes.append(f"{name} {tuple(data.shape)}: rows do not fill {qtype.name} blocks, written as F16")
                qtype = gguf.GGMLQuantizationType.F16
                raw = gguf.quants.quantize(data, qtype)
            w.add_tensor(name, raw, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    atomic_write(path, write)
    if verbose:
        for note in notes:
            print(f"note: {note}")
    return path


def export_run(run: str | Path, out: str | Path, dtype: str = "f32", step: int | None = None,
               verbose: bool = True) -> Path:
    """A run's latest (or `step`) checkpoint and its tokenizer.json -> the GGUF file `out`."""
    from nanoseek.train.checkpoint import load_run_model

    run = Path(run)
    if not run.is_dir():
        raise ConfigError(f"run directory {run} does not exist")
    if (run / "tokenizer_config.json").is_file():
        raise ConfigError(f"{run} is an imported checkpoint: convert the original with llama.cpp's "
                          "convert_hf_to_gguf.py (its tokenizer is not one nanoseek trained)")
    tok = run / "tokenizer.json"
    if not tok.is_file():
        raise ConfigError(f"{run} has no tokenizer.json")
    model, _, step_dir = load_run_model(run, step)
    path = write_gguf(model, tok, out, dtype, verbose)
    if verbose:
        size = os.path.getsize(path) / 2**20
        print(f"exported {step_dir} -> {path} (deepseek2, {dtype}, {size:.1f} MiB, "
              f"tokenizer.ggml.pre={vocab_metadata(tok, model.cfg.vocab_size)['pre']})")
    return path
