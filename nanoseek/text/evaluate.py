"""`nanoseek eval --data`: bits per byte of a trained run on any text (nanoseek.text.bpb).

The files are read as `pretrain --data` reads them (every unit, no held-out selection: the caller chooses the
text), at most `max_bytes` UTF-8 bytes (the last document cut at a character boundary), tokenized with the
run's tokenizer, each document followed by the boundary token and the stream opened by one, so every text
token is predicted. The stream is cut into windows of the model's context with no overlap (each token is
predicted once, with between 0 and L - 1 tokens of context; a sliding window would give lower, slower numbers).
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch

from nanoseek.config import ConfigError
from nanoseek.text.bpb import bits_per_byte, bpb_sums, byte_unigram_entropy, token_byte_lengths
from nanoseek.text.shards import BOUNDARY_ID
from nanoseek.text.sources import ReadStats, discover, read_documents


def read_text(paths: list[str], text_field: str, max_bytes: int) -> tuple[list[str], ReadStats]:
    stats, docs, used = ReadStats(), [], 0
    for f in discover(paths):
        for doc in read_documents(f, text_field, stats):
            raw = doc.encode("utf-8", "surrogatepass")
            if used + len(raw) > max_bytes:
                raw = raw[:max_bytes - used].decode("utf-8", "ignore").encode("utf-8")
                if raw:
                    docs.append(raw.decode("utf-8"))
                return docs, stats
            docs.append(doc)
            used += len(raw)
    return docs, stats


@torch.no_grad()
def evaluate_text(model, tokenizer, paths: list[str], max_bytes: int = 10_000_000, text_field: str = "text",
                  batch_size: int = 8) -> dict:
    if max_bytes < 1:
        raise ConfigError(f"--max-bytes must be >= 1, got {max_bytes}")
    t0 = time.perf_counter()
    docs, stats = read_text(paths, text_field, max_bytes)
    if not docs:
        raise ConfigError(f"no text to evaluate in {' '.join(paths)} (skipped: {stats.skip_line()})")
    stream = [BOUNDARY_ID if tokenizer.eos_id == BOUNDARY_ID else tokenizer.eos_id]
    for doc in docs:
        stream.extend(tokenizer.encode(doc))
        stream.append(tokenizer.eos_id)
    ids = torch.tensor(stream, dtype=torch.long)
    L = model.cfg.max_seq_len
    token_bytes = token_byte_lengths(tokenizer)
    model.eval()
    total = torch.zeros(3, dtype=torch.float64)
    starts = list(range(0, len(stream) - 1, L))
    for b in range(0, len(starts), batch_size):
        group = starts[b:b + batch_size]
        width = min(L, len(stream) - 1 - group[0])
        full = [s for s in group if s + L + 1 <= len(stream)]
        if full:
            rows = torch.stack([ids[s:s + L + 1] for s in full])
            total += bpb_sums(model, rows[:, :-1], rows[:, 1:], token_bytes)
        for s in group:  # the tail window, shorter than L
            if s + L + 1 > len(stream):
                width = len(stream) - 1 - s
                row = ids[s:s + width + 1][None]
                total += bpb_sums(model, row[:, :-1], row[:, 1:], token_bytes)
    nats, nbytes, counted = total.tolist()
    entropy = byte_unigram_entropy(d.encode("utf-8", "surrogatepass") for d in docs)
    bpb = bits_per_byte(nats, nbytes)
    return {"bits_per_byte": bpb, "bytes": int(nbytes), "tokens": int(counted), "documents": len(docs),
            "nats_per_token": nats / max(counted, 1), "bytes_per_token": nbytes / max(counted, 1),
            "byte_unigram_entropy": entropy, "bpb_over_entropy": bpb / entropy if entropy > 0 else math.nan,
            "skipped": dict(stats.skipped), "seconds": time.perf_counter() - t0}


__all__ = ["evaluate_text", "read_text", "np"]


@torch.no_grad()
def evaluate_stream(model, tokenizer, stream: np.ndarray, max_tokens: int = 200_000, batch_size: int = 16) -> dict:
    """Bits per byte over the first `max_tokens` of a token stream (e.g. a run's held-out val.bin), in
    non-overlapping windows of the model's context, and the byte-unigram entropy of the text they decode to."""
    from nanoseek.data import TokenRows

    L = model.cfg.max_seq_len
    rows = TokenRows(np.asarray(stream[:max_tokens + 1]), L)
    if rows.size(0) == 0:
        raise ConfigError(f"the stream ({len(stream)} tokens) is shorter than one window of {L + 1} tokens")
    token_bytes = token_byte_lengths(tokenizer)
    model.eval()
    total = torch.zeros(3, dtype=torch.float64)
    for b in range(0, rows.size(0), batch_size):
        batch = rows[b:b + batch_size]
        total += bpb_sums(model, batch[:, :-1], batch[:, 1:], token_bytes)
    nats, nbytes, counted = total.tolist()
    targets = np.asarray(stream[1:rows.size(0) * L + 1])
    text = tokenizer.decode(targets.tolist(), skip_special=True)
    entropy = byte_unigram_entropy([text.encode("utf-8", "surrogatepass")])
    bpb = bits_per_byte(nats, nbytes)
    return {"bits_per_byte": bpb, "bytes": int(nbytes), "tokens": int(counted), "nats_per_token": nats / max(counted, 1),
            "byte_unigram_entropy": entropy, "bpb_over_entropy": bpb / entropy if entropy > 0 else math.nan}
