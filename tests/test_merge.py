"""Model merging: the merged run's weights are the elementwise (weighted) average of the runs' weights."""
import json

import pytest
import torch

from nanoseek.cli import main
from nanoseek.config import ConfigError, ModelConfig
from nanoseek.corpus import corpus_texts
from nanoseek.model import Transformer
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.checkpoint import load_run_model, save_checkpoint
from nanoseek.train.merge import average_state_dicts


def make_run(root, seed, tok, dim=32):
    root.mkdir()
    tok.save(root / "tokenizer.json")
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=dim, inter_dim=64, moe_inter_dim=32, n_layers=2, n_dense_layers=1,
                      n_heads=2, n_routed_experts=4, n_activated_experts=2, kv_lora_rank=16, qk_nope_head_dim=8,
                      qk_rope_head_dim=8, v_head_dim=8, max_seq_len=64, original_seq_len=64)
    model = Transformer(cfg)
    with torch.no_grad():
        for m in model.moe_layers():  # distinct routing biases, so buffers are averaged too
            m.gate.bias.uniform_(-1, 1)
    (root / "config.json").write_text(json.dumps({"model": cfg.to_dict()}))
    save_checkpoint(root / "checkpoints", 3, model, None, {})
    return root


def test_merge_is_the_elementwise_average(tmp_path):
    tok = Tokenizer.train(corpus_texts("arithmetic", 200, seed=0), vocab_size=300)
    a, b = make_run(tmp_path / "a", 1, tok), make_run(tmp_path / "b", 2, tok)
    assert main(["merge", "--runs", str(a), str(b), "--out", str(tmp_path / "m")]) == 0
    assert main(["merge", "--runs", str(a), str(b), "--weights", "3", "1", "--out", str(tmp_path / "w")]) == 0
    sa, sb = (load_run_model(r)[0].state_dict() for r in (a, b))
    sm, sw = (load_run_model(tmp_path / r)[0].state_dict() for r in ("m", "w"))
    assert sa.keys() == sm.keys()
    n_diff = 0
    for k in sa:  # naive reference, tensor by tensor
        n_diff += not torch.equal(sa[k], sb[k])
        torch.testing.assert_close(sm[k], (sa[k] + sb[k]) / 2, rtol=0, atol=1e-6)
        torch.testing.assert_close(sw[k], 0.75 * sa[k] + 0.25 * sb[k], rtol=0, atol=1e-6)
    assert n_diff > len(sa) // 2  # the two runs really differ


def test_merge_refuses_mismatched_runs(tmp_path):
    tok = Tokenizer.train(corpus_texts("arithmetic", 200, seed=0), vocab_size=300)
    a, c = make_run(tmp_path / "a", 1, tok), make_run(tmp_path / "c", 1, tok, dim=48)
    with pytest.raises(ConfigError):
        from nanoseek.train.merge import merge_runs

        merge_runs([a, c], tmp_path / "x")
    with pytest.raises(ConfigError):
        average_state_dicts([{"w": torch.ones(2)}], weights=[0.0])
