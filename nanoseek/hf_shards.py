"""Streaming reads of safetensors shards for `nanoseek.hf.from_hf`: each file's header is parsed and checked
against the file's size (a truncated shard or a tensor whose bytes do not match its shape is one
CheckpointError before any weight is read), then each tensor is read with plain file reads straight into
its destination (no mmap, so no shard pages stay resident: import peak memory stays near the model's size).
The format: an 8-byte little-endian header length, a JSON header of name -> dtype, shape, data_offsets, data.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import BinaryIO, NamedTuple

import torch

from nanoseek.config import ConfigError

class CheckpointError(ConfigError):
    """A checkpoint that does not match what is expected; the message names the key."""


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "F8_E4M3": torch.float8_e4m3fn, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
              "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class _Entry(NamedTuple):
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]
    start: int  # absolute byte offsets of the data in the file
    end: int


def _read_header(f: Path) -> dict[str, _Entry]:
    """key -> entry from a safetensors file's JSON header (8-byte little-endian length, then JSON)."""
    try:
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if not 2 <= n <= 100_000_000:
                raise ValueError(f"header length {n}")
            header = json.loads(fh.read(n))
        size = f.stat().st_size
        out = {k: _Entry(v["dtype"], tuple(v["shape"]), 8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1])
               for k, v in header.items() if k != "__metadata__"}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{f.name} is not a readable safetensors file ({e})") from None
    for k, e in out.items():
        if e.dtype in _ST_DTYPES:
            nbytes = math.prod(e.shape) * _ST_DTYPES[e.dtype].itemsize
            if e.end - e.start != nbytes or e.start < 8 + n or e.end > size:
                raise CheckpointError(f"{f.name}: the data of {k} is truncated or does not match its shape")
    return out


def _shard_headers(path: Path) -> dict[Path, dict[str, _Entry]]:
    """Every safetensors file of the checkpoint (the index's, else all in the directory) -> its header."""
    index = path / "model.safetensors.index.json"
    files = sorted(path.glob("*.safetensors"))
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({path / f for f in weight_map.values()})
    if not files:
        raise CheckpointError(f"no .safetensors files in {path}")
    for f in files:
        if not f.exists():
            raise CheckpointError(f"shard listed in the index is missing: {f.name}")
    return {f: _read_header(f) for f in files}


def _open_shard(f: Path) -> BinaryIO:
    """Opened once per shard by from_hf (plain reads, no mmap: no shard pages stay resident)."""
    return open(f, "rb")


def _read_tensor(fh: BinaryIO, e: _Entry, out: torch.Tensor | None = None) -> torch.Tensor:
    """Read one tensor's bytes straight into `out` (contiguous, of the file's dtype) or a new tensor."""
    t = torch.empty(e.shape, dtype=_ST_DTYPES[e.dtype]) if out is None else out
    fh.seek(e.start)
    if fh.readinto(t.detach().reshape(-1).view(torch.uint8).numpy()) != e.end - e.start:
        raise CheckpointError(f"{getattr(fh, 'name', 'shard')}: unexpected end of file")
    return t
