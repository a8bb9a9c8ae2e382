"""SFT: completion-only masking against a hand-masked loss (prompt positions get exactly zero gradient), rows that
do not fit are counted and skipped, eos is learned, exact resume after SIGKILL, 2-process DDP == 1 process."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nanoseek.config import ConfigError, ModelConfig
from nanoseek.corpus import corpus_texts
from nanoseek.model import Transformer
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.metrics import read_metrics
from nanoseek.train.sft import completion_loss, encode_examples, read_examples
from test_train import finish, spawn  # the same subprocess helpers as pretraining's run tests

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(corpus_texts("arithmetic", 300, seed=0), vocab_size=300)


def examples(n: int, seed: int = 0) -> list[dict]:
    import random

    from nanoseek.tasks import get_task

    task, rng = get_task("arithmetic"), random.Random(seed)
    out = []
    for i in range(n):
        p = task.sample_split(rng, 1, "train")
        out.append({"prompt": p.prompt, "completion": task.solution(p, rng), "id": i})
    return out


def test_prompt_positions_get_exactly_zero_gradient_and_match_a_hand_masked_loss(tok):
    rows = examples(6)
    ids, tgt, skipped = encode_examples(rows, tok, seq_len=48)
    assert skipped == 0
    cfg = ModelConfig.preset("tiny-dense", vocab_size=tok.vocab_size, dim=32, inter_dim=64, n_layers=2,
                             n_dense_layers=2, n_heads=2, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                             v_head_dim=8, max_seq_len=64, original_seq_len=64)
    torch.manual_seed(0)
    model = Transformer(cfg)
    captured = {}
    plain_logits = model.logits

    def spy(h):
        out = plain_logits(h)
        out.retain_grad()
        captured["logits"] = out
        return out

    model.logits = spy
    n_tokens = float((tgt != -1).sum())
    completion_loss(model, ids, tgt, n_tokens).backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    g = captured["logits"].grad
    # hand-made reference: per row, the positions predicting completion tokens and the eos, from the raw text
    model.zero_grad()
    model.logits = plain_logits
    logp = model(ids[:, :-1]).log_softmax(-1)
    terms, prompt_pos = [], []
    for i, ex in enumerate(rows):
        p_len = len(tok.prompt_ids(ex["prompt"]))
        doc = tok.prompt_ids(ex["prompt"]) + tok.encode(ex["completion"]) + [tok.eos_id]
        assert ids[i, len(doc) - 1].item() == tok.eos_id  # eos appended
        for t in range(p_len - 1, len(doc) - 1):
            terms.append(-logp[i, t, doc[t + 1]])
        prompt_pos.append(p_len - 1)
    ref = torch.stack(terms).sum() / len(terms)
    assert len(terms) == n_tokens
    ref.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, rtol=1e-5, atol=1e-7, msg=n)
    for i, last_prompt in enumerate(prompt_pos):
        assert g[i, :last_prompt].abs().max() == 0  # positions predicting prompt tokens: exactly zero
        assert g[i, last_prompt].abs().max() > 0  # the one predicting the first completion token: trained
    assert (g[tgt == -1] == 0).all()  # padding too


def test_rows_that_do_not_fit_are_counted_and_skipped(tok, tmp_path):
    rows = examples(5)
    rows[2]["completion"] = "<think>" + "1+1=2. " * 40 + "</think><answer>2</answer>"
    ids, tgt, skipped = encode_examples(rows, tok, seq_len=48)
    assert skipped == 1 and ids.size(0) == 4
    assert ids.size(1) == 49 and tgt.size(1) == 48
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "x", "completion": "y"}\n{"prompt": 3}\n')
    with pytest.raises(ConfigError, match="line 2"):
        read_examples(path)


# ---- whole runs ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory, tok):
    d = tmp_path_factory.mktemp("sftdata")
    tok.save(d / "tokenizer.json")
    rows = examples(40)
    rows.append({"prompt": "Compute 1 + 1.", "completion": "<think>" + "1+1=2. " * 40 + "</think>"})
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def sft_args(data: Path, out: Path, steps: int = 8) -> list[str]:
    return ["sft", "--preset", "tiny-dense", "--tokenizer", str(data / "tokenizer.json"), "--data",
            str(data / "train.jsonl"), "--out", str(out), "--steps", str(steps), "--batch-size", "8", "--seq-len",
            "48", "--warmup", "2", "--ckpt-interval", "2", "--device", "cpu"]


def test_sft_kill_and_resume_is_exact(data, tmp_path):
    full = spawn(sft_args(data, tmp_path / "full"))
    killed = spawn(sft_args(data, tmp_path / "killed"), {"NANOSEEK_TEST_KILL_AFTER_STEP": "5"})
    _, out, _ = finish(full)
    assert "40 examples kept, 1 skipped" in out
    code, _, _ = finish(killed, ok=False)
    assert code == -9
    _, out, _ = finish(spawn(sft_args(data, tmp_path / "killed") + ["--resume"]))
    assert "resumed from" in out and "step_4" in out
    ref = read_metrics(tmp_path / "full" / "metrics.jsonl")
    got = read_metrics(tmp_path / "killed" / "metrics.jsonl")
    assert [r["step"] for r in ref] == [r["step"] for r in got] == list(range(1, 9))
    for a, b in zip(ref, got):
        assert (a["loss"], a["grad_norm"], a["examples_seen"]) == (b["loss"], b["grad_norm"], b["examples_seen"])
    cfg = json.loads((tmp_path / "full" / "config.json").read_text())
    assert cfg["data"]["skipped_too_long"] == 1 and cfg["stage"] == "sft"
    assert (tmp_path / "killed" / "report.md").exists() and (tmp_path / "full" / "tokenizer.json").exists()


def test_sft_two_process_ddp_matches_one_process(data, tmp_path):
    ddp = spawn(sft_args(data, tmp_path / "ddp", steps=3), torchrun=2)
    one = spawn(sft_args(data, tmp_path / "one", steps=3))
    finish(one)
    finish(ddp)
    ref = read_metrics(tmp_path / "one" / "metrics.jsonl")
    got = read_metrics(tmp_path / "ddp" / "metrics.jsonl")
    assert len(got) == 3
    for a, b in zip(ref, got):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)


def test_hand_masked_reference_is_not_the_unmasked_loss(tok):
    """Guard for the first test: counting prompt tokens too would give a different loss."""
    ids, tgt, _ = encode_examples(examples(3), tok, seq_len=48)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny-dense", vocab_size=tok.vocab_size))
    masked = completion_loss(model, ids, tgt, float((tgt != -1).sum()))
    full_tgt = torch.where(ids[:, 1:] == tok.pad_id, -1, ids[:, 1:])
    unmasked = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), full_tgt.flatten(), ignore_index=-1)
    assert abs(masked.item() - unmasked.item()) > 1e-3
