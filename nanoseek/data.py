"""Pretraining data: pack token-id documents into fixed-length rows and serve them in a resumable order.

Packing (GPT-2 / nanoGPT style): documents are concatenated into one stream, each followed by an eos
separator (not doubled when the document already ends with eos), and the stream is cut into rows of
`seq_len + 1` tokens with stride `seq_len`, so row i is stream[i*L : i*L + L + 1]; inputs are row[:-1],
targets row[1:]. The stride overlaps rows by one token so every transition in the stream is trained once.
Deliberate simplifications: attention is not reset at document boundaries (documents see the tail of the
previous one, as in GPT-2 pretraining), and the tail of the stream shorter than a row is dropped (at most
`seq_len` tokens). Dropping instead of padding keeps every target valid, so the mean loss over a batch equals
the mean of equal-sized shard means: that is what makes W data-parallel ranks bit-for-bit equivalent in
expectation to one process with the whole batch.

Loader: each epoch visits the rows in a permutation drawn from numpy's PCG64 seeded with (seed, epoch);
global batch j of the epoch is perm[j*B : (j+1)*B] (a last partial batch is dropped). Its position is the
small dict {"epoch", "index", "seed"}; restoring it reproduces the remaining order exactly. Under data
parallelism rank r of W takes rows r::W of every global batch, so W processes with B/W rows each consume
exactly the rows one process with batch B would.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from nanoseek.config import ConfigError


def pack_documents(docs: Sequence[Sequence[int]], seq_len: int, eos_id: int) -> torch.Tensor:
    """Token-id documents -> (N, seq_len + 1) int64 rows (see the module docstring)."""
    if seq_len < 1:
        raise ConfigError(f"seq_len must be positive, got {seq_len}")
    stream: list[int] = []
    for doc in docs:
        stream.extend(doc)
        if not doc or doc[-1] != eos_id:
            stream.append(eos_id)
    n_rows = (len(stream) - 1) // seq_len if stream else 0
    if n_rows == 0:
        return torch.zeros(0, seq_len + 1, dtype=torch.long)
    flat = torch.tensor(stream[: n_rows * seq_len + 1], dtype=torch.long)
    return flat.unfold(0, seq_len + 1, seq_len).contiguous()


def pack_aligned(docs: Sequence[Sequence[int]], seq_len: int, eos_id: int, window: int = 64,
                 crop: str = "shortest") -> torch.Tensor:
    """Document-aligned rows: every row starts at the start of a document, so no position is trained on the
    tail of a document whose prompt was cut off (with ~30-token documents and 64-token rows, stream packing
    trains about a third of the tokens that way, teaching the model to guess operands instead of copying them).

    Best-fit with cropping (nanochat's packer): among the next `window` documents, put the longest one that
    still fits into the row; when none fits, fill the rest of the row with the head of the shortest one and
    drop its tail. Rows are `seq_len + 1` tokens with no padding, so every target is valid (the property
    data parallelism relies on, as for stream packing); a last row that cannot be filled is dropped.

    `crop="fresh"` (packing `aligned-fresh`) crops the next document of the stream instead of the shortest
    pending one: which document loses its tail then does not depend on its length. Cropping the shortest
    drops the endings of a corpus's shortest documents far more often than the others' (issue 28: the search
    corpus's one-attempt give-ups lost 27% of their `</think>` stops in the packed rows, 0.483 -> 0.352)."""
    if seq_len < 1:
        raise ConfigError(f"seq_len must be positive, got {seq_len}")
    width = seq_len + 1
    source = (list(d) + ([] if d and d[-1] == eos_id else [eos_id]) for d in docs)
    pending: list[list[int]] = []
    rows: list[list[int]] = []
    row: list[int] = []
    while True:
        while len(pending) < window and (doc := next(source, None)) is not None:
            pending.append(doc)
        if not pending:
            break
        space = width - len(row)
        fits = [i for i, d in enumerate(pending) if len(d) <= space]
        if fits:
            row.extend(pending.pop(max(fits, key=lambda i: len(pending[i]))))
        elif crop == "fresh" and (doc := next(source, None)) is not None:
            row.extend(doc[:space])
        else:
            row.extend(pending.pop(min(range(len(pending)), key=lambda i: len(pending[i])))[:space])
        if len(row) == width:
            rows.append(row)
            row = []
    if not rows:
        return torch.zeros(0, width, dtype=torch.long)
    return torch.tensor(rows, dtype=torch.long)


# DataConfig.packing -> packer (the CLI's choices and the config check read these keys)
PACKERS = {"stream": pack_documents, "aligned": pack_aligned,
           "aligned-fresh": lambda docs, seq_len, eos_id: pack_aligned(docs, seq_len, eos_id, crop="fresh")}


def split_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, L + 1) rows -> inputs (N, L), targets (N, L) shifted by one."""
    return rows[:, :-1], rows[:, 1:]


class Loader:
    """Seeded, epoch-shuffled batches of packed rows whose position can be saved and restored exactly.

    `batch_size` is the GLOBAL batch (rows over all ranks); this rank's share is batch_size // world.
    """

    def __init__(self, rows: torch.Tensor, batch_size: int, seed: int = 0, rank: int = 0, world: int = 1):
        if batch_size < 1 or batch_size % world != 0:
            raise ConfigError(f"batch size {batch_size} must be a positive multiple of the number of processes ({world})")
        if rows.size(0) < batch_size:
            raise ConfigError(f"only {rows.size(0)} training sequences for a batch of {batch_size}: "
                              "lower --batch-size or --seq-len, or use more documents")
        self.rows = rows
        self.batch_size = batch_size
        self.rank, self.world = rank, world
        self.seed = seed
        self.epoch = 0
        self.index = 0  # global batches already served in this epoch
        self._perm: np.ndarray | None = None
        self._perm_epoch = -1

    @property
    def batches_per_epoch(self) -> int:
        return self.rows.size(0) // self.batch_size

    def permutation(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.rows.size(0))
            self._perm_epoch = epoch
        return self._perm

    def next_global_indices(self) -> np.ndarray:
        """Row indices of the next global batch (all ranks), advancing the position."""
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        perm = self.permutation(self.epoch)
        idx = perm[self.index * self.batch_size:(self.index + 1) * self.batch_size]
        self.index += 1
        return idx

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (inputs, targets), each (batch_size // world, seq_len)."""
        idx = self.next_global_indices()[self.rank::self.world]
        return split_rows(self.rows[torch.from_numpy(idx)])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        try:
            epoch, index, seed = int(state["epoch"]), int(state["index"]), int(state["seed"])
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"bad loader position in checkpoint: {state!r}") from None
        if not 0 <= index <= self.batches_per_epoch or epoch < 0:
            raise ConfigError(f"loader position {state!r} does not fit this data "
                              f"({self.batches_per_epoch} batches per epoch): was the corpus changed?")
        self.epoch, self.index, self.seed = epoch, index, seed


def eval_batches(rows: torch.Tensor, batch_size: int, max_batches: int, rank: int = 0,
                 world: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The first `max_batches` global batches of `rows` in order (a fixed held-out set), rank r taking rows r::W.
    A held-out set smaller than one batch is served as one batch of as many rows as divide evenly over ranks."""
    batch_size = min(batch_size, rows.size(0) // world * world)
    if batch_size == 0:
        return
    for j in range(min(rows.size(0) // batch_size, max_batches)):
        yield split_rows(rows[j * batch_size:(j + 1) * batch_size][rank::world])


class TokenRows:
    """The rows of `pack_documents` over a token stream on disk, read on demand: row i is
    stream[i*L : i*L + L + 1] (int64). Indexable like the (N, L + 1) tensor the Loader and eval_batches use, so
    a memory-mapped corpus of any size trains through the same Loader (same order, same exact resume)."""

    def __init__(self, stream: np.ndarray, seq_len: int):
        if seq_len < 1:
            raise ConfigError(f"seq_len must be positive, got {seq_len}")
        self.stream, self.seq_len = stream, seq_len
        self.n = max(0, (len(stream) - 1) // seq_len)
        self._cols = np.arange(seq_len + 1)

    def size(self, dim: int = 0) -> int:
        return self.n if dim == 0 else self.seq_len + 1

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, slice):
            index = np.arange(*index.indices(self.n))
        elif isinstance(index, torch.Tensor):
            index = index.numpy()
        index = np.asarray(index, dtype=np.int64)
        if index.size and (index.min() < 0 or index.max() >= self.n):
            raise IndexError(f"row index out of range for {self.n} rows")
        rows = self.stream[(index * self.seq_len)[:, None] + self._cols]
        return torch.from_numpy(rows.astype(np.int64))
