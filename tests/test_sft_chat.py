"""Conversations for SFT (issue 26 item 5): OpenAI-format `messages` rows, multi-turn, the loss on every assistant
turn and nothing else, checked against a hand-built mask; single-turn rows unchanged; bad rows are one line."""
import json

import pytest

from nanoseek import cli
from nanoseek.config import ConfigError
from nanoseek.corpus import corpus_texts
from nanoseek.model.transformer import IGNORE
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.sft import encode_examples, read_examples
from test_train import finish, spawn


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(corpus_texts("arithmetic", 200, seed=0) + ["You are terse. Hi there, how are you?"] * 5,
                           vocab_size=300)


CONVO = [{"role": "system", "content": "You are terse."},
         {"role": "user", "content": "Compute 2 + 3."},
         {"role": "assistant", "content": "<think>2+3=5.</think><answer>5</answer>"},
         {"role": "user", "content": "And 4 * 2?"},
         {"role": "assistant", "content": [{"type": "text", "text": "<answer>8</answer>"}]}]


def test_multi_turn_mask_covers_every_assistant_turn_and_its_eos_only(tok):
    ids, mask = tok.chat_document(CONVO)
    sid, uid, aid = (tok.id_of(t) for t in ("<|system|>", "<|user|>", "<|assistant|>"))
    a1, a2 = tok.encode("<think>2+3=5.</think><answer>5</answer>"), tok.encode("<answer>8</answer>")
    expected = ([tok.bos_id, sid, *tok.encode("You are terse."), uid, *tok.encode("Compute 2 + 3."), aid],
                [*a1, tok.eos_id], [uid, *tok.encode("And 4 * 2?"), aid], [*a2, tok.eos_id])
    assert ids == [t for part in expected for t in part]
    want = [False] * len(expected[0]) + [True] * len(expected[1]) + [False] * len(expected[2]) + [True] * len(expected[3])
    assert mask == want
    assert tok.id_of("<think>") in [t for t, m in zip(ids, mask) if m]  # the think block is kept and trained


def test_single_turn_conversation_equals_a_prompt_completion_row(tok):
    rows = [{"prompt": "Compute 2 + 3.", "completion": "<answer>5</answer>"},
            {"messages": [{"role": "user", "content": "Compute 2 + 3."},
                          {"role": "assistant", "content": "<answer>5</answer>"}]}]
    ids, tgt, skipped = encode_examples(rows, tok, 32)
    assert skipped == 0 and ids[0].tolist() == ids[1].tolist() and tgt[0].tolist() == tgt[1].tolist()


def test_targets_of_a_conversation_are_exactly_the_assistant_tokens(tok):
    ids, tgt, _ = encode_examples([{"messages": CONVO}], tok, 64)
    seq, mask = tok.chat_document(CONVO)
    trained = [t for t in tgt[0].tolist() if t != IGNORE]
    assert trained == [t for t, m in zip(seq, mask) if m]
    assert sum(mask) == len(trained) and not mask[0]


@pytest.mark.parametrize("row, bad", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]}, "unknown role"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}, "content not text"),
    ({"messages": "hello"}, "not a list"),
])
def test_bad_conversation_rows_are_one_line_errors(tmp_path, row, bad):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ConfigError, match="line 2"):
        read_examples(path)


def test_sft_trains_on_mixed_rows(tok, tmp_path):
    tok.save(tmp_path / "tokenizer.json")
    rows = [{"messages": CONVO}] * 6 + [{"prompt": "Compute 1 + 1.", "completion": "<answer>2</answer>"}] * 6
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, out, _ = finish(spawn(["sft", "--preset", "tiny-dense", "--tokenizer", str(tmp_path / "tokenizer.json"),
                              "--data", str(tmp_path / "chat.jsonl"), "--out", str(tmp_path / "run"), "--steps", "2",
                              "--batch-size", "4", "--seq-len", "64", "--device", "cpu"]))
    assert "12 examples kept, 0 skipped" in out
    assert cli  # the CLI module imports cleanly with the new row kinds
