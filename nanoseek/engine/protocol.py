"""The OpenAI wire format as nanoseek speaks it: request schemas, the error shape, the chat template, and the
token-stream -> text-delta splitter that routes thinking to `reasoning_content` (as DeepSeek's API does).

Chat template (the one pretraining documents use): `<|bos|>`, then each message as its role token
(`<|system|>`, `<|user|>`, `<|assistant|>`) followed by its text, then a final `<|assistant|>` for the model to
continue. A developer message counts as system. For one user message this is exactly
`Tokenizer.prompt_ids(text)`. Previous assistant turns are sent back as their `content` only: clients drop
`reasoning_content` from the history, as DeepSeek's API asks them to.

The model answers `<think>R</think><answer>A</answer><|eos|>`. In a chat completion every token between
`<think>` and `</think>` is reasoning, every other token is content, and special tokens are never shown, so
`reasoning_content` = R and `content` = A (plus any text the model writes outside the tags). A plain
completion returns the raw text with the tags (only the final eos is cut).

Stop strings apply to the text of each field separately; the text is cut before the first match. Text that
could still grow into a stop string, or that ends in an unfinished UTF-8 sequence, is held back until it
cannot. Simplification: a field's text is re-decoded from its tokens at each step (fine at this scale).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

ROLE_TOKENS = {"system": "<|system|>", "developer": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}


# ---- errors ---------------------------------------------------------------------------------------------
class APIError(Exception):
    """An error the client caused (or a server fault), rendered in OpenAI's error shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

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
        if stops is not None and (len(stops) > 4 or any(not s for s in stops)):
            raise ValueError("stop must be at most 4 non-empty strings")
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
    ids = [tokenizer.bos_id]
    for m in messages:
        ids.append(tokenizer.id_of(ROLE_TOKENS[m.role]))
        ids.extend(tokenizer.encode(m.text()))
    ids.append(tokenizer.id_of("<|assistant|>"))
    return ids


# ---- tokens -> text deltas -----------------------------------------------------------------------------
@dataclass
class _Field:
    tokens: list[int] = field(default_factory=list)
    sent: int = 0  # characters already released
    final: str | None = None  # the text once cut at a stop string


class ChoiceStream:
    """Turns one choice's generated tokens into text deltas per field ("content" / "reasoning_content" in
    chat mode, "text" for plain completions), applying stop strings. Not thread-safe: one consumer."""

    def __init__(self, tokenizer, chat: bool, stop: list[str] | None = None):
        self.tok = tokenizer
        self.chat = chat
        self.stop = list(stop or [])
        self.fields: dict[str, _Field] = {}
        self.current = "content" if chat else "text"
        self.finish_reason: str | None = None
        self.n_tokens = 0
        self.think_id, self.end_think_id = tokenizer.id_of("<think>"), tokenizer.id_of("</think>")
        self.special_ids = {tokenizer.id_of(t) for t in ("<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>",
                                                           "<|assistant|>", "<answer>", "</answer>")}
        self.eos_id = tokenizer.eos_id

    def feed(self, token: int, finish: str | None = None) -> dict[str, str]:
        """Add one generated token (`finish` set on the last one); returns the text now safe to send."""
        if self.finish_reason is not None:
            return {}
        self.n_tokens += 1
        touched = None
        if self.chat and token == self.think_id:
            self.current = "reasoning_content"
            self.fields.setdefault(self.current, _Field())
        elif self.chat and token == self.end_think_id:
            self.current = "content"
        elif token == self.eos_id or (self.chat and token in self.special_ids):
            pass
        else:
            touched = self.fields.setdefault(self.current, _Field())
            touched.tokens.append(token)
        out: dict[str, str] = {}
        if touched is not None:
            name = self.current
            delta, hit = self._release(touched, final=False)
            if delta:
                out[name] = delta
            if hit:
                finish = "stop"
        if finish is not None:
            self.finish_reason = finish
            for name, f in self.fields.items():
                delta, _ = self._release(f, final=True)
                if delta:
                    out[name] = out.get(name, "") + delta
        return out

    def _release(self, f: _Field, final: bool) -> tuple[str, bool]:
        if f.final is not None:
            return "", False
        text = self.tok.decode(f.tokens)
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            f.final = text[:min(hits)]
            delta = f.final[f.sent:]
            f.sent = len(f.final)
            return delta, True
        end = len(text)
        if not final:
            while end > f.sent and text[end - 1] == "\ufffd":  # an unfinished multi-byte character
                end -= 1
            hold = max((k for s in self.stop for k in range(1, len(s)) if text[:end].endswith(s[:k])), default=0)
            end -= hold
        end = max(end, f.sent)
        delta = text[f.sent:end]
        f.sent = end
        if final:
            f.final = text
        return delta, False

    def text(self, name: str) -> str | None:
        """The whole text of a field after the choice finished (None if the model never opened it)."""
        f = self.fields.get(name)
        if f is None:
            return None
        return f.final if f.final is not None else self.tok.decode(f.tokens)
