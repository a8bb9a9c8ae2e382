"""The OpenAI wire format as nanoseek speaks it: request schemas, the error shape, the chat template, and the
token-stream -> text-delta splitter that routes thinking to `reasoning_content` (as DeepSeek's API does).

Chat template (the one pretraining documents and multi-turn SFT use: `Tokenizer.chat_ids`): `<|bos|>`, then each
message as its role token (`<|system|>`, `<|user|>`, `<|assistant|>`) followed by its text, a previous assistant
turn closed by `<|eos|>` as the model learned to end it, then a final `<|assistant|>` for the model to continue. A
developer message counts as system. For one user message this is exactly `Tokenizer.prompt_ids(text)`. Previous
assistant turns are sent back as their `content` only: clients drop `reasoning_content` from the history, as
DeepSeek's API asks them to.

The model answers `<think>R</think><answer>A</answer><|eos|>`. In a chat completion every token between
`<think>` and `</think>` is reasoning, every other token is content, and special tokens are never shown, so
`reasoning_content` = R and `content` = A (plus any text the model writes outside the tags). A plain
completion returns the raw text with the reasoning tags; the control tokens (`<|bos|>`, `<|eos|>`, `<|pad|>`
and the role tokens) are never shown, as other servers skip special tokens.

Detokenization is incremental: each token's bytes go through one incremental UTF-8 decoder per field, so
the work per token does not grow with the text (re-decoding everything was quadratic), and an unfinished
multi-byte character waits in the decoder. Stop strings (at most 4, each at most MAX_STOP_CHARS characters,
like OpenAI's 4) apply to the text of each field separately and are matched incrementally with KMP automata;
the text is cut before the first match, and text that could still grow into a stop string is held back until
it cannot.

Imported checkpoints (nanoseek.hf_tokenizer.ImportedTokenizer, `imported = True`): the prompt is the checkpoint's
own Jinja chat template rendered over the messages (`chat_ids`, what transformers' apply_chat_template gives;
developer counts as system), generation stops on any of its eos ids, the hidden control tokens are its special
added tokens, and `<think>` / `</think>` route reasoning when the vocabulary has them as single tokens. A template
whose generation prompt opens `<think>` (DeepSeek-R1's) starts the answer inside the reasoning field.

`logprobs` (plain completions, 0-5 alternatives as in OpenAI's legacy API) are the model's raw log-probabilities
(temperature 1, before top-k/top-p), vLLM's default; `text_offset` counts characters of the completion text.
"""
from __future__ import annotations

import codecs
import weakref
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from tokenizers import decoders
from tokenizers.decoders import DecodeStream

MAX_STOPS = 4
MAX_STOP_CHARS = 1000
MAX_LOGPROBS = 5
CONTROL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>")
ROLE_TOKENS = {"system": "<|system|>", "developer": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}


# ---- errors ---------------------------------------------------------------------------------------------
class APIError(Exception):
    """An error the client caused (or a server fault), rendered in OpenAI's error shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---- request schemas -----------------------------------------------------------------------------------
class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """Fields shared by /v1/chat/completions and /v1/completions. Unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)  # not in OpenAI's API; vLLM and others accept it too
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = Field(None, ge=1, le=16)
    ignore_eos: bool = False  # vLLM's extension: keep going past eos to max_tokens (benchmarks)
    stream: bool | None = False
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v):
        stops = [v] if isinstance(v, str) else v
        if stops is None:
            return v
        if len(stops) > MAX_STOPS or any(not s for s in stops):
            raise ValueError(f"stop must be at most {MAX_STOPS} non-empty strings")
        longest = max(len(s) for s in stops) if stops else 0
        if longest > MAX_STOP_CHARS:
            raise ValueError(f"each stop string must be at most {MAX_STOP_CHARS} characters, got {longest}")
        return v

    @property
    def stops(self) -> list[str]:
        return [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class ChatRequest(SamplingRequest):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


def parse(schema: type[BaseModel], data: object) -> BaseModel:
    """Validate a JSON body; the first problem becomes a 400 naming the field."""
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object")
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        raise APIError(400, f"{loc}: {err['msg']}" if loc else err["msg"], param=loc or None) from None


# ---- chat template -----------------------------------------------------------------------------------
def chat_prompt_ids(tokenizer, messages: list[Message]) -> list[int]:
    if getattr(tokenizer, "imported", False):
        from nanoseek.config import ConfigError

        chat = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
        try:
            return tokenizer.chat_ids(chat, add_generation_prompt=True)
        except ConfigError as e:  # the template raised (e.g. roles must alternate) or has no chat template
            raise APIError(400, str(e), param="messages") from None
    return tokenizer.chat_ids([{"role": m.role, "content": m.text()} for m in messages], add_generation_prompt=True)


# ---- tokens -> text ------------------------------------------------------------------------------------
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte <-> printable-character map, inverted: the character each byte is stored as -> the byte."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), ord("\xff") + 1)]
    cs = list(bs)
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def token_bytes(tokenizer) -> list[bytes] | None:
    """The bytes each token id stands for, when the tokenizer's decoder is byte-level BPE (nanoseek's is):
    decode(ids) == b"".join(table[i] for i in ids).decode("utf-8", "replace"). None for other decoders.
    Built once per tokenizer."""
    if tokenizer in _BYTE_TABLES:
        return _BYTE_TABLES[tokenizer]
    hf = getattr(tokenizer, "_tok", None)
    table = None
    if hf is not None and isinstance(hf.decoder, decoders.ByteLevel):
        alphabet = _byte_level_alphabet()
        added = {i: t.content for i, t in hf.get_added_tokens_decoder().items()}
        table = []
        for i in range(tokenizer.vocab_size):
            s = hf.id_to_token(i) or ""
            if i in added:  # an added token is written in plain text, whatever characters it uses
                table.append(added[i].encode())
                continue
            try:
                table.append(bytes(alphabet[c] for c in s))
            except KeyError:
                table.append(s.encode())
    _BYTE_TABLES[tokenizer] = table
    return table


class IncrementalDecoder:
    """Token ids -> text, one token at a time, in O(token length) per token: the concatenated output equals
    `tokenizer.decode(all ids)`. Bytes of an unfinished UTF-8 character wait inside the decoder until the
    character completes (or `flush` renders them as U+FFFD, as the full decode would). For tokenizers that
    are not byte-level it falls back to `tokenizers`' DecodeStream."""

    def __init__(self, tokenizer):
        self.table = token_bytes(tokenizer)
        if self.table is not None:
            self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        else:
            self.hf, self.stream = tokenizer._tok, DecodeStream(skip_special_tokens=False)

    def step(self, token: int) -> str:
        if self.table is not None:
            return self.utf8.decode(self.table[token])
        return self.stream.step(self.hf, token) or ""

    def flush(self) -> str:
        return self.utf8.decode(b"", final=True) if self.table is not None else ""


class StopMatcher:
    """Finds the first occurrence of any stop string in a text that arrives in pieces, with Knuth-Morris-Pratt
    automata: O(1) amortised work per character and stop string, whatever the stop strings' length (the old
    re-scan of the whole text was quadratic). `state[k]` is the length of the longest prefix of stop k that
    is a suffix of the text so far, so `max(state)` characters at the end may still grow into a stop string
    and must be held back."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.fail = [self._failure(s) for s in stops]
        self.state = [0] * len(stops)

    @staticmethod
    def _failure(s: str) -> list[int]:
        f = [0] * len(s)
        k = 0
        for i in range(1, len(s)):
            while k and s[i] != s[k]:
                k = f[k - 1]
            if s[i] == s[k]:
                k += 1
            f[i] = k
        return f

    def feed(self, chunk: str) -> int | None:
        """Advance over `chunk`; returns the start of the first match relative to the end of the text before
        this chunk (negative: it began in earlier text), or None. Among stops completing in this chunk the
        earliest-starting one wins."""
        best = None
        for k, s in enumerate(self.stops):
            st, f, n = self.state[k], self.fail[k], len(s)
            for i, ch in enumerate(chunk):
                while st and ch != s[st]:
                    st = f[st - 1]
                if ch == s[st]:
                    st += 1
                if st == n:
                    start = i + 1 - n
                    best = start if best is None else min(best, start)
                    break
            self.state[k] = st
        return best

    @property
    def hold(self) -> int:
        return max(self.state, default=0)


@dataclass
class _Field:
    decoder: IncrementalDecoder
    matcher: StopMatcher
    released: list[str] = field(default_factory=list)  # text already sent
    n_released: int = 0  # its length in characters
    held: str = ""  # decoded, not sent: it may still become a stop string (shorter than the longest stop)
    final: bool = False  # cut at a stop string, or the choice finished

    def text(self) -> str:
        return "".join(self.released) + self.held


class ChoiceStream:
    """Turns one choice's generated tokens into text deltas per field ("content" / "reasoning_content" in
    chat mode, "text" for plain completions), applying stop strings. Work per token is O(the token's bytes
    x number of stops), independent of the text length so far. Not thread-safe: one consumer."""

    def __init__(self, tokenizer, chat: bool, stop: list[str] | None = None, logprobs: int | None = None,
                 thinking: bool = False):
        """thinking: the prompt left a think block open (chat only): the first tokens are reasoning."""
        self.tok = tokenizer
        self.chat = chat
        self.stop = list(stop or [])
        self.fields: dict[str, _Field] = {}
        self.current = ("reasoning_content" if thinking else "content") if chat else "text"
        self.finish_reason: str | None = None
        self.n_tokens = 0
        if getattr(tokenizer, "imported", False):
            self.think_id, self.end_think_id = tokenizer.think_ids or (None, None)
            self.control_ids = set(tokenizer.control_ids)
            self.special_ids = self.control_ids
        else:
            self.think_id, self.end_think_id = tokenizer.id_of("<think>"), tokenizer.id_of("</think>")
            self.control_ids = {tokenizer.id_of(t) for t in CONTROL_TOKENS}
            self.special_ids = self.control_ids | {tokenizer.id_of(t) for t in ("<answer>", "</answer>")}
        self.eos_id = tokenizer.eos_id
        self.stop_ids = frozenset(getattr(tokenizer, "stop_ids", ())) | {tokenizer.eos_id}
        if chat and thinking:
            self._field("reasoning_content")
        self.logprobs = logprobs  # None: not asked; k: the top-k alternatives per token (plain completions)
        self.lp_tokens: list[str] = []
        self.lp_values: list[float] = []
        self.lp_top: list[dict[str, float]] = []
        self.lp_offsets: list[int] = []

    def _field(self, name: str) -> _Field:
        if name not in self.fields:
            self.fields[name] = _Field(IncrementalDecoder(self.tok), StopMatcher(self.stop))
        return self.fields[name]

    def _shown(self, token: int) -> bool:
        if token in self.stop_ids:
            return False
        return token not in (self.special_ids if self.chat else self.control_ids)

    def token_text(self, token: int) -> str:
        return self.tok.decode([token]) if self._shown(token) else ""

    def feed(self, token: int, finish: str | None = None, logprob=None) -> dict[str, str]:
        """Add one generated token (`finish` set on the last one, `logprob` a batcher.TokenLogprob when asked);
        returns the text now safe to send."""
        if self.finish_reason is not None:
            return {}
        self.n_tokens += 1
        touched = None
        if self.chat and token == self.think_id:
            self.current = "reasoning_content"
            self._field(self.current)
        elif self.chat and token == self.end_think_id:
            self.current = "content"
        elif self._shown(token):
            touched = self._field(self.current)
        if self.logprobs is not None and logprob is not None:
            f = self.fields.get(self.current)
            self.lp_offsets.append(0 if f is None else f.n_released + len(f.held))
            self.lp_tokens.append(self.token_text(token))
            self.lp_values.append(logprob.logprob)
            top: dict[str, float] = {}
            for t, v in logprob.top:  # highest first: tokens that read alike (hidden specials, split UTF-8) keep the best
                top.setdefault(self.token_text(t), v)
            self.lp_top.append(top)
        out: dict[str, str] = {}
        if touched is not None:
            delta, hit = self._push(touched, touched.decoder.step(token))
            if delta:
                out[self.current] = delta
            if hit:
                finish = "stop"
        if finish is not None:
            self.finish_reason = finish
            for name, f in self.fields.items():
                delta, _ = self._push(f, f.decoder.flush(), final=True)
                if delta:
                    out[name] = out.get(name, "") + delta
        return out

    @staticmethod
    def _push(f: _Field, chunk: str, final: bool = False) -> tuple[str, bool]:
        """Add decoded text to a field; returns (text to send now, whether a stop string ended it)."""
        if f.final:
            return "", False
        start = f.matcher.feed(chunk) if chunk else None
        window = f.held + chunk
        if start is not None:
            cut = len(f.held) + start
            delta, f.held, f.final = window[:cut], "", True
            hit = True
        else:
            keep = 0 if final else min(f.matcher.hold, len(window))
            delta, f.held = window[:len(window) - keep], window[len(window) - keep:]
            f.final, hit = final, False
        if delta:
            f.released.append(delta)
            f.n_released += len(delta)
        return delta, hit

    def text(self, name: str) -> str | None:
        """The whole text of a field (None if the model never opened it)."""
        f = self.fields.get(name)
        return None if f is None else f.text()

    def logprobs_body(self) -> dict | None:
        """OpenAI's `logprobs` object of a plain completion (tokens, token_logprobs, top_logprobs, text_offset)."""
        if self.logprobs is None:
            return None
        return {"tokens": self.lp_tokens, "token_logprobs": self.lp_values,
                "top_logprobs": self.lp_top if self.logprobs > 0 else None, "text_offset": self.lp_offsets}
