"""Reading a user's corpus: which files a `--data` argument names, and the documents each file holds.

A `--data` PATH is a file, a directory (walked recursively, symlinked directories not followed, so a symlink
loop cannot recurse) or a glob. Each file is read by what its content is, not only its name:
- `.jsonl` / `.json`: one document per row, the row's `text_field` (a `.json` file may also be one JSON array of
  rows). Rows are parsed by the standard library's `json` one line at a time, so a line that is not JSON or lacks
  the field is skipped and counted instead of failing the file (pyarrow's JSON reader rejects the whole file).
- `.parquet`: the `text_field` column, read in record batches by pyarrow (never the whole file at once).
- anything else: a plain text file is one document when its bytes are UTF-8 with no NUL byte; a binary file or
  one with invalid UTF-8 is skipped and counted.

Every skip has a reason, and `ReadStats` counts them for the summary line; a file that cannot be read at all
never stops the rest. This module imports neither torch nor numpy-heavy code: the tokenizing workers import it.
"""
from __future__ import annotations

import fnmatch
import glob
import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from nanoseek.config import ConfigError

ROW_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
SNIFF_BYTES = 8192  # bytes read to tell text from binary
MAX_ROW_CHARS = 1 << 30  # a row's text field longer than this is skipped (bounded work per input)
READ_CHUNK = 1 << 20  # plain text files are decoded in pieces of this many bytes


@dataclass
class ReadStats:
    """What a read of one or more files produced: documents, UTF-8 bytes, and the skips by reason."""

    documents: int = 0
    bytes: int = 0
    skipped: Counter = field(default_factory=Counter)

    def merge(self, other: ReadStats) -> None:
        self.documents += other.documents
        self.bytes += other.bytes
        self.skipped.update(other.skipped)

    def skip_line(self) -> str:
        return ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items())) or "none"


def discover(paths: list[str], exclude: list[str] | tuple[str, ...] = ()) -> list[Path]:
    """The regular files `paths` name, sorted and without duplicates (by resolved path), leaving out those whose
    path matches an `exclude` pattern (fnmatch, e.g. `*/site-packages/*`). A path that names nothing is an
    error; so is a set of paths holding no file at all."""
    if not paths:
        raise ConfigError("no --data path given")
    found: dict[str, Path] = {}
    for raw in paths:
        p = Path(raw).expanduser()
        if any(c in raw for c in "*?["):
            matches = sorted(glob.glob(str(p), recursive=True))
            if not matches:
                raise ConfigError(f"--data {raw}: the pattern matches no file")
            candidates = [Path(m) for m in matches]
        elif p.is_dir():
            candidates = list(_walk(p))
        elif p.is_file():
            candidates = [p]
        elif p.is_symlink() or os.path.lexists(p):
            raise ConfigError(f"--data {raw}: not a readable file or directory (a broken or looping symlink?)")
        else:
            raise ConfigError(f"--data {raw}: no such file or directory")
        for c in candidates:
            if any(fnmatch.fnmatch(str(c), pat) for pat in exclude):
                continue
            if c.is_dir():
                candidates.extend(_walk(c))
                continue
            try:
                real = os.path.realpath(c)
                if os.path.isfile(real):
                    found.setdefault(real, c)
            except OSError:  # a symlink loop or a file that vanished: skipped like any unreadable file
                continue
    if not found:
        raise ConfigError(f"--data {' '.join(paths)}: no files found (an empty directory?)")
    return [found[k] for k in sorted(found)]


def _walk(root: Path) -> Iterator[Path]:
    """Files under `root`, hidden entries (names starting with '.') left out; directory symlinks not followed."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name


def kind_of(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(ROW_SUFFIXES):
        return "rows"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return "text"


def read_documents(path: Path, text_field: str, stats: ReadStats) -> Iterator[str]:
    """The documents of one file (see the module docstring); skips are counted in `stats`."""
    try:
        kind = kind_of(path)
        if kind == "rows":
            yield from _rows(path, text_field, stats)
        elif kind == "parquet":
            yield from _parquet(path, text_field, stats)
        else:
            yield from _text(path, stats)
    except OSError as e:
        stats.skipped[f"unreadable ({e.strerror or type(e).__name__})"] += 1


def _count(stats: ReadStats, text: str) -> str:
    stats.documents += 1
    stats.bytes += len(text.encode("utf-8", "surrogatepass"))
    return text


def _text(path: Path, stats: ReadStats) -> Iterator[str]:
    with open(path, "rb") as f:
        head = f.read(SNIFF_BYTES)
        if not head:
            stats.skipped["empty files"] += 1
            return
        # a NUL byte anywhere means binary (checked chunk by chunk below, the head first);
        # decode incrementally so a 100 MB file with no newline never needs two full copies in memory
        import codecs

        decoder = codecs.getincrementaldecoder("utf-8")("strict")
        parts: list[str] = []
        chunk = head
        try:
            while chunk:
                if b"\0" in chunk:
                    stats.skipped["binary files"] += 1
                    return
                parts.append(decoder.decode(chunk))
                chunk = f.read(READ_CHUNK)
            parts.append(decoder.decode(b"", final=True))
        except UnicodeDecodeError:
            stats.skipped["files with invalid UTF-8"] += 1
            return
    text = "".join(parts)
    if not text.strip():
        stats.skipped["empty files"] += 1
        return
    yield _count(stats, text)


def _row_text(row, text_field: str, stats: ReadStats) -> str | None:
    if not isinstance(row, dict):
        stats.skipped["rows that are not JSON objects"] += 1
        return None
    value = row.get(text_field)
    if not isinstance(value, str):
        stats.skipped[f"rows without a string '{text_field}'"] += 1
        return None
    if not value.strip() or len(value) > MAX_ROW_CHARS:
        stats.skipped["empty or oversized rows"] += 1
        return None
    return value


def _rows(path: Path, text_field: str, stats: ReadStats) -> Iterator[str]:
    with open(path, "rb") as f:
        first = f.read(SNIFF_BYTES).lstrip()
    if not first:
        stats.skipped["empty files"] += 1
        return
    if first.startswith(b"["):  # one JSON array of rows
        try:
            rows = json.loads(path.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            stats.skipped["JSON files that do not parse"] += 1
            return
        for row in rows if isinstance(rows, list) else [rows]:
            if (text := _row_text(row, text_field, stats)) is not None:
                yield _count(stats, text)
        return
    with open(path, "rb") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
                stats.skipped["lines that are not JSON"] += 1
                continue
            if (text := _row_text(row, text_field, stats)) is not None:
                yield _count(stats, text)


def _parquet(path: Path, text_field: str, stats: ReadStats) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError):
        stats.skipped["parquet files that do not open"] += 1
        return
    if text_field not in pf.schema_arrow.names:
        stats.skipped[f"parquet files without a '{text_field}' column (pass --text-field)"] += 1
        return
    try:
        for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
            for value in batch.column(0).to_pylist():
                if isinstance(value, str) and value.strip() and len(value) <= MAX_ROW_CHARS:
                    yield _count(stats, value)
                else:
                    stats.skipped["empty or non-text parquet values"] += 1
    except pa.ArrowException:
        stats.skipped["parquet files that do not read to the end"] += 1


def read_json_safely(path: Path) -> dict | None:
    """A small JSON file (a manifest or sidecar) or None when missing or corrupt."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
