"""`pretrain --data`: the text tokenizer and the token shards of a run, built once and reused.

Tokenizer: byte-level BPE with the GPT-4 style split (nanoseek.tokenizer, style "text"), trained on an even
sample of at most `max_chars` characters of the TRAINING units only (held-out text never shapes the
vocabulary), the sample drawn by a stable hash so it does not favour the first files. Shards: nanoseek.text.
shards, by default in `<run>/shards`. Bytes per token is measured on the held-out stream.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

from nanoseek.config import ConfigError
from nanoseek.text.shards import Shards, SplitSettings, split_pieces, tokenizer_digest, unit_hash
from nanoseek.text.sources import ReadStats, discover, kind_of, read_documents

DEFAULT_TEXT_VOCAB = 4096  # a few MB to a few GB of text; bytes/token ~3-4 on English and code
DEFAULT_MAX_CHARS = 20_000_000  # characters the tokenizer is trained on (a sample of larger corpora)


def _sample_key(text: str) -> float:
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8, person=b"tok-samp").digest()
    return int.from_bytes(digest, "big") / 2.0 ** 64


def sample_text(paths: list[str], settings: SplitSettings, max_chars: int,
                exclude: list[str] | tuple = ()) -> Iterator[str]:
    """Training units (never held-out ones) of the corpus, an even hash-drawn sample of about max_chars."""
    files = discover(paths, exclude)
    total = sum(f.stat().st_size for f in files if f.exists())
    keep = min(1.0, max_chars / max(1, total))
    stats = ReadStats()
    for f in files:
        plain = kind_of(f) == "text"
        for doc in read_documents(f, settings.text_field, stats):
            for unit in split_pieces(doc, settings.piece_chars) if plain else [doc]:
                if unit_hash(unit) >= settings.val_share and (keep >= 1.0 or _sample_key(unit) < keep):
                    yield unit


def train_text_tokenizer(paths: list[str], vocab_size: int, settings: SplitSettings = SplitSettings(),
                         max_chars: int = DEFAULT_MAX_CHARS, exclude: list[str] | tuple = ()):
    from nanoseek.tokenizer import Tokenizer

    return Tokenizer.train(sample_text(paths, settings.check(), max_chars, exclude), vocab_size, style="text")


def bytes_per_token(shards: Shards) -> float:
    """UTF-8 bytes per token of the held-out stream (boundary tokens not counted)."""
    val = shards.manifest["split"]["val"]
    return val["bytes"] / max(1, val["tokens"] - val["documents"])


def prepare_run_tokenizer(run_dir: Path, paths: list[str], vocab_size: int | None, settings: SplitSettings,
                          given: str | None, max_chars: int = DEFAULT_MAX_CHARS, exclude: list[str] | tuple = ()) -> Path:
    """The run's tokenizer.json: kept if present, else copied from `given`, else trained on the corpus."""
    from nanoseek.tokenizer import Tokenizer

    path = run_dir / "tokenizer.json"
    if path.exists():
        return path
    if given:
        Tokenizer.load(given).save(path)
    else:
        print(f"training a {vocab_size or DEFAULT_TEXT_VOCAB}-token BPE tokenizer on the corpus ...", flush=True)
        train_text_tokenizer(paths, vocab_size or DEFAULT_TEXT_VOCAB, settings, max_chars, exclude).save(path)
    return path


def check_tokenizer_matches(tokenizer_file: Path, recorded: str | None) -> None:
    if recorded and tokenizer_digest(tokenizer_file) != recorded:
        raise ConfigError(f"{tokenizer_file} changed since this run's shards and checkpoints were made; "
                          "restore it or start a new run (--init to reuse weights)")

