"""nanoseek's byte-level BPE tokenizer and chat template as GGUF metadata (llama.cpp's `gpt2` tokenizer model).

What `convert_hf_to_gguf.py` writes for a `tokenizers` BPE (`_set_vocab_gpt2`): `tokenizer.ggml.model = gpt2`,
the token strings in id order (byte-level unicode, as in tokenizer.json), the merges as "a b" strings, one token
type per id (special tokens CONTROL, ids past the tokenizer's vocabulary that the embedding still has UNUSED
`[PADi]`), the bos / eos / pad ids and `tokenizer.chat_template`.

The pre-tokenizer is named, not stored: llama.cpp picks its split regexes from `tokenizer.ggml.pre`.
- "task" style (single digits, then GPT-2's byte-level regex) -> `smollm`: llama.cpp's `\\p{N}` then the GPT-2
  regex (the starcoder / refact / smollm family; smollm also keeps spaces as they are when detokenizing).
- "text" style (cl100k's split with single digits) -> `qwen2`: the same regex, with the case-insensitive
  contractions spelled out as llama.cpp does for every `(?i:...)` pattern.
The regexes are the same but the engines are not (HF `tokenizers` runs Oniguruma, llama.cpp its own matcher), so
agreement is measured, not assumed (tests/test_gguf.py, bench/gguf_check.py).

Chat template: the Jinja form of Tokenizer.chat_document: `<|bos|>`, each message as its role token and content
(system/developer -> `<|system|>`), an assistant turn closed by `<|eos|>`, `<|assistant|>` as the generation prompt.
No bos is added by llama.cpp itself (`add_bos_token` false): nanoseek's prompts carry their own.
"""
from __future__ import annotations

import json
from pathlib import Path

import gguf

from nanoseek.config import ConfigError
from nanoseek.tokenizer import SPECIAL_TOKENS

PRE_TOKENIZERS = {"task": "smollm", "text": "qwen2"}

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] in ('system', 'developer') %}<|system|>{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tokenizer_style(spec: dict) -> str:
    """"task" or "text" from a tokenizer.json's pre_tokenizer (nanoseek.tokenizer.Tokenizer._empty), else a
    ConfigError: a foreign tokenizer has no llama.cpp pre-tokenizer name this exporter can vouch for."""
    pre = spec.get("pre_tokenizer") or {}
    kinds = [p.get("type") for p in pre.get("pretokenizers", [])] if pre.get("type") == "Sequence" else []
    if kinds == ["Digits", "ByteLevel"]:
        return "task"
    if kinds == ["Split", "ByteLevel"]:
        return "text"
    raise ConfigError("the run's tokenizer is not one nanoseek trained (its pre-tokenizer is "
                      f"{pre.get('type', 'missing')}): GGUF export supports nanoseek's own tokenizers; "
                      "for an imported checkpoint use llama.cpp's convert_hf_to_gguf.py on the original")


def vocab_metadata(tokenizer_file: str | Path, n_vocab: int) -> dict:
    """tokens, token types, merges, pre-tokenizer name and special ids for a model with n_vocab embedding rows."""
    try:
        spec = json.loads(Path(tokenizer_file).read_text())
        model = spec["model"]
        vocab: dict[str, int] = dict(model["vocab"])
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    except FileNotFoundError:
        raise ConfigError(f"tokenizer not found: {tokenizer_file}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{tokenizer_file} is not a readable tokenizer.json ({type(e).__name__}: {e})") from None
    if model.get("type") != "BPE":
        raise ConfigError(f"{tokenizer_file}: GGUF export needs a BPE tokenizer, got {model.get('type')!r}")
    style = tokenizer_style(spec)
    special = {}
    for t in spec.get("added_tokens", []):
        vocab[t["content"]] = t["id"]
        special[t["id"]] = bool(t.get("special"))
    for i, t in enumerate(SPECIAL_TOKENS):
        if vocab.get(t) != i:
            raise ConfigError(f"{tokenizer_file}: special token {t!r} must have id {i}")
    n_tok = max(vocab.values()) + 1
    if n_tok > n_vocab:
        raise ConfigError(f"the tokenizer has {n_tok} tokens but the model's embedding only {n_vocab} rows")
    by_id = {i: s for s, i in vocab.items()}
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if special.get(i) else
                         gguf.TokenType.USER_DEFINED if i in special else gguf.TokenType.NORMAL)
    return {"tokens": tokens, "types": types, "merges": merges, "pre": PRE_TOKENIZERS[style], "style": style,
            "bos": 0, "eos": 1, "pad": 2}


def add_tokenizer(writer: gguf.GGUFWriter, meta: dict) -> None:
    """Write vocab_metadata's fields and the chat template into a GGUFWriter (before its header is written)."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(meta["pre"])
    writer.add_token_list(meta["tokens"])
    writer.add_token_types(meta["types"])
    writer.add_token_merges(meta["merges"])
    writer.add_bos_token_id(meta["bos"])
    writer.add_eos_token_id(meta["eos"])
    writer.add_pad_token_id(meta["pad"])
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
