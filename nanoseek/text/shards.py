"""Token shards: a corpus tokenized once, in worker processes, into flat binary files read back by memmap.

Layout of a shard directory:
    manifest.json            sources (path, size, content hash, documents, tokens, skips), tokenizer hash,
                             dtype, totals; rewritten atomically after every build
    parts/<key>.train.bin    one source file's training tokens, each document followed by the boundary token
    parts/<key>.val.bin      its held-out tokens, same layout
    parts/<key>.json         the part's counts; written last, so a part without it is unfinished
    train.bin, val.bin       the parts concatenated in source order (what training memory-maps)

Tokens are uint16 when the vocabulary fits, else uint32. A part's key hashes the file's content, the
tokenizer file and the split settings, so a changed file, tokenizer or setting builds a new part and an
unchanged one is reused (a file's content hash is itself reused while its size and mtime are unchanged).
Parts are written atomically and their sidecar last: a build killed with SIGKILL resumes without redoing the
files it finished.

Held-out split (disjoint by construction): a stable hash (BLAKE2b) of each unit's text decides whether it is
held out (`val_share` of units). The unit is a row for JSONL / parquet, and a ~`piece_chars` line-aligned piece
of a plain text file, so a corpus of a few large files still gets a held-out part; consecutive training pieces
of one file stay one document (no boundary token between them). If no unit hashes into the held-out share,
the unit with the smallest hash is held out, so the held-out set is never empty for a corpus of two or more
units. Simplification against nanochat: no document-level shuffling beyond the loader's row permutation.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from nanoseek.config import ConfigError
from nanoseek.io import atomic_write, atomic_write_text
from nanoseek.text.sources import ReadStats, discover, kind_of, read_documents, read_json_safely

BOUNDARY_ID = 1  # nanoseek's <|eos|>: the document separator, as pack_documents uses it
PART_VERSION = 1  # bump when the part format or the split rule changes (old parts are then rebuilt)
KILL_ENV = "NANOSEEK_TEST_KILL_AFTER_PARTS"  # tests only: SIGKILL this process after that many parts
INLINE_BYTES = 4 << 20  # below this much new text, tokenize in this process (no worker start-up cost)
ENCODE_BATCH = 256  # pieces per encode_batch call


@dataclass(frozen=True)
class SplitSettings:
    text_field: str = "text"
    val_share: float = 0.02
    piece_chars: int = 8192

    def check(self) -> SplitSettings:
        if not 0.0 < self.val_share < 0.5:
            raise ConfigError(f"val_share must be in (0, 0.5), got {self.val_share}")
        if self.piece_chars < 256:
            raise ConfigError(f"piece_chars must be >= 256, got {self.piece_chars}")
        return self


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def unit_hash(text: str) -> float:
    """A stable number in [0, 1) per text (BLAKE2b, 8 bytes): the held-out decision."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0 ** 64


def split_pieces(text: str, piece_chars: int) -> list[str]:
    """Cut `text` into pieces of about `piece_chars` characters, each ending at a newline where one is near
    (a line longer than a piece is cut inside). "".join(pieces) == text."""
    pieces, start, n = [], 0, len(text)
    while start < n:
        end = min(n, start + piece_chars)
        if end < n:
            nl = text.rfind("\n", start + piece_chars // 2, end)
            end = nl + 1 if nl >= 0 else end
        pieces.append(text[start:end])
        start = end
    return pieces


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# ---- one source file -> one part (runs in a worker) ------------------------------------------------------------
_TOKENIZERS: dict[str, object] = {}


def _tokenizer(path: str):
    if path not in _TOKENIZERS:
        from tokenizers import Tokenizer

        _TOKENIZERS[path] = Tokenizer.from_file(path)
    return _TOKENIZERS[path]


def _units(path: Path, settings: SplitSettings, stats: ReadStats) -> Iterator[tuple[str, bool, bool]]:
    """(text, held_out, ends_document) for every unit of a file, in file order."""
    plain = kind_of(path) == "text"
    for doc in read_documents(path, settings.text_field, stats):
        pieces = split_pieces(doc, settings.piece_chars) if plain else [doc]
        held = [unit_hash(p) < settings.val_share for p in pieces]
        for i, (piece, h) in enumerate(zip(pieces, held)):
            # a training piece ends its document when the next piece is held out or the file ends
            yield piece, h, h or i == len(pieces) - 1 or held[i + 1]


def build_part(job: dict) -> dict:
    """Tokenize one source file into parts/<key>.{train,val}.bin + <key>.json; returns the sidecar dict."""
    os.environ.setdefault("RAYON_RS_NUM_CPUS", "1")  # one core per worker: the pool is the parallelism
    path, settings = Path(job["path"]), SplitSettings(**job["settings"])
    tok = _tokenizer(job["tokenizer"])
    dtype = np.dtype(job["dtype"])
    stats = ReadStats()
    out = {False: [], True: []}
    counts = {False: [0, 0, 0], True: [0, 0, 0]}  # documents, tokens, bytes per split
    smallest: tuple[float, str] | None = None
    batch: list[tuple[str, bool, bool]] = []

    def flush() -> None:
        encs = tok.encode_batch([t for t, _, _ in batch], add_special_tokens=False)
        for (text, held, ends), enc in zip(batch, encs):
            ids = enc.ids + [BOUNDARY_ID] if ends else enc.ids
            out[held].append(np.asarray(ids, dtype=dtype))
            c = counts[held]
            c[0] += int(ends)
            c[1] += len(ids)
            c[2] += len(text.encode("utf-8", "surrogatepass"))
        batch.clear()

    for unit in _units(path, settings, stats):
        h = unit_hash(unit[0])
        if smallest is None or h < smallest[0]:
            smallest = (h, unit[0])
        batch.append(unit)
        if len(batch) >= ENCODE_BATCH:
            flush()
    if batch:
        flush()
    parts_dir = Path(job["parts_dir"])
    key = job["key"]
    for held, name in ((False, "train"), (True, "val")):
        arr = np.concatenate(out[held]) if out[held] else np.zeros(0, dtype)
        _renamed_into_place(parts_dir / f"{key}.{name}.bin", arr)
    meta = {"version": PART_VERSION, "key": key, "path": job["path"], "documents": stats.documents,
            "bytes": stats.bytes, "skipped": dict(stats.skipped),
            "train": dict(zip(("documents", "tokens", "bytes"), counts[False])),
            "val": dict(zip(("documents", "tokens", "bytes"), counts[True])),
            "smallest_hash": smallest[0] if smallest else None}
    _renamed_into_place(parts_dir / f"{key}.json", (json.dumps(meta) + "\n").encode())
    return meta


def _renamed_into_place(path: Path, data) -> None:
    """Write to a temp file and rename it onto `path`: a killed process never leaves half a file. No fsync per
    part (three per source file dominated the build's wall time on thousands of small files): after a power
    loss a part may be short, which `_part_ok` detects from its sidecar's token counts, and it is rebuilt."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data.tobytes() if isinstance(data, np.ndarray) else data)
    os.replace(tmp, path)


def _part_ok(parts_dir: Path, key: str, itemsize: int) -> bool:
    meta = read_json_safely(parts_dir / f"{key}.json")
    if not (meta and meta.get("version") == PART_VERSION):
        return False
    try:
        return all((parts_dir / f"{key}.{s}.bin").stat().st_size == meta[s]["tokens"] * itemsize
                   for s in ("train", "val"))
    except (OSError, KeyError, TypeError):
        return False


# ---- the whole corpus ----------------------------------------------------------------------------------------
@dataclass
class Shards:
    """A built shard directory: the train and held-out token streams and the manifest."""

    root: Path
    manifest: dict
    last_build: dict | None = None  # what this process tokenized: files, MB, seconds, MB/s, processes

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.manifest["dtype"])

    def stream(self, split: str) -> np.ndarray:
        path = self.root / f"{split}.bin"
        if path.stat().st_size == 0:
            return np.zeros(0, self.dtype)
        return np.memmap(path, dtype=self.dtype, mode="r")


def tokenizer_digest(tokenizer_file: Path) -> str:
    return hashlib.sha256(tokenizer_file.read_bytes()).hexdigest()


def _part_key(content: str, tok_digest: str, settings: SplitSettings) -> str:
    spec = json.dumps([PART_VERSION, content, tok_digest, asdict(settings)], sort_keys=True)
    return hashlib.sha256(spec.encode()).hexdigest()[:32]


def build_shards(paths: list[str], tokenizer_file: str | Path, out_dir: str | Path, vocab_size: int,
                 settings: SplitSettings = SplitSettings(), workers: int | None = None,
                 progress: Callable[[str], None] | None = print, exclude: list[str] | tuple = ()) -> Shards:
    """Tokenize the files `paths` name into `out_dir` (reusing every part that is still valid) and assemble
    train.bin / val.bin; returns the Shards. Raises ConfigError when the corpus holds no document."""
    settings.check()
    tokenizer_file = Path(tokenizer_file)
    out_dir = Path(out_dir)
    parts_dir = out_dir / "parts"
    parts_dir.mkdir(parents=True, exist_ok=True)
    files = discover(paths, exclude)
    tok_digest = tokenizer_digest(tokenizer_file)
    dtype = token_dtype(vocab_size)
    old = read_json_safely(out_dir / "manifest.json") or {}
    known = {(s["path"], s["size"], s["mtime_ns"]): s["sha256"] for s in old.get("sources", [])
             if isinstance(s, dict) and {"path", "size", "mtime_ns", "sha256"} <= s.keys()}

    sources, jobs, todo_bytes, duplicates, seen = [], [], 0, 0, set()
    for f in files:
        try:
            st = f.stat()
            digest = known.get((str(f), st.st_size, st.st_mtime_ns)) or file_digest(f)
        except OSError:
            continue  # vanished or unreadable between listing and hashing: counted below as a skip
        key = _part_key(digest, tok_digest, settings)
        if key in seen:  # the same bytes twice (a copied file): trained once
            duplicates += 1
            continue
        seen.add(key)
        sources.append({"path": str(f), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest,
                        "key": key})
        if not _part_ok(parts_dir, key, dtype.itemsize):
            jobs.append({"path": str(f), "key": key, "parts_dir": str(parts_dir), "tokenizer": str(tokenizer_file),
                         "dtype": dtype.str, "settings": asdict(settings), "size": st.st_size})
            todo_bytes += st.st_size
    unreadable = len(files) - len(sources) - duplicates
    build = None
    if jobs:
        build = _run_jobs(jobs, todo_bytes, workers, progress)
    elif progress:
        progress(f"token shards up to date in {out_dir} ({len(sources)} files)")
    metas = [read_json_safely(parts_dir / f"{s['key']}.json") for s in sources]
    if any(m is None for m in metas):
        raise ConfigError(f"token shards in {parts_dir} are incomplete after the build; delete the folder and rerun")
    shards = _assemble(out_dir, sources, metas, tok_digest, dtype, vocab_size, settings,
                       {"unreadable files": unreadable, "duplicate files": duplicates}, progress)
    shards.last_build = build  # None when every part was reused
    return shards


def _run_jobs(jobs: list[dict], todo_bytes: int, workers: int | None, progress) -> dict:
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    inline = workers == 1 or todo_bytes < INLINE_BYTES
    start = time.perf_counter()
    done_bytes = 0
    with Progress(TextColumn("tokenizing"), BarColumn(), TextColumn("{task.completed}/{task.total} files"),
                  TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), disable=progress is None,
                  transient=True) as bar:
        task = bar.add_task("tok", total=len(jobs), rate="")

        def advance(job: dict) -> None:
            nonlocal done_bytes
            done_bytes += job["size"]
            rate = done_bytes / 1e6 / max(time.perf_counter() - start, 1e-9)
            bar.update(task, advance=1, rate=f"{rate:.1f} MB/s")

        if inline:
            kill_after = int(os.environ.get(KILL_ENV, "-1"))
            for n, job in enumerate(jobs, 1):
                build_part(job)
                advance(job)
                if n == kill_after:
                    import signal

                    os.kill(os.getpid(), signal.SIGKILL)
        else:
            with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
                futures = {pool.submit(build_part, job): job for job in sorted(jobs, key=lambda j: -j["size"])}
                for fut in as_completed(futures):
                    fut.result()
                    advance(futures[fut])
    elapsed = time.perf_counter() - start
    build = {"files": len(jobs), "mb": round(todo_bytes / 1e6, 3), "seconds": round(elapsed, 3),
             "mb_per_s": round(todo_bytes / 1e6 / max(elapsed, 1e-9), 3), "processes": 1 if inline else workers}
    if progress:
        progress(f"tokenized {len(jobs)} files, {build['mb']:.1f} MB in {elapsed:.1f} s ({build['mb_per_s']:.1f} MB/s, "
                 f"{build['processes']} process(es))")
    return build


def _assemble(out_dir: Path, sources: list[dict], metas: list[dict], tok_digest: str, dtype: np.dtype,
              vocab_size: int, settings: SplitSettings, extra_skips: dict, progress) -> Shards:
    parts_dir = out_dir / "parts"
    stats = ReadStats()
    totals = {"train": {"documents": 0, "tokens": 0, "bytes": 0}, "val": {"documents": 0, "tokens": 0, "bytes": 0}}
    for src, meta in zip(sources, metas):
        stats.documents += meta["documents"]
        stats.bytes += meta["bytes"]
        stats.skipped.update(meta["skipped"])
        src.update(documents=meta["documents"], skipped=meta["skipped"], train=meta["train"], val=meta["val"])
        for split in totals:
            for k in totals[split]:
                totals[split][k] += meta[split][k]
    stats.skipped.update({k: v for k, v in extra_skips.items() if v})
    if stats.documents == 0:
        raise ConfigError(f"no documents in the --data files ({len(sources)} files; skipped: {stats.skip_line()})")
    # never an empty held-out set: when no unit fell into the share, the file holding the smallest-hash unit
    # is held out whole (only tiny corpora: a file of n pieces has none held out with probability 0.98^n)
    rescue = None
    if totals["val"]["tokens"] == 0:
        rescue = min((m["smallest_hash"], i) for i, m in enumerate(metas) if m["smallest_hash"] is not None)[1]
        moved = metas[rescue]["train"]
        for k in totals["train"]:
            totals["train"][k] -= moved[k]
            totals["val"][k] += moved[k]
        if totals["train"]["tokens"] == 0:
            raise ConfigError("the corpus is too small to hold out any text: give it at least two files or "
                              f"{2 * settings.piece_chars} characters")
    layout = [s["key"] for s in sources]
    assembled = {"layout": layout, "rescue": rescue, "dtype": dtype.str}
    manifest = {"version": PART_VERSION, "tokenizer_sha256": tok_digest, "vocab_size": vocab_size,
                "dtype": dtype.str, "settings": asdict(settings), "sources": sources, "documents": stats.documents,
                "bytes": stats.bytes, "skipped": dict(stats.skipped), "split": totals, "assembled": assembled}
    old = read_json_safely(out_dir / "manifest.json") or {}
    if old.get("assembled") != assembled or not all((out_dir / f"{s}.bin").exists() for s in ("train", "val")):
        train = [parts_dir / f"{k}.train.bin" for i, k in enumerate(layout) if i != rescue]
        val = [parts_dir / f"{layout[rescue]}.train.bin"] if rescue is not None else \
            [parts_dir / f"{k}.val.bin" for k in layout]
        _concat(out_dir / "train.bin", train)
        _concat(out_dir / "val.bin", val)
    atomic_write_text(out_dir / "manifest.json", json.dumps(manifest, indent=1) + "\n")
    if progress:
        val = totals["val"]
        bpt = val["bytes"] / max(1, val["tokens"] - val["documents"])
        progress(f"corpus: {stats.documents:,} documents, {stats.bytes / 1e6:.1f} MB; train {totals['train']['tokens']:,} "
                 f"/ held-out {val['tokens']:,} tokens ({bpt:.2f} bytes/token); skipped: {stats.skip_line()}")
    return Shards(out_dir, manifest)


def _concat(dest: Path, parts: list[Path]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as out:
            for p in parts:
                with open(p, "rb") as f:
                    while chunk := f.read(8 << 20):
                        out.write(chunk)

    atomic_write(dest, write)
