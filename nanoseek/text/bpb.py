"""Bits per byte: the tokenizer-independent measure of a language model (nanochat's `evaluate_bpb`).

    bpb = (sum over predicted tokens of -ln p(token)) / ln 2 / (UTF-8 bytes those tokens stand for)

A byte-level BPE token stands for a fixed byte string, so each id's byte count is known in advance
(`token_byte_lengths`); special tokens (the document boundary, chat tokens) stand for no text and are left
out of both sums, as nanochat does. Because decode(encode(text)) == text, the summed bytes equal the held-out
text's UTF-8 length minus nothing. The reference point `byte_unigram_entropy` is what a model that learned
byte frequencies but no context would reach (a bpb at or above it means no context was learned).
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F


def token_byte_lengths(tokenizer) -> torch.Tensor:
    """(vocab_size,) int64: UTF-8 bytes each id stands for; 0 for special (added) tokens. Byte-level BPE stores
    each byte as one printable character, so a token's byte count is its stored string's length."""
    from tokenizers import decoders

    from nanoseek.config import ConfigError

    hf = tokenizer._tok
    if not isinstance(hf.decoder, decoders.ByteLevel):
        raise ConfigError("bits per byte needs a byte-level BPE tokenizer (this one's decoder is "
                          f"{type(hf.decoder).__name__})")
    special = set(hf.get_added_tokens_decoder())
    out = torch.zeros(tokenizer.vocab_size, dtype=torch.long)
    for i in range(tokenizer.vocab_size):
        if i not in special:
            out[i] = len(hf.id_to_token(i) or "")
    return out


def byte_unigram_entropy(chunks: Iterable[bytes]) -> float:
    """Entropy in bits of the byte distribution of the concatenated chunks."""
    counts = np.zeros(256, dtype=np.int64)
    for c in chunks:
        counts += np.bincount(np.frombuffer(c, dtype=np.uint8), minlength=256)
    p = counts[counts > 0] / max(1, counts.sum())
    return float(-(p * np.log2(p)).sum())


@torch.no_grad()
def bpb_sums(model, x: torch.Tensor, y: torch.Tensor, token_bytes: torch.Tensor) -> torch.Tensor:
    """[summed nats, summed bytes, counted tokens] of one batch (targets of 0 bytes left out)."""
    logits = model.logits(model.hidden(x))
    nats = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="none")
    nbytes = token_bytes.to(y.device)[y.flatten()]
    counted = nbytes > 0
    return torch.stack([nats[counted].sum().double(), nbytes.sum().double(), counted.sum().double()])


def bits_per_byte(nats: float, nbytes: float) -> float:
    return nats / math.log(2) / nbytes if nbytes > 0 else float("nan")
