"""Hugging Face interop (nanoseek.hf): logits parity with transformers' DeepseekV3ForCausalLM in both
directions (norm_topk_prob true and false), rope layout conversion, MTP weights, FP8 block dequantization
(128 and other block sizes), the checkpoint's dtype kept, one open per shard, and checkpoint errors.
transformers is required in CI (tests/conftest.py require_module), optional locally."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import require_module
from safetensors.torch import load_file, save_file

import nanoseek.hf

transformers = require_module("transformers")
from transformers import AutoModelForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402

from nanoseek.config import ModelConfig  # noqa: E402
from nanoseek.hf import CheckpointError, from_hf, to_hf  # noqa: E402
from nanoseek.model import Transformer  # noqa: E402

transformers.logging.set_verbosity_error()  # the load report lists the MTP layer as "unexpected": expected
transformers.utils.logging.disable_progress_bar()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def nano_cfg(**kw) -> ModelConfig:
    base = {"vocab_size": 96, "dim": 48, "inter_dim": 80, "moe_inter_dim": 16, "n_layers": 3,
            "n_dense_layers": 1, "n_heads": 3, "n_routed_experts": 8, "n_shared_experts": 1,
            "n_activated_experts": 2, "n_expert_groups": 1, "n_limited_groups": 1, "q_lora_rank": 0,
            "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 12,
            "max_seq_len": 64, "original_seq_len": 64, "n_mtp": 0, "init_std": 0.1}
    base.update(kw)
    return ModelConfig(**base).validate()


def random_nano(cfg: ModelConfig) -> Transformer:
    """Random weights large enough that every mapping error shows: norms ~ 1 + N(0, 0.1), selection bias
    ~ N(0, 0.05)."""
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.1)
        for m in model.moe_layers():
            m.gate.bias.normal_(0, 0.05)
    return model


def hf_config(**kw) -> DeepseekV3Config:
    base = {"vocab_size": 96, "hidden_size": 48, "intermediate_size": 80, "moe_intermediate_size": 16,
            "num_hidden_layers": 3, "first_k_dense_replace": 1, "num_attention_heads": 3,
            "num_key_value_heads": 3, "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2,
            "n_group": 1, "topk_group": 1, "routed_scaling_factor": 2.5, "q_lora_rank": None,
            "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 12,
            "max_position_embeddings": 64, "num_nextn_predict_layers": 0}
    base.update(kw)
    return DeepseekV3Config(**base)


def random_hf(config: DeepseekV3Config) -> DeepseekV3ForCausalLM:
    """A transformers model re-initialized with std 0.1 (norms ~ 1 + N(0, 0.1)), nonzero correction bias."""
    model = DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.1)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.05)
    return model


def yarn(factor: float, orig: int, mscale: float = 1.0) -> dict:
    return {"rope_type": "yarn", "rope_theta": 10000.0, "factor": factor, "beta_fast": 32, "beta_slow": 1,
            "original_max_position_embeddings": orig, "mscale": mscale, "mscale_all_dim": mscale}


NANO_CASES = {
    "plain": nano_cfg(route_scale=1.0),
    "qlora-groups-yarn-2shared-mtp": nano_cfg(q_lora_rank=24, n_expert_groups=4, n_limited_groups=2,
                                             n_activated_experts=3, n_shared_experts=2, route_scale=2.5,
                                             rope_factor=4.0, mscale=0.707, original_seq_len=16, n_mtp=1),
    "all-moe-8groups-yarn": nano_cfg(q_lora_rank=16, n_dense_layers=0, n_routed_experts=16,
                                     n_expert_groups=8, n_limited_groups=3, n_activated_experts=4,
                                     route_scale=2.5, rope_factor=8.0, original_seq_len=16),
    "dense-only": nano_cfg(n_routed_experts=0, n_dense_layers=3),
    "no-topk-norm-groups": nano_cfg(norm_topk_prob=False, n_expert_groups=4, n_limited_groups=2,
                                    n_activated_experts=3, route_scale=2.5),
}


@pytest.mark.parametrize("name", list(NANO_CASES))
def test_nanoseek_to_transformers_logits(name, tmp_path):
    """nanoseek -> to_hf -> AutoModelForCausalLM.from_pretrained: every weight is consumed (nothing missing)
    and float32 logits agree to 1e-4 relative error, also past original_seq_len under YaRN."""
    cfg = NANO_CASES[name]
    ours = random_nano(cfg)
    to_hf(ours, tmp_path)
    hf, info = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert all(k.startswith(f"model.layers.{cfg.n_layers}.") for k in info["unexpected_keys"])  # MTP only
    ids = torch.randint(0, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        theirs = hf.eval()(ids).logits
        mine = ours(ids)
    assert theirs.abs().mean() > 0.1  # far from trivial logits
    assert rel_err(mine, theirs) < 1e-4


HF_CASES = {
    "plain-single-file": (hf_config(), None),
    "qlora-groups-yarn-2shared-sharded": (
        hf_config(q_lora_rank=24, n_group=4, topk_group=2, num_experts_per_tok=3, n_shared_experts=2,
                  rope_parameters=yarn(4.0, 16, 0.707)), "20KB"),
    "all-moe-yarn-mtp-declared-sharded": (
        hf_config(q_lora_rank=16, first_k_dense_replace=0, n_routed_experts=16, n_group=8, topk_group=3,
                  num_experts_per_tok=4, rope_parameters=yarn(8.0, 16), num_nextn_predict_layers=1), "50KB"),
    "no-topk-norm-sharded": (hf_config(norm_topk_prob=False, num_experts_per_tok=3, n_group=4, topk_group=2),
                             "30KB"),
}


@pytest.mark.parametrize("name", list(HF_CASES))
def test_transformers_to_nanoseek_logits(name, tmp_path):
    """Random transformers model -> save_pretrained (single file or sharded) -> from_hf: same float32 logits
    (1e-4 relative), selection bias included."""
    config, shard = HF_CASES[name]
    hf = random_hf(config)
    hf.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    assert (tmp_path / "model.safetensors.index.json").exists() == bool(shard)
    ours = from_hf(tmp_path, verbose=False).eval()
    gate_bias = [k for k in ours.state_dict() if k.endswith("gate.bias")]
    assert gate_bias and all(ours.state_dict()[k].abs().sum() > 0 for k in gate_bias)
    ids = torch.randint(0, config.vocab_size, (2, 40))
    with torch.no_grad():
        theirs = hf(ids).logits
        mine = ours(ids)
    assert theirs.abs().mean() > 0.1
    assert rel_err(mine, theirs) < 1e-4


def test_rope_interleave_false_checkpoint(tmp_path):
    """A transformers checkpoint with rope_interleave=False (half-split rope rows) loads with its rope rows
    permuted: same logits as the transformers model."""
    hf = random_hf(hf_config(q_lora_rank=24, rope_interleave=False, rope_parameters=yarn(4.0, 16)))
    hf.save_pretrained(tmp_path)
    ours = from_hf(tmp_path, verbose=False).eval()
    plain = random_hf(hf_config(q_lora_rank=None, rope_interleave=False))
    plain.save_pretrained(tmp_path / "plain")
    ours_plain = from_hf(tmp_path / "plain", verbose=False).eval()
    ids = torch.randint(0, 96, (2, 40))
    with torch.no_grad():
        assert rel_err(ours(ids), hf(ids).logits) < 1e-4
        assert rel_err(ours_plain(ids), plain(ids).logits) < 1e-4


def test_mtp_weights_round_trip(tmp_path):
    """MTP module k is written at model.layers.{n_layers + k} (V3 release names, with copies of the shared
    embedding and head) and from_hf reads back every tensor bit-identical."""
    cfg = nano_cfg(n_mtp=2, q_lora_rank=16)
    ours = random_nano(cfg)
    to_hf(ours, tmp_path)
    keys = set(load_file(tmp_path / "model.safetensors"))
    for layer in (3, 4):
        for suffix in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                       "shared_head.head.weight", "embed_tokens.weight", "self_attn.q_a_proj.weight",
                       "mlp.gate.e_score_correction_bias", "mlp.experts.7.down_proj.weight"):
            assert f"model.layers.{layer}.{suffix}" in keys
    assert not any(k.startswith("model.layers.5.") for k in keys)
    back = from_hf(tmp_path)
    a, b = ours.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and any(k.startswith("mtp.1.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _edit_checkpoint(path, edit):
    f = path / "model.safetensors"
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


@pytest.mark.parametrize("kind,key", [
    ("missing", "model.layers.0.self_attn.kv_b_proj.weight"),
    ("unknown", "model.layers.1.self_attn.bogus_proj.weight"),
    ("shape", "model.layers.2.mlp.experts.5.up_proj.weight"),
])
def test_bad_checkpoint_names_the_key(kind, key, tmp_path):
    """A missing key, an unknown key or a wrong shape raises CheckpointError whose message names the key."""
    to_hf(random_nano(nano_cfg()), tmp_path)

    def edit(t):
        if kind == "missing":
            del t[key]
        elif kind == "unknown":
            t[key] = torch.zeros(4, 4)
        else:
            t[key] = torch.zeros(t[key].shape[0] + 1, t[key].shape[1])

    _edit_checkpoint(tmp_path, edit)
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        from_hf(tmp_path)


def test_missing_shard_is_a_checkpoint_error(tmp_path):
    """A sharded checkpoint whose index lists a file that is not there fails with the file's name."""
    to_hf(random_nano(nano_cfg()), tmp_path, max_shard_bytes=20_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    gone = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / gone).unlink()
    with pytest.raises(CheckpointError, match=gone):
        from_hf(tmp_path)


def _quantize_blocks(w: torch.Tensor, br: int = 128, bc: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """By hand: per br x bc block, scale = amax / 448, q = fp8(w / scale). Returns q, scale_inv, dequant."""
    R, C = w.shape
    nb_r, nb_c = -(-R // br), -(-C // bc)
    q = torch.empty(R, C, dtype=torch.float8_e4m3fn)
    scale = torch.empty(nb_r, nb_c)
    deq = torch.empty(R, C)
    for i in range(nb_r):
        for j in range(nb_c):
            blk = w[i * br:(i + 1) * br, j * bc:(j + 1) * bc]
            s = blk.abs().max() / 448
            qb = (blk / s).to(torch.float8_e4m3fn)
            q[i * br:(i + 1) * br, j * bc:(j + 1) * bc] = qb
            scale[i, j] = s
            deq[i * br:(i + 1) * br, j * bc:(j + 1) * bc] = qb.float() * s
    return q, scale, deq


def test_fp8_block_quantized_checkpoint_dequantizes(tmp_path):
    """float8_e4m3fn weights with a per-128x128-block weight_scale_inv (edge blocks partial, blocks with very
    different magnitudes) load as q * scale block by block; other tensors are untouched."""
    cfg = nano_cfg(inter_dim=200, n_dense_layers=1)
    ours = random_nano(cfg)
    to_hf(ours, tmp_path)
    expect = {}

    def edit(t):
        for name in ("model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.down_proj.weight"):
            w = t[name].clone()
            w[128:] *= 50  # gate_proj (200, 48): row blocks; down_proj (48, 200): rows 128+ absent, so ...
            w[:, 128:] *= 50  # ... down_proj's column blocks differ instead
            q, s, deq = _quantize_blocks(w)
            t[name], t[name.replace(".weight", ".weight_scale_inv")] = q, s
            expect[name] = deq

    _edit_checkpoint(tmp_path, edit)
    back = from_hf(tmp_path)
    sd = back.state_dict()
    assert torch.equal(sd["layers.0.ffn.w1.weight"], expect["model.layers.0.mlp.gate_proj.weight"])
    assert torch.equal(sd["layers.0.ffn.w2.weight"], expect["model.layers.0.mlp.down_proj.weight"])
    orig_w1 = ours.state_dict()["layers.0.ffn.w1.weight"].clone()
    orig_w1[128:] *= 50
    assert rel_err(sd["layers.0.ffn.w1.weight"], orig_w1) < 0.05
    assert torch.equal(sd["layers.0.ffn.w3.weight"], ours.state_dict()["layers.0.ffn.w3.weight"])


def test_fp8_block_size_from_quantization_config(tmp_path):
    """quantization_config.weight_block_size [32, 64] (not the default 128): each scale covers a 32x64
    block; a scale tensor whose shape does not fit the block size is a CheckpointError naming it."""
    cfg = nano_cfg(inter_dim=200)
    ours = random_nano(cfg)
    to_hf(ours, tmp_path)
    name = "model.layers.0.mlp.gate_proj.weight"  # (200, 48): 7 x 1 blocks of 32 x 64
    expect = {}

    def edit(t):
        w = t[name].clone()
        w *= torch.logspace(-2, 2, w.shape[0]).unsqueeze(1)  # every row block a different magnitude
        q, s, deq = _quantize_blocks(w, 32, 64)
        assert s.shape == (7, 1)
        t[name], t[name.replace(".weight", ".weight_scale_inv")] = q, s
        expect["w"] = deq

    _edit_checkpoint(tmp_path, edit)
    conf = json.loads((tmp_path / "config.json").read_text())
    conf["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [32, 64]}
    (tmp_path / "config.json").write_text(json.dumps(conf))
    back = from_hf(tmp_path)
    assert torch.equal(back.state_dict()["layers.0.ffn.w1.weight"], expect["w"])
    conf["quantization_config"]["weight_block_size"] = [16, 64]  # scale would be (13, 1)
    (tmp_path / "config.json").write_text(json.dumps(conf))
    with pytest.raises(CheckpointError, match=r"gate_proj\.weight_scale_inv"):
        from_hf(tmp_path)


def test_bf16_checkpoint_keeps_its_dtype(tmp_path):
    """A bfloat16 checkpoint loads as bfloat16 parameters bit-identical to the file (the gate's weight and
    bias in float32, rope tables in float32); dtype=torch.float32 gives the float32 copy, whose logits match
    transformers' float32 model of the same weights; the bf16 model runs with bf16 rounding error."""
    hf = random_hf(hf_config(q_lora_rank=24, num_experts_per_tok=3)).to(torch.bfloat16)
    hf.save_pretrained(tmp_path, max_shard_size="30KB")
    on_disk = {}
    for f in tmp_path.glob("*.safetensors"):
        on_disk.update(load_file(f))
    assert {t.dtype for t in on_disk.values()} == {torch.bfloat16}
    ours = from_hf(tmp_path, verbose=False).eval()
    dtypes = {n: p.dtype for n, p in ours.named_parameters()}
    assert {d for n, d in dtypes.items() if not n.endswith("gate.weight")} == {torch.bfloat16}
    assert {d for n, d in dtypes.items() if n.endswith("gate.weight")} == {torch.float32}
    assert ours.rope_cos.dtype == torch.float32 and ours.layers[1].ffn.gate.bias.dtype == torch.float32
    sd = ours.state_dict()
    assert torch.equal(sd["layers.1.attn.wq_b.weight"], on_disk["model.layers.1.self_attn.q_b_proj.weight"])
    assert torch.equal(sd["layers.2.ffn.experts.3.w2.weight"], on_disk["model.layers.2.mlp.experts.3.down_proj.weight"])
    full = from_hf(tmp_path, dtype=torch.float32, verbose=False).eval()
    assert {p.dtype for p in full.parameters()} == {torch.float32}
    ids = torch.randint(0, 96, (2, 24))
    with torch.no_grad():
        theirs = hf.float()(ids).logits
        assert rel_err(full(ids), theirs) < 1e-4
        low = ours(ids)  # computed in bf16: rounding error per token (a near-tie may flip one token's experts)
        per_token = ((low - theirs).norm(dim=-1) / theirs.norm(dim=-1)).flatten()
        assert low.isfinite().all() and 0 < per_token.median() < 0.03
        assert torch.equal(ours.float()(ids), full(ids))  # the same numbers, only stored in bf16


def test_each_shard_is_opened_once(tmp_path, monkeypatch):
    """Streaming: from_hf opens every shard that holds a tensor it needs exactly once (not once per tensor);
    a shard holding only the MTP layer's copies of the shared embedding / head is not read."""
    to_hf(random_nano(nano_cfg(n_mtp=1)), tmp_path, max_shard_bytes=40_000)
    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    copies = ("model.layers.3.embed_tokens.weight", "model.layers.3.shared_head.head.weight")
    needed = sorted({str(tmp_path / f) for k, f in weight_map.items() if k not in copies})
    assert len(needed) >= 4
    opened = []
    real = nanoseek.hf._open_shard

    def counting(f):
        opened.append(str(f))
        return real(f)

    monkeypatch.setattr(nanoseek.hf, "_open_shard", counting)
    from_hf(tmp_path)
    assert sorted(opened) == needed


def test_require_module_skips_locally_and_fails_in_ci(monkeypatch):
    """tests/conftest.py require_module: a missing dependency skips outside CI and raises inside it."""
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        require_module("nanoseek_no_such_module")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(ImportError):
        require_module("nanoseek_no_such_module")
    assert require_module("json") is json


def test_truncated_shard_is_a_checkpoint_error(tmp_path):
    """A shard cut short (an interrupted download) fails up front with a CheckpointError naming the file."""
    to_hf(random_nano(nano_cfg()), tmp_path, max_shard_bytes=40_000)
    shard = sorted(tmp_path.glob("*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=shard.name):
        from_hf(tmp_path)
