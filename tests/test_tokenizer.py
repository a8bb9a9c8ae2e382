"""Tokenizer: special-token ids, exact round trip, digit splitting, template, save/load, HF parity."""
from __future__ import annotations

import pytest

from nanoseek.config import ConfigError
from nanoseek.corpus import corpus_texts
from nanoseek.tokenizer import SPECIAL_TOKENS, Tokenizer, render_document

WEIRD = "Compute 12 + 7 * 3 - 5.<think>7*3=21.</think><answer>28</answer>  héllo\twörld 😀\n\n  x \r\n"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(corpus_texts("arithmetic", 400, seed=0), vocab_size=300)


def test_special_tokens_are_single_tokens_with_fixed_ids(tok):
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.id_of(t) == i
        assert tok.encode(t) == [i]
    assert tok.encode("<think>x</think>")[0] == tok.id_of("<think>")


def test_round_trip_is_exact(tok):
    for text in [WEIRD, "", " ", "-1353", "<|eos|><|pad|>", "a<answer>b</answer>c", "\x00\xff ünï"]:
        assert tok.decode(tok.encode(text)) == text


def test_skip_special_drops_only_special_tokens(tok):
    ids = tok.encode("<think>1+2=3.</think><answer>3</answer>", bos=True)
    assert ids[0] == tok.bos_id
    assert tok.decode(ids, skip_special=True) == "1+2=3.3"


def test_digits_are_split_individually(tok):
    pieces = tok.token_strings(tok.encode("12345+678"))
    assert pieces == ["1", "2", "3", "4", "5", "+", "6", "7", "8"]


def test_vocab_is_capped_and_training_is_deterministic(tok):
    assert 266 <= tok.vocab_size <= 300
    again = Tokenizer.train(corpus_texts("arithmetic", 400, seed=0), vocab_size=300)
    assert again.encode(WEIRD) == tok.encode(WEIRD)
    with pytest.raises(ConfigError, match="at least 266"):
        Tokenizer.train(["abc"], vocab_size=100)


def test_template(tok):
    prompt = tok.prompt_ids("Compute 1 + 2.")
    assert prompt[:2] == [tok.bos_id, tok.id_of("<|user|>")] and prompt[-1] == tok.id_of("<|assistant|>")
    assert tok.decode(prompt[2:-1]) == "Compute 1 + 2."
    completion = "<think>1+2=3.</think><answer>3</answer>"
    doc = tok.document_ids("Compute 1 + 2.", completion)
    assert doc[: len(prompt)] == prompt and doc[-1] == tok.eos_id
    assert tok.decode(doc) == render_document("Compute 1 + 2.", completion)
    assert tok.encode(render_document("Compute 1 + 2.", completion)) == doc


def test_save_load_and_transformers_parity(tok, tmp_path):
    out = tok.save(tmp_path / "run" / "tokenizer.json")
    assert out.is_file() and not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]
    loaded = Tokenizer.load(tmp_path / "run")  # a folder resolves to its tokenizer.json
    assert loaded.encode(WEIRD) == tok.encode(WEIRD) and loaded.vocab_size == tok.vocab_size
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(out))
    for text in (WEIRD, render_document("Compute 9 * 9.", "<think>9*9=81.</think><answer>81</answer>")):
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
        assert hf.decode(tok.encode(text)) == text


def test_load_errors_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="tokenizer not found"):
        Tokenizer.load(tmp_path / "nope.json")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="corrupt"):
        Tokenizer.load(bad)
    bad.write_text('{"version": "1.0"}')
    with pytest.raises(ConfigError, match="corrupt"):
        Tokenizer.load(tmp_path)


def test_unknown_token_is_config_error(tok):
    with pytest.raises(ConfigError, match="not in the vocabulary"):
        tok.id_of("<|nope|>")


def test_cli_train_writes_a_loadable_tokenizer(tmp_path, capsys):
    import argparse

    from nanoseek.commands import tokenizer as cmd

    parser = argparse.ArgumentParser()
    cmd.add_arguments(parser)
    out = tmp_path / "run" / "tokenizer.json"
    args = parser.parse_args(["train", "--task", "arithmetic,countdown", "--docs", "200", "--out", str(out)])
    assert cmd.run(args) == 0
    tok = Tokenizer.load(out)
    assert tok.vocab_size <= 512 and tok.decode(tok.encode(WEIRD)) == WEIRD
    printed = capsys.readouterr().out
    assert f"vocab size {tok.vocab_size}" in printed and "example (countdown" in printed
    with pytest.raises(ConfigError, match="unknown task"):
        cmd.run(parser.parse_args(["train", "--task", "chess", "--out", str(out)]))
