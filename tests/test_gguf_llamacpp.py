"""The exported GGUF run in llama.cpp itself (slow; skipped without a llama.cpp binding: `make llamacpp`).

A small MoE is pretrained here on the arithmetic task (so its logits have a trained model's margins), exported with
`nanoseek export`, and decoded by llama.cpp through its C API (bench/llamacpp_runner.py):
- f32: 64 greedy tokens after each of 8 held-out prompts equal nanoseek's engine's, at batch 1 and with all 8 as
  parallel sequences in one llama.cpp context; the first new token's logits agree within 1e-3 of their range;
- q8_0: the first token's argmax agrees with nanoseek's on most prompts (the full measurement, 200 prompts and
  pass@1, is bench/gguf_check.py);
- tokenization: llama.cpp's `tokenize` (pre-tokenizer `smollm`) gives nanoseek's ids on task text.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
try:
    from bench.llamacpp_runner import LlamaCpp, _Binding

    _Binding()
except (ImportError, OSError, RuntimeError) as e:  # no binding, or a library that does not load here
    pytest.skip(f"no llama.cpp binding ({type(e).__name__}: {e})", allow_module_level=True)

from nanoseek.engine import Engine  # noqa: E402
from nanoseek.train.checkpoint import load_run_model  # noqa: E402

MODEL = {"dim": 64, "inter_dim": 128, "moe_inter_dim": 64, "n_layers": 2, "n_dense_layers": 1, "n_heads": 2,
         "n_routed_experts": 4, "n_shared_experts": 1, "n_activated_experts": 2, "kv_lora_rank": 32,
         "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32, "max_seq_len": 160,
         "original_seq_len": 160, "vocab_size": 512}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    from nanoseek.config import ModelConfig
    from nanoseek.train.common import TrainConfig
    from nanoseek.train.pretrain import DataConfig, PretrainConfig, pretrain

    out = tmp_path_factory.mktemp("gguf") / "run"
    train = TrainConfig(lr=4e-3, warmup_steps=5, steps=80, batch_size=8, seq_len=96, eval_interval=0,
                        ckpt_interval=0, log_interval=1000)
    cfg = PretrainConfig(model=ModelConfig(**MODEL), train=train, data=DataConfig(n_docs=1500, n_test_docs=50))
    torch.set_num_threads(1)
    pretrain(out, cfg, device="cpu")
    return out


def held_out_prompts(run: Path, n: int) -> list[list[int]]:
    from nanoseek.evaluate import test_problems
    from nanoseek.hf_tokenizer import load_tokenizer

    tok = load_tokenizer(run)
    return [tok.prompt_ids(p.prompt) for p in test_problems("arithmetic", n, seed=1)]


def export(run: Path, path: Path, dtype: str) -> Path:
    p = subprocess.run([sys.executable, "-m", "nanoseek.cli", "export", "--run", str(run), "--gguf", str(path),
                        "--dtype", dtype], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr
    return path


def nanoseek_greedy(model, prompts: list[list[int]], n: int) -> list[list[int]]:
    return [o.tokens for o in Engine(model, eos_id=-1).generate(prompts, max_new_tokens=n)]


def test_f32_greedy_and_logits_equal_nanoseek(run, tmp_path):
    model, _, _ = load_run_model(run)
    prompts = held_out_prompts(run, 8)
    ours = nanoseek_greedy(model, prompts, 64)
    with torch.no_grad():
        ours_first = np.stack([model(torch.tensor([p]))[0, -1].numpy() for p in prompts])
    path = export(run, tmp_path / "f32.gguf", "f32")
    llm = LlamaCpp(str(path), n_threads=1, n_seq=len(prompts), n_ctx_seq=MODEL["max_seq_len"])
    try:
        theirs, first = llm.greedy(prompts, 64)  # all 8 as parallel sequences
        assert theirs == ours
        for p, o in zip(prompts[:3], ours):  # and one at a time
            assert llm.greedy([p], 64)[0][0] == o
    finally:
        llm.close()
    spread = ours_first.max() - ours_first.min()
    assert np.abs(first - ours_first).max() <= 1e-3 * spread
    assert len({tuple(o) for o in ours}) > 1  # the prompts lead to different continuations


def test_q8_0_top1_mostly_agrees(run, tmp_path):
    model, _, _ = load_run_model(run)
    prompts = held_out_prompts(run, 16)
    with torch.no_grad():
        ours = [int(model(torch.tensor([p]))[0, -1].argmax()) for p in prompts]
    llm = LlamaCpp(str(export(run, tmp_path / "q8.gguf", "q8_0")), n_threads=1, n_seq=1, n_ctx_seq=160)
    try:
        theirs = []
        for p in prompts:
            llm.reset()
            theirs.append(int(llm.prefill([p])[0].argmax()))
    finally:
        llm.close()
    assert np.mean(np.array(theirs) == np.array(ours)) >= 0.8


def test_tokenization_agrees_on_task_text(run, tmp_path):
    import random

    from nanoseek.evaluate import test_problems
    from nanoseek.hf_tokenizer import load_tokenizer
    from nanoseek.tasks import get_task

    tok, task, rng = load_tokenizer(run), get_task("arithmetic"), random.Random(0)
    texts = [p.prompt + " " + task.solution(p, rng) for p in test_problems("arithmetic", 50, seed=2)]
    texts += ["<|bos|><|user|>What is (3 + 4) * 12?<|assistant|><think>", "  two  spaces\n\nnew lines 1,234.5 "]
    llm = LlamaCpp(str(export(run, tmp_path / "t.gguf", "f32")), n_threads=1)
    try:
        assert [llm.tokenize(t) for t in texts] == [tok.encode(t) for t in texts]
    finally:
        llm.close()


@pytest.mark.parametrize("rope", [dict(rope_factor=1.0), dict(rope_factor=4.0, original_seq_len=16, mscale=0.707)])
def test_random_weights_logits_and_yarn(rope, tmp_path):
    """Random weights, positions past YaRN's original context: llama.cpp's last-token logits vs nanoseek's."""
    from nanoseek.config import ModelConfig
    from nanoseek.gguf_export import write_gguf
    from nanoseek.model import Transformer
    from nanoseek.tokenizer import Tokenizer

    tok = Tokenizer.train(["what is 12 + 7? it is 19."] * 4, vocab_size=300)
    torch.manual_seed(0)
    cfg = ModelConfig(**{**MODEL, "vocab_size": tok.vocab_size, "max_seq_len": 64, "original_seq_len": 64,
                         "q_lora_rank": 32, "init_std": 0.05, **rope})
    model = Transformer(cfg).eval()
    path = write_gguf(model, tok.save(tmp_path / "tokenizer.json"), tmp_path / "m.gguf", verbose=False)
    prompts = torch.randint(10, tok.vocab_size, (3, 48), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        ours = np.stack([model(torch.tensor([p]))[0, -1].numpy() for p in prompts])
    llm = LlamaCpp(str(path), n_threads=1, n_seq=3, n_ctx_seq=64)
    try:
        theirs = llm.prefill(prompts)
    finally:
        llm.close()
    assert np.abs(theirs - ours).max() <= 1e-3 * (ours.max() - ours.min())
