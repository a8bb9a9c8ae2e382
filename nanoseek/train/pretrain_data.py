"""Pretraining data: which corpus (DataConfig), the run's tokenizer, and the packed rows pretrain() trains on: a
procedural task corpus (nanoseek.corpus: packed in memory) or the user's text (nanoseek.text: memory-mapped token
shards built once by rank 0 and reused while the files and tokenizer are unchanged)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from nanoseek.cli_config import knob
from nanoseek.config import ConfigError
from nanoseek.data import PACKERS
from nanoseek.train.common import Dist


@dataclass
class DataConfig:
    """Which corpus to pretrain on and the tokenizer trained from it: a task corpus (nanoseek.corpus.build_corpus)
    or, when `data` names files, the user's text (nanoseek.text: memory-mapped token shards)."""

    # user text: files, directories or globs (nanoseek.text.sources); empty = the task corpus
    data: list[str] = knob(default_factory=list, metavar="PATH", help="train on your own text instead of --task: "
                           "a file, directory (recursive) or glob; repeatable. Plain UTF-8 files are one document "
                           "each, .jsonl/.json rows and .parquet columns take --text-field")
    exclude: list[str] = knob(default_factory=list, metavar="GLOB", help="leave out --data files whose path matches "
                              "this fnmatch pattern (repeatable)")
    text_field: str = knob("text", help="JSONL / parquet field holding the text")
    val_share: float = knob(0.02, help="share of --data units (rows, ~8 KB pieces of text files) held out, chosen "
                            "by a stable hash")
    shard_dir: str = knob("", help="where --data token shards are kept (empty = RUN/shards; reused while the files "
                          "and tokenizer are unchanged)")
    tokenizer: str = knob("", help="an existing tokenizer.json for --data (empty = train one)")
    fingerprint: str = ""  # set by the run: the tokenizer's sha256 the shards were built with
    task: str = knob("arithmetic", help="task whose corpus is generated (nanoseek.tasks)")
    # ~42 tokens each for arithmetic: ~2M tokens
    n_docs: int = knob(50_000, help="training documents")
    n_test_docs: int = knob(1_000, help="held-out documents (from the task's test split)")
    flawed_share: float = knob(0.5, help="share of worked solutions with one deliberate slip")
    difficulty: int | None = knob(None, help="task difficulty (none = the task's default)")
    fact_share: float = knob(0.2, help="share of documents that are one-operation arithmetic facts (always "
                             "correct; nanoseek.corpus)")
    reflect_share: float = knob(0.0, help="share of worked solutions with one check line `a+b=r. check: a+b=r'.` "
                                "(nanoseek.tasks.reflection; arithmetic only)")
    persist_share: float = knob(0.0, help="search tasks: share of traces that never give up (nanoseek.corpus)")
    # a small corpus may give fewer
    vocab_size: int | None = knob(None, help="tokenizer vocabulary to train (none = 512 for --task, 4096 for "
                                  "--data)")
    # "stream": GPT-2 style cuts of one long stream; "aligned": every row starts at a document start
    # (nanoseek.data.pack_aligned). Stream stays the default: on the demo's arithmetic at 1000 steps aligned
    # rows gave 50.0% / 37.0% greedy (seeds 0 / 1) against 69.0% / 45.5% (docs/pretrain.md).
    packing: str = knob("stream", choices=PACKERS, help="rows are cuts of one document stream (stream) or start "
                        "at a document start (aligned)")

    def __post_init__(self):
        if self.packing not in PACKERS:
            raise ConfigError(f"packing must be one of {', '.join(PACKERS)}, got {self.packing!r}")
        if self.data and self.packing != "stream":
            raise ConfigError("--data trains on stream-packed rows; --packing aligned is for task corpora")

    @property
    def is_text(self) -> bool:
        return bool(self.data)

    def split_settings(self):
        from nanoseek.text.shards import SplitSettings

        return SplitSettings(text_field=self.text_field, val_share=self.val_share).check()


# ---- data ----------------------------------------------------------------------------------------------------
def prepare_tokenizer(run_dir: Path, data: DataConfig, seed: int, dist: Dist):
    """Load the run's tokenizer.json, or (rank 0) train one on the task corpus and save it first."""
    from nanoseek.tokenizer import Tokenizer

    path = run_dir / "tokenizer.json"
    if dist.is_main and not path.exists() and data.is_text:
        from nanoseek.text.prepare import prepare_run_tokenizer

        prepare_run_tokenizer(run_dir, data.data, data.vocab_size, data.split_settings(), data.tokenizer or None,
                              exclude=data.exclude)
    elif dist.is_main and not path.exists():
        from nanoseek.corpus import corpus_texts

        texts = corpus_texts(data.task, data.n_docs, seed, data.flawed_share, data.difficulty, "train",
                             data.fact_share, data.reflect_share, data.persist_share)
        Tokenizer.train(texts, data.vocab_size or 512).save(path)
    dist.barrier()  # unconditional: other ranks must not test for the file while rank 0 may be writing it
    return Tokenizer.load(path)  # every rank, fresh or resumed, encodes with the same saved file


def text_rows(run_dir: Path, tokenizer, data: DataConfig, seq_len: int, dist: Dist, resume: bool):
    """(train TokenRows, held-out TokenRows, manifest) over the run's token shards, built by rank 0 (reusing
    what is still valid) while the other ranks wait; on resume the tokenizer must be the one the run began with."""
    from nanoseek.data import TokenRows
    from nanoseek.text.prepare import check_tokenizer_matches
    from nanoseek.text.shards import Shards, build_shards
    from nanoseek.text.sources import read_json_safely

    tok_file = run_dir / "tokenizer.json"
    if resume:
        check_tokenizer_matches(tok_file, data.fingerprint)
    root = Path(data.shard_dir) if data.shard_dir else run_dir / "shards"
    if dist.is_main:
        build_shards(data.data, tok_file, root, tokenizer.vocab_size, data.split_settings(), exclude=data.exclude)
    dist.barrier()
    shards = Shards(root, read_json_safely(root / "manifest.json"))
    train, val = TokenRows(shards.stream("train"), seq_len), TokenRows(shards.stream("val"), seq_len)
    if val.size(0) == 0:
        raise ConfigError(f"the held-out text ({shards.manifest['split']['val']['tokens']} tokens) is shorter than "
                          f"one row of {seq_len + 1} tokens: raise --val-share, lower --seq-len or add text")
    return train, val, shards.manifest


def build_rows(tokenizer, data: DataConfig, seq_len: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed (N, seq_len + 1) rows of the train corpus and of a held-out corpus from the task's test split."""
    from nanoseek.corpus import build_corpus

    def rows(n: int, split: str, s: int) -> torch.Tensor:
        docs = build_corpus(data.task, n, s, data.flawed_share, data.difficulty, split, data.fact_share,
                            data.reflect_share, data.persist_share)
        return PACKERS[data.packing]([tokenizer.document_ids(p, c) for p, c in docs], seq_len, tokenizer.eos_id)

    return rows(data.n_docs, "train", seed), rows(data.n_test_docs, "test", seed + 1)
