"""A tiny MoE base run on disk (tokenizer.json, config.json, one checkpoint at step 1) for tests that need a
run directory to start GRPO / DPO / the aha pipeline from."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from nanoseek.config import ModelConfig
from nanoseek.model import Transformer
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.checkpoint import save_checkpoint


def write_tiny_run(run: Path, texts: list[str], vocab_size: int = 300, max_seq_len: int = 128) -> Path:
    """Train a tokenizer on `texts`, build a seeded 2-layer MoE (4 experts, 2 active) and save both in `run`."""
    tok = Tokenizer.train(texts, vocab_size=vocab_size)
    tok.save(run / "tokenizer.json")
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, dim=32, inter_dim=64, moe_inter_dim=32, n_layers=2,
                                    n_dense_layers=1, n_heads=2, n_routed_experts=4, n_activated_experts=2,
                                    kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                                    max_seq_len=max_seq_len, original_seq_len=max_seq_len))
    (run / "config.json").write_text(json.dumps({"model": model.cfg.to_dict()}))
    save_checkpoint(run / "checkpoints", 1, model, None, {})
    return run
