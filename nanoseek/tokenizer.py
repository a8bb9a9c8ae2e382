"""Byte-level BPE tokenizer (HuggingFace `tokenizers`) with the chat / reasoning template.

Pre-tokenization splits every digit into its own piece before byte-level BPE (as DeepSeek-V3's
tokenizer and most math-capable models do), so numbers are read digit by digit and arithmetic never
depends on which digit groups happened to be merged. No normalizer: decode(encode(text)) == text exactly.
Two pre-tokenizer styles: "task" (digits, then GPT-2's byte-level regex; the task corpora) and "text" (the
GPT-4 `cl100k` split of letters, punctuation runs, newlines and whitespace, with single digits instead of
groups of three; user text, `pretrain --data`). The style is stored in tokenizer.json, so loading needs no flag.

Ten special tokens are single tokens with fixed ids 0..9 (bos=0, eos=1, pad=2):
`<|bos|> <|eos|> <|pad|> <|system|> <|user|> <|assistant|> <think> </think> <answer> </answer>`.
They are matched in any text passed to `encode`, including user text (the template has no escaping).

Template: a prompt is `<|bos|><|user|>{user}<|assistant|>`; the model continues with
`<think>...</think><answer>...</answer><|eos|>`. A training document is the prompt plus that completion.
The saved `tokenizer.json` is the plain `tokenizers` format, loadable by
`transformers.PreTrainedTokenizerFast(tokenizer_file=...)`.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from nanoseek.config import ConfigError
from nanoseek.io import atomic_write_text

# GPT-4's cl100k pre-tokenizer pattern with \p{N} (one digit) in place of \p{N}{1,3}
TEXT_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                      r"\s*[\r\n]+|\s+(?!\S)|\s+")
STYLES = ("task", "text")
SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>",
                  "<think>", "</think>", "<answer>", "</answer>"]
_SPECIAL_SPLIT = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))
FILE_NAME = "tokenizer.json"


def render_document(user_text: str, completion: str) -> str:
    """The text form of `document_ids`: encode(render_document(u, c)) == document_ids(u, c)."""
    return f"<|bos|><|user|>{user_text}<|assistant|>{completion}<|eos|>"


def _resolve(path: str | Path) -> Path:
    """A `.json` path is the file itself; anything else is a folder holding `tokenizer.json`."""
    path = Path(path)
    return path if path.suffix == ".json" else path / FILE_NAME


def _without_specials(texts: Iterable[str]) -> Iterator[str]:
    """Cut special tokens out of training text so BPE spends no merges on `<th`, `ink>` and friends."""
    for text in texts:
        for piece in _SPECIAL_SPLIT.split(text):
            if piece:
                yield piece


class TokenizerOps:
    """id lookup, encode and decode over a wrapped `tokenizers.Tokenizer` (`self._tok`): shared by nanoseek's own
    tokenizer and an imported checkpoint's (nanoseek.hf_tokenizer.ImportedTokenizer)."""

    _tok: HFTokenizer
    bos_id: int | None

    def id_of(self, token: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise ConfigError(f"token {token!r} is not in the vocabulary")
        return i

    def encode(self, text: str, bos: bool = False) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if bos and self.bos_id is not None else ids

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)


class Tokenizer(TokenizerOps):
    def __init__(self, tok: HFTokenizer):
        self._tok = tok
        for i, t in enumerate(SPECIAL_TOKENS):
            if tok.token_to_id(t) != i:
                raise ConfigError(f"tokenizer special token {t!r} must have id {i}, "
                                  f"got {tok.token_to_id(t)}; retrain with `nanoseek tokenizer train`")
        self.bos_id, self.eos_id, self.pad_id = 0, 1, 2

    # ---- construction --------------------------------------------------------------------
    @staticmethod
    def _empty(style: str = "task") -> HFTokenizer:
        if style not in STYLES:
            raise ConfigError(f"tokenizer style must be one of {', '.join(STYLES)}, got {style!r}")
        tok = HFTokenizer(models.BPE())
        if style == "task":
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ])
        else:
            from tokenizers import Regex

            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(TEXT_SPLIT_PATTERN), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ])
        tok.decoder = decoders.ByteLevel()
        return tok

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 512, style: str = "task") -> Tokenizer:
        """Train BPE on `texts`. The vocabulary may come out smaller than asked for on a tiny corpus."""
        min_size = len(SPECIAL_TOKENS) + 256
        if vocab_size < min_size:
            raise ConfigError(f"vocab_size must be at least {min_size} (10 special tokens + 256 bytes), "
                              f"got {vocab_size}")
        tok = cls._empty(style)
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tok.train_from_iterator(_without_specials(texts), trainer=trainer)
        return cls(tok)

    def save(self, path: str | Path) -> Path:
        """Atomically write `tokenizer.json` (path may be the file or its folder); returns the file."""
        out = _resolve(path)
        atomic_write_text(out, self._tok.to_str(pretty=True))
        return out

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        file = _resolve(path)
        if (file.parent / "tokenizer_config.json").is_file():  # an imported checkpoint's (nanoseek.hf_tokenizer)
            raise ConfigError(f"{file} belongs to an imported checkpoint (its tokenizer_config.json is beside it): "
                              "read it with nanoseek.hf_tokenizer.load_tokenizer (every command does)")
        if not file.is_file():
            raise ConfigError(f"tokenizer not found: {file}; train one with "
                              f"`nanoseek tokenizer train --out {file}`")
        try:
            json.loads(file.read_text())
            tok = HFTokenizer.from_file(str(file))
        except Exception as e:  # noqa: BLE001 -- tokenizers raises a bare Exception on a bad file
            reason = (str(e).splitlines() or [type(e).__name__])[0]
            raise ConfigError(f"tokenizer file is corrupt ({file}): {reason}; "
                              "retrain with `nanoseek tokenizer train`") from None
        return cls(tok)

    # ---- encode / decode -----------------------------------------------------------------
    imported = False  # nanoseek.hf_tokenizer.ImportedTokenizer says True

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def sample_vocab(self) -> int:
        """Token ids a model may sample and trainers take log-probs over: the whole vocabulary (a nanoseek
        model's embedding has exactly these rows)."""
        return self.vocab_size

    @property
    def stop_ids(self) -> frozenset[int]:
        return frozenset([self.eos_id])


    def token_strings(self, ids: Iterable[int]) -> list[str]:
        """Each id decoded on its own: for showing how a text was split."""
        return [self.decode([i]) for i in ids]

    # ---- chat / reasoning template -------------------------------------------------------
    def prompt_ids(self, user_text: str) -> list[int]:
        return [self.bos_id, self.id_of("<|user|>"), *self.encode(user_text), self.id_of("<|assistant|>")]

    def document_ids(self, user_text: str, completion: str) -> list[int]:
        return self.prompt_ids(user_text) + self.encode(completion) + [self.eos_id]

    # ---- conversations -------------------------------------------------------------------
    def chat_document(self, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
        """A conversation in the chat template, with a mask of the tokens a model is trained on.

        `<|bos|>`, then each message as its role token and its content; an assistant turn is followed by
        `<|eos|>` (the model learns to end its turn). `mask[i]` is True for the content and the eos of every
        assistant turn, False for everything else (bos, role tokens, system and user text). For one user and
        one assistant message the ids equal `document_ids(user, assistant)` and the mask covers exactly the
        completion and eos, as single-turn SFT does. `add_generation_prompt` appends `<|assistant|>`: the prompt
        a model continues. `<think>...</think>` in assistant content stays (the tags are special tokens)."""
        ids, mask = [self.bos_id], [False]
        for i, m in enumerate(messages):
            role, content = message_role_content(m, i)
            ids.append(self.id_of(ROLE_TOKENS[role]))
            mask.append(False)
            body = self.encode(content)
            ids.extend(body)
            mask.extend([role == "assistant"] * len(body))
            if role == "assistant":
                ids.append(self.eos_id)
                mask.append(True)
        if add_generation_prompt:
            ids.append(self.id_of("<|assistant|>"))
            mask.append(False)
        return ids, mask

    def chat_ids(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """The token ids of a conversation rendered with the chat template (see chat_document)."""
        return self.chat_document(messages, add_generation_prompt)[0]

    def opens_thinking(self, prompt: list[int]) -> bool:
        """False: nanoseek's prompt ends at `<|assistant|>`; the model opens `<think>` itself."""
        return False

    def completion_text(self, prompt: list[int], text: str) -> str:
        """A reply as a reward parser reads it: the text itself (the prompt opens no think block)."""
        return text


class ChatTokenizer(Protocol):
    """The calls every command and trainer makes on a tokenizer: nanoseek's own `Tokenizer` and an imported
    checkpoint's `nanoseek.hf_tokenizer.ImportedTokenizer` both answer them (tests/test_hf_import_train.py checks
    that every member exists on both). Incremental decoding for streaming is the server's (engine/protocol.py),
    over `decode` of single tokens."""

    imported: bool
    bos_id: int | None
    eos_id: int
    pad_id: int

    @property
    def vocab_size(self) -> int: ...
    @property
    def sample_vocab(self) -> int: ...
    @property
    def stop_ids(self) -> frozenset[int]: ...
    def id_of(self, token: str) -> int: ...
    def encode(self, text: str, bos: bool = False) -> list[int]: ...
    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str: ...
    def token_strings(self, ids: Iterable[int]) -> list[str]: ...
    def prompt_ids(self, user_text: str) -> list[int]: ...
    def document_ids(self, user_text: str, completion: str) -> list[int]: ...
    def chat_ids(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]: ...
    def chat_document(self, messages: list[dict], add_generation_prompt: bool = False
                      ) -> tuple[list[int], list[bool]]: ...
    def opens_thinking(self, prompt: list[int]) -> bool: ...
    def completion_text(self, prompt: list[int], text: str) -> str: ...


ROLE_TOKENS = {"system": "<|system|>", "developer": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}


def message_role_content(message: object, index: int = 0) -> tuple[str, str]:
    """(role, text) of an OpenAI-format message `{"role": ..., "content": str | [{"type": "text", "text": ...}]}`;
    a developer message counts as system. Anything else is one ConfigError naming the message."""
    if not isinstance(message, dict):
        raise ConfigError(f"message {index} is not an object")
    role, content = message.get("role"), message.get("content")
    if role not in ROLE_TOKENS:
        raise ConfigError(f"message {index}: role must be one of {', '.join(ROLE_TOKENS)}, got {role!r}")
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise ConfigError(f"message {index}: content parts must be {{'type': 'text', 'text': str}}")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise ConfigError(f"message {index}: content must be a string")
    return ("system" if role == "developer" else role), content
