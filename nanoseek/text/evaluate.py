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
def _window_sums(model, stream: torch.Tensor, token_bytes: torch.Tensor, batch_size: int, tail: bool) -> list[float]:
    """[nats, bytes, tokens] summed over non-overlapping windows of the model's context over a token stream;
    `tail`: also the last window shorter than the context (so every token after the first is predicted)."""
    L = model.cfg.max_seq_len
    n_full = max(0, (len(stream) - 1) // L)
    model.eval()
    total = torch.zeros(3, dtype=torch.float64)
    for b in range(0, n_full, batch_size):
        rows = torch.stack([stream[s * L:s * L + L + 1] for s in range(b, min(b + batch_size, n_full))])
        total += bpb_sums(model, rows[:, :-1], rows[:, 1:], token_bytes)
    if tail and n_full * L < len(stream) - 1:
        row = stream[n_full * L:][None]
        total += bpb_sums(model, row[:, :-1], row[:, 1:], token_bytes)
    return total.tolist()


def evaluate_text(model, tokenizer, paths: list[str], max_bytes: int = 10_000_000, text_field: str = "text",
                  batch_size: int = 8) -> dict:
    if max_bytes < 1:
        raise ConfigError(f"--max-bytes must be >= 1, got {max_bytes}")
    t0 = time.perf_counter()
    docs, stats = read_text(paths, text_field, max_bytes)
    if not docs:
        raise ConfigError(f"no text to evaluate in {' '.join(paths)} (skipped: {stats.skip_line()})")
    stream = [tokenizer.eos_id]  # the boundary a document follows in training
    for doc in docs:
        stream.extend(tokenizer.encode(doc))
        stream.append(tokenizer.eos_id)
    nats, nbytes, counted = _window_sums(model, torch.tensor(stream, dtype=torch.long), token_byte_lengths(tokenizer),
                                         batch_size, tail=True)
    entropy = byte_unigram_entropy(d.encode("utf-8", "surrogatepass") for d in docs)
    bpb = bits_per_byte(nats, nbytes)
    return {"bits_per_byte": bpb, "bytes": int(nbytes), "tokens": int(counted), "documents": len(docs),
            "nats_per_token": nats / max(counted, 1), "bytes_per_token": nbytes / max(counted, 1),
            "byte_unigram_entropy": entropy, "bpb_over_entropy": bpb / entropy if entropy > 0 else math.nan,
            "skipped": dict(stats.skipped), "seconds": time.perf_counter() - t0}


@torch.no_grad()
def evaluate_stream(model, tokenizer, stream: np.ndarray, max_tokens: int = 200_000, batch_size: int = 16) -> dict:
    """Bits per byte over the first `max_tokens` of a token stream (e.g. a run's held-out val.bin), in
    non-overlapping windows of the model's context, and the byte-unigram entropy of the text they decode to."""
    L = model.cfg.max_seq_len
    head = torch.from_numpy(np.asarray(stream[:max_tokens + 1]).astype(np.int64))
    n_rows = max(0, (len(head) - 1) // L)
    if n_rows == 0:
        raise ConfigError(f"the stream ({len(stream)} tokens) is shorter than one window of {L + 1} tokens")
    nats, nbytes, counted = _window_sums(model, head, token_byte_lengths(tokenizer), batch_size, tail=False)
    text = tokenizer.decode(head[1:n_rows * L + 1].tolist(), skip_special=True)
    entropy = byte_unigram_entropy([text.encode("utf-8", "surrogatepass")])
    bpb = bits_per_byte(nats, nbytes)
    return {"bits_per_byte": bpb, "bytes": int(nbytes), "tokens": int(counted), "nats_per_token": nats / max(counted, 1),
            "byte_unigram_entropy": entropy, "bpb_over_entropy": bpb / entropy if entropy > 0 else math.nan}
