"""GGUF export (nanoseek.gguf_export): the file read back with gguf.GGUFReader against nanoseek's own modules,
llama.cpp's deepseek2 forward re-implemented in numpy from the file alone (tests/gguf_reference.py) against
nanoseek's logits, quantized types, the tokenizer metadata and every refusal. The checks that run llama.cpp
itself (llama-cpp-python, optional: `make llamacpp`) are in tests/test_gguf_llamacpp.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from nanoseek.config import ConfigError, ModelConfig
from nanoseek.gguf_export import write_gguf
from nanoseek.model import Transformer
from nanoseek.tokenizer import SPECIAL_TOKENS, Tokenizer
from tests.gguf_reference import GGUFModel

TEXTS = ["What is 12 + 7? <think>12 + 7 = 19</think><answer>19</answer>", "the cat sat on 3 mats, didn't it?",
         "def f(x):\n    return x * 2  # twice\n"] * 8

BASE = dict(dim=32, inter_dim=64, moe_inter_dim=32, n_layers=3, n_dense_layers=1, n_heads=2, n_routed_experts=4,
            n_activated_experts=2, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
            max_seq_len=64, original_seq_len=64, init_std=0.08)
CONFIGS = {
    "v3-qfull": {},  # q_lora_rank 0 (one W_Q), sigmoid gate, one group, MTP (dropped)
    "v3-groups": dict(q_lora_rank=16, n_routed_experts=8, n_expert_groups=4, n_limited_groups=2, route_scale=2.5,
                      n_shared_experts=2),
    "v2-softmax": dict(score_func="softmax", n_mtp=0, rope_theta=50000.0),
    "dense": dict(n_routed_experts=0, n_dense_layers=3, n_mtp=0),
}


@pytest.fixture(scope="module")
def tok_file(tmp_path_factory) -> Path:
    return Tokenizer.train(TEXTS, vocab_size=300).save(tmp_path_factory.mktemp("tok") / "tokenizer.json")


def make_model(vocab: int, **over) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=vocab, **{**BASE, **over}).validate()).eval()
    with torch.no_grad():  # non-trivial norms and selection biases, so a misplaced one shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
        for m in model.moe_layers():
            m.gate.bias.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("name", CONFIGS)
def test_numpy_deepseek2_forward_equals_nanoseek(name, tok_file, tmp_path):
    """llama.cpp's graph, computed from the file alone, gives nanoseek's logits at every position."""
    vocab = Tokenizer.load(tok_file).vocab_size
    model = make_model(vocab, **CONFIGS[name])
    path = write_gguf(model, tok_file, tmp_path / "m.gguf", verbose=False)
    ids = torch.randint(0, vocab, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids)[0].double().numpy()
    got = GGUFModel(str(path)).logits(ids[0].tolist())
    assert np.abs(want).max() > 0.1
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_tensors_read_back_against_modules(tok_file, tmp_path):
    """Every tensor of the file equals the nanoseek weight it comes from, looked up by module, not by name map."""
    vocab = Tokenizer.load(tok_file).vocab_size
    model = make_model(vocab, **CONFIGS["v3-groups"])
    cfg = model.cfg
    r = gguf.GGUFReader(str(write_gguf(model, tok_file, tmp_path / "m.gguf", verbose=False)))
    got = {t.name: np.asarray(t.data) for t in r.tensors}
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in r.tensors)
    want = {"token_embd.weight": model.embed.weight, "output_norm.weight": model.norm.weight,
            "output.weight": model.head.weight}
    H, nope, v, rank = cfg.n_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    for i, layer in enumerate(model.layers):
        p, a = f"blk.{i}.", layer.attn
        wkv_b = a.wkv_b.weight.view(H, nope + v, rank)
        want.update({p + "attn_norm.weight": layer.attn_norm.weight, p + "ffn_norm.weight": layer.ffn_norm.weight,
                     p + "attn_q_a.weight": a.wq_a.weight, p + "attn_q_a_norm.weight": a.q_norm.weight,
                     p + "attn_q_b.weight": a.wq_b.weight, p + "attn_kv_a_mqa.weight": a.wkv_a.weight,
                     p + "attn_kv_a_norm.weight": a.kv_norm.weight, p + "attn_output.weight": a.wo.weight,
                     p + "attn_k_b.weight": torch.stack([wkv_b[h, :nope].t() for h in range(H)]),
                     p + "attn_v_b.weight": torch.stack([wkv_b[h, nope:] for h in range(H)])})
        f = layer.ffn
        if i < cfg.n_dense_layers:
            want.update({p + "ffn_gate.weight": f.w1.weight, p + "ffn_down.weight": f.w2.weight,
                         p + "ffn_up.weight": f.w3.weight})
            continue
        for ours, theirs in (("w1", "gate"), ("w2", "down"), ("w3", "up")):
            want[p + f"ffn_{theirs}_exps.weight"] = torch.stack([getattr(e, ours).weight for e in f.experts])
            want[p + f"ffn_{theirs}_shexp.weight"] = getattr(f.shared_experts, ours).weight
        want[p + "ffn_gate_inp.weight"] = f.gate.weight
        want[p + "exp_probs_b.bias"] = f.gate.bias
    assert sorted(got) == sorted(want)  # nothing missing, nothing extra (MTP dropped)
    for k, w in want.items():
        np.testing.assert_array_equal(got[k], w.detach().numpy(), err_msg=k)


def test_metadata(tok_file, tmp_path):
    vocab = Tokenizer.load(tok_file).vocab_size
    cfg = make_model(vocab, **CONFIGS["v3-groups"]).cfg
    r = gguf.GGUFReader(str(write_gguf(make_model(vocab, **CONFIGS["v3-groups"]), tok_file, tmp_path / "m.gguf",
                                       verbose=False)))
    kv = {k: f.contents() for k, f in r.fields.items()}
    a = "deepseek2."
    assert kv["general.architecture"] == "deepseek2"
    assert kv[a + "block_count"] == cfg.n_layers and kv[a + "leading_dense_block_count"] == 1
    assert (kv[a + "attention.q_lora_rank"], kv[a + "attention.kv_lora_rank"]) == (16, 16)
    assert kv[a + "attention.key_length_mla"] == 16 and kv[a + "attention.value_length_mla"] == 8
    assert kv[a + "attention.head_count_kv"] == 1 and kv[a + "rope.dimension_count"] == 8
    assert (kv[a + "expert_count"], kv[a + "expert_used_count"], kv[a + "expert_shared_count"]) == (8, 2, 2)
    assert (kv[a + "expert_group_count"], kv[a + "expert_group_used_count"]) == (4, 2)
    assert kv[a + "expert_gating_func"] == gguf.ExpertGatingFuncType.SIGMOID
    assert kv[a + "expert_weights_norm"] is True and kv[a + "expert_weights_scale"] == pytest.approx(2.5)
    assert kv["general.file_type"] == gguf.LlamaFileType.ALL_F32


def test_tokenizer_metadata(tmp_path):
    for style, pre in (("task", "smollm"), ("text", "qwen2")):
        tok = Tokenizer.train(TEXTS, vocab_size=300, style=style)
        f = tok.save(tmp_path / style / "tokenizer.json")
        model = make_model(tok.vocab_size + 5, n_mtp=0)  # an embedding with rows past the vocabulary
        r = gguf.GGUFReader(str(write_gguf(model, f, tmp_path / f"{style}.gguf", verbose=False)))
        kv = {k: fl.contents() for k, fl in r.fields.items()}
        assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == pre
        tokens, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"]
        assert len(tokens) == len(types) == tok.vocab_size + 5
        assert tokens[:tok.vocab_size] == [tok._tok.id_to_token(i) for i in range(tok.vocab_size)]
        assert tokens[tok.vocab_size:] == [f"[PAD{i}]" for i in range(tok.vocab_size, tok.vocab_size + 5)]
        assert types[:len(SPECIAL_TOKENS)] == [gguf.TokenType.CONTROL] * len(SPECIAL_TOKENS)
        assert set(types[len(SPECIAL_TOKENS):tok.vocab_size]) == {gguf.TokenType.NORMAL}
        assert set(types[tok.vocab_size:]) == {gguf.TokenType.UNUSED}
        merges = json.loads(f.read_text())["model"]["merges"]
        assert kv["tokenizer.ggml.merges"] == [" ".join(m) for m in merges]
        assert len(merges) == tok.vocab_size - len(SPECIAL_TOKENS) - 256
        assert (kv["tokenizer.ggml.bos_token_id"], kv["tokenizer.ggml.eos_token_id"]) == (0, 1)
        assert kv["tokenizer.ggml.add_bos_token"] is False


def test_chat_template_renders_as_chat_document(tok_file):
    """tokenizer.chat_template (Jinja, as llama.cpp and transformers render it) gives Tokenizer.chat_ids' tokens."""
    import jinja2

    from nanoseek.gguf_tokenizer import CHAT_TEMPLATE

    tok = Tokenizer.load(tok_file)
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "What is 12 + 7?"},
            {"role": "assistant", "content": "<think>12 + 7</think><answer>19</answer>"},
            {"role": "user", "content": "and 3 * 3?"}]
    for gen in (True, False):
        text = jinja2.Environment().from_string(CHAT_TEMPLATE).render(
            messages=msgs, add_generation_prompt=gen, bos_token="<|bos|>", eos_token="<|eos|>")
        assert tok.encode(text) == tok.chat_ids(msgs, add_generation_prompt=gen)


@pytest.mark.parametrize("dtype", ["f16", "bf16", "q8_0"])
def test_quantized_types(dtype, tok_file, tmp_path):
    """2-D weights in the asked type (dequantized within its rounding), norms / router / bias stay f32, rows that
    do not fill q8_0's 32-value blocks fall back to f16 (as the converter); the reference still tracks nanoseek."""
    vocab = Tokenizer.load(tok_file).vocab_size
    model = make_model(vocab, **CONFIGS["v3-groups"])
    path = write_gguf(model, tok_file, tmp_path / "m.gguf", dtype=dtype, verbose=False)
    r = gguf.GGUFReader(str(path))
    qt = {"f16": gguf.GGMLQuantizationType.F16, "bf16": gguf.GGMLQuantizationType.BF16,
          "q8_0": gguf.GGMLQuantizationType.Q8_0}[dtype]
    F32, F16 = gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16
    ref = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(write_gguf(
        model, tok_file, tmp_path / "f.gguf", verbose=False))).tensors}
    for t in r.tensors:
        if len(t.shape) == 1 or "norm" in t.name or "gate_inp" in t.name or t.name.endswith(".bias"):
            assert t.tensor_type == F32, t.name
            continue
        want = qt if dtype != "q8_0" or t.shape[0] % 32 == 0 else F16
        assert t.tensor_type == want, t.name
        data = t.data if want == F16 else gguf.quants.dequantize(t.data, want)
        w = ref[t.name]
        tol = {"f16": 2 ** -11, "bf16": 2 ** -8, "q8_0": 1 / 127}[dtype if want == qt else "f16"]
        assert np.abs(np.asarray(data, np.float32) - w).max() <= tol * np.abs(w).max() + 1e-8, t.name
    ids = list(range(10, 22))
    with torch.no_grad():
        want_logits = model(torch.tensor([ids]))[0].double().numpy()
    got = GGUFModel(str(path)).logits(ids)
    err = np.abs(got - want_logits).max() / np.abs(want_logits).max()
    assert err < {"f16": 0.01, "bf16": 0.05, "q8_0": 0.05}[dtype]


@pytest.mark.parametrize("over, msg", [
    (dict(q_lora_rank=16, index_topk=4, index_n_heads=2, index_head_dim=8), "sparse attention"),
    (dict(n_shared_experts=0), "shared expert"),
    (dict(score_func="softmax", n_routed_experts=8, n_expert_groups=4, n_limited_groups=2), "top-2 sum"),
])
def test_refusals_write_nothing(over, msg, tok_file, tmp_path):
    model = make_model(Tokenizer.load(tok_file).vocab_size, **over)
    with pytest.raises(ConfigError, match=msg):
        write_gguf(model, tok_file, tmp_path / "m.gguf", verbose=False)
    assert os.listdir(tmp_path) == []


def test_cli(tok_file, tmp_path):
    """The command on a run directory: notes and one summary line; user mistakes are one line, exit 2."""
    from nanoseek.train.checkpoint import save_checkpoint

    run = tmp_path / "run"
    run.mkdir()
    (run / "tokenizer.json").write_bytes(tok_file.read_bytes())
    model = make_model(Tokenizer.load(tok_file).vocab_size)
    (run / "config.json").write_text('{"model": %s}' % model.cfg.to_json())
    save_checkpoint(run / "checkpoints", 3, model, None, {})
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "nanoseek.cli", "export", *args], capture_output=True,
                              text=True, env=env, timeout=300)

    out = tmp_path / "out.gguf"
    p = cli("--run", str(run), "--gguf", str(out))
    assert p.returncode == 0, p.stderr
    assert "dropped 1 MTP module(s)" in p.stdout and "step_3" in p.stdout and out.is_file()
    for args, msg in [(("--run", str(tmp_path / "nope"), "--gguf", str(out)), "does not exist"),
                      (("--gguf", str(out)), "--run RUN"),
                      (("--run", str(run), "--gguf", str(tmp_path)), "is a directory"),
                      (("--run", str(run), "--gguf", str(out), "--step", "9"), "no checkpoint for step 9")]:
        p = cli(*args)
        assert p.returncode == 2 and p.stderr.count("\n") == 1 and msg in p.stderr, (args, p.stderr)
    (run / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": {}, "merges": []}, '
                                        '"pre_tokenizer": {"type": "Whitespace"}}')
    p = cli("--run", str(run), "--gguf", str(tmp_path / "x.gguf"))
    assert p.returncode == 2 and "not one nanoseek trained" in p.stderr and not (tmp_path / "x.gguf").exists()


def test_imported_tokenizer_refused(tok_file, tmp_path):
    from nanoseek.gguf_tokenizer import vocab_metadata

    spec = tok_file.read_text().replace('"Digits"', '"Metaspace"')
    (tmp_path / "t.json").write_text(spec)
    with pytest.raises(ConfigError, match="convert_hf_to_gguf"):
        vocab_metadata(tmp_path / "t.json", 400)
    with pytest.raises(ConfigError, match="embedding only 10 rows"):
        vocab_metadata(tok_file, 10)


def test_yarn_keys(tok_file, tmp_path):
    cfg = dict(rope_factor=4.0, original_seq_len=16, max_seq_len=64, mscale=0.707)
    model = make_model(Tokenizer.load(tok_file).vocab_size, **cfg)
    kv = {k: f.contents() for k, f in gguf.GGUFReader(str(write_gguf(
        model, tok_file, tmp_path / "m.gguf", verbose=False))).fields.items()}
    assert kv["deepseek2.rope.scaling.type"] == "yarn" and kv["deepseek2.rope.scaling.factor"] == 4.0
    assert kv["deepseek2.rope.scaling.original_context_length"] == 16
    assert kv["deepseek2.rope.scaling.yarn_log_multiplier"] == pytest.approx(0.0707)


def test_export_options_come_from_the_config_dataclass():
    """Every ExportConfig field is one generated option; the GGUF dtype choices are the exporter's."""
    import argparse
    import dataclasses as dc

    from nanoseek.commands import export
    from nanoseek.gguf_export import _QTYPE

    p = argparse.ArgumentParser()
    export.add_arguments(p)
    flags = {a.dest: a for a in p._actions}
    for f in dc.fields(export.ExportConfig):
        assert f.name in flags and f.metadata.get("knob") is not None
    assert export.GGUF_DTYPES == tuple(_QTYPE) and set(export.GGUF_DTYPES) <= set(flags["dtype"].choices)
    cfg = export.CLI.resolve(p.parse_args(["--run", "r", "--gguf", "f.gguf", "--dtype", "q8_0"]))
    assert (cfg.run, cfg.gguf, cfg.dtype, cfg.step) == ("r", "f.gguf", "q8_0", None)
