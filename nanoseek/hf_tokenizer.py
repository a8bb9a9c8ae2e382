"""An imported checkpoint's own tokenizer and chat template, behind the same calls as nanoseek.tokenizer.Tokenizer.

A transformers checkpoint directory (or an imported run, which keeps the same files) holds `tokenizer.json` (the
`tokenizers` model: pre-tokenizer, BPE, added tokens, decoder), `tokenizer_config.json` (which added tokens are
bos / eos / pad / unk, `added_tokens_decoder`, and usually `chat_template`), optionally `chat_template.jinja` (the
template as its own file, transformers >= 4.43) and `generation_config.json` (eos ids, default temperature / top-p).
`ImportedTokenizer` reads them and answers nanoseek.tokenizer.ChatTokenizer's calls (encode / decode / special
ids / `prompt_ids` / `document_ids` / `chat_ids` / `chat_document` / `completion_text`) like nanoseek's own
tokenizer; `load_tokenizer(run_dir)` returns whichever kind a run has (an imported run is recognised by its
`tokenizer_config.json`), and `copy_tokenizer_files` carries the files into every run made from it.

Chat rendering reproduces `transformers.PreTrainedTokenizerBase.apply_chat_template(..., tokenize=True)` as of
transformers 5 (the Jinja side, sandboxed and bounded, is nanoseek.hf_chat_template): the same variables
(`messages` with None-valued keys dropped and `reasoning_content` / `thinking` aliased, `tools=None`,
`documents=None`, `add_generation_prompt`, and every named special token: `bos_token`, `eos_token`, `unk_token`,
`pad_token`, ...), and the rendered text encoded with `add_special_tokens=False`. Simplifications: no tools /
documents / `continue_final_message` / control-token sanitizing. The template is compiled and test-rendered when
the tokenizer loads, so an import refuses a broken template before any weight is read.

Training conversations (`chat_document`, what `sft` trains on): a template with `{% generation %}` blocks marks
the assistant tokens itself (a token is trained iff its characters overlap a block's output, as transformers'
`return_assistant_tokens_mask`). Any other template's assistant tokens are found by rendering prefixes: for assistant
turn i, `before` = chat_ids(messages[:i], add_generation_prompt=True) (the prompt the model continues at
inference) and `through` = chat_ids(messages[:i + 1]); the turn's trained tokens are through[len(before):] (its
content and whatever the template closes the turn with, e.g. the eos). Two properties are required, token for
token, and a template that breaks either is refused in one line: `before` is a prefix of `through` (the turn
renders as the generation prompt followed by the reply: DeepSeek-R1's template breaks it, its generation prompt
opens `<think>` while a rendered turn drops the reasoning) and `through` is a prefix of the whole conversation's
tokens (later messages do not change how an earlier turn renders). So the context of every trained turn is
exactly the token sequence the template gives at inference.

Stop tokens: the tokenizer's eos plus every `eos_token_id` of generation_config.json (what vLLM stops on).
`vocab_size` is the highest token id + 1; a checkpoint whose embedding has more rows pads it: the engine never
samples those rows and every trainer takes its log-probs over the first `sample_vocab` logits only.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer

from nanoseek.config import ConfigError
from nanoseek.hf_chat_template import MAX_RENDER_CHARS, RENDER_SECONDS, ChatTemplate, TemplateError, _first_line
from nanoseek.tokenizer import TokenizerOps

__all__ = ["ChatTemplate", "ImportedTokenizer", "MAX_RENDER_CHARS", "RENDER_SECONDS", "TemplateError",
           "copy_tokenizer_files", "is_imported", "load_tokenizer"]

SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
THINK_TAGS = ("<think>", "</think>")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json", "special_tokens_map.json")


# ---- reading the files ----------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path} is not readable JSON: {_first_line(e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return data


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict with `content`."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def read_chat_template(directory: Path, tok_config: dict) -> str | None:
    """chat_template.jinja, else chat_template.json's, else tokenizer_config.json's `chat_template` (a string or
    a list of named templates, of which "default" is used), as transformers resolves it."""
    jinja_file, json_file = directory / "chat_template.jinja", directory / "chat_template.json"
    if jinja_file.is_file():
        try:
            return jinja_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{jinja_file} is not readable text: {_first_line(e)}") from None
    template = _read_json(json_file).get("chat_template") if json_file.is_file() else tok_config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
        if template is None:
            raise ConfigError(f"{directory}: chat_template lists {sorted(map(str, named))} but no 'default'")
    if template is not None and not isinstance(template, str):
        raise ConfigError(f"{directory}: chat_template must be a string, got {type(template).__name__}")
    return template


def _eos_list(value: Any, where: str) -> list[int]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ConfigError(f"{where}: eos_token_id must be a non-negative int or a list of them, got {value!r}")
    return list(values)


# ---- the tokenizer ----------------------------------------------------------------------------------------
class ImportedTokenizer(TokenizerOps):
    """A transformers checkpoint's tokenizer answering nanoseek.tokenizer.Tokenizer's calls."""

    imported = True

    def __init__(self, tok: HFTokenizer, special: dict[str, str], chat_template: str | None,
                 generation: dict | None = None, source: str = ""):
        self._tok = tok
        vocab = tok.get_vocab(with_added_tokens=True)
        self._vocab_size = max(vocab.values()) + 1 if vocab else 0
        self.source = source
        self.special_tokens = dict(special)  # bos_token / eos_token / ... -> text
        self.generation = dict(generation or {})
        ids = {name: self._id(text, name) for name, text in self.special_tokens.items()}
        self.bos_id: int | None = ids.get("bos_token")
        eos = _eos_list(self.generation.get("eos_token_id"), "generation_config.json")
        self.eos_id: int | None = ids.get("eos_token", eos[0] if eos else None)
        if self.eos_id is None:
            raise ConfigError(f"{source}: the tokenizer has no eos_token and generation_config.json no eos_token_id")
        self.stop_ids: frozenset[int] = frozenset([self.eos_id, *eos])
        self.pad_id: int = ids.get("pad_token", self.eos_id)
        for i in self.stop_ids:
            if i >= self.vocab_size:
                raise ConfigError(f"{source}: eos_token_id {i} is outside the vocabulary ({self.vocab_size} tokens)")
        added = tok.get_added_tokens_decoder()
        think = [tok.token_to_id(t) for t in THINK_TAGS]
        self.think_ids: tuple[int, int] | None = (think[0], think[1]) if None not in think else None
        # control tokens: special added tokens (never shown in text), the think tags excepted
        self.control_ids: frozenset[int] = frozenset(
            i for i, t in added.items() if t.special and t.content not in THINK_TAGS) | {self.eos_id}
        self.chat_template = chat_template
        self._template = ChatTemplate(chat_template) if chat_template is not None else None
        if self._template is not None:
            self._check_template()

    def _id(self, text: str, name: str) -> int:
        i = self._tok.token_to_id(text)
        if i is None:
            raise ConfigError(f"{self.source}: {name} {text!r} is not in the vocabulary of tokenizer.json")
        return i

    # ---- construction ------------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, directory: str | Path, generation: dict | None = None) -> ImportedTokenizer:
        """Read tokenizer.json, tokenizer_config.json, the chat template and generation_config.json (or use
        `generation` in its place)."""
        directory = Path(directory)
        file = directory / "tokenizer.json"
        if not file.is_file():
            raise ConfigError(f"{directory} has no tokenizer.json (only fast tokenizers are supported; convert a "
                              "slow one with transformers' AutoTokenizer.from_pretrained(...).save_pretrained(...))")
        try:
            tok = HFTokenizer.from_file(str(file))
        except Exception as e:  # noqa: BLE001 -- tokenizers raises a bare Exception on a bad file
            raise ConfigError(f"{file} is not a readable tokenizers file: {_first_line(e)}") from None
        cfg_file = directory / "tokenizer_config.json"
        tok_config = _read_json(cfg_file) if cfg_file.is_file() else {}
        side = directory / "special_tokens_map.json"
        side_map = _read_json(side) if side.is_file() else {}
        _add_declared_tokens(tok, tok_config, file)
        special = {}
        for name in SPECIAL_NAMES:
            text = _token_text(tok_config.get(name)) or _token_text(side_map.get(name))
            if text is not None:
                special[name] = text
        gen_file = directory / "generation_config.json"
        if generation is None:
            generation = _read_json(gen_file) if gen_file.is_file() else {}
        return cls(tok, special, read_chat_template(directory, tok_config), generation, str(directory))

    def _check_template(self) -> None:
        """Render a small conversation once, so a template that raises, loops or escapes fails at load."""
        probe = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hi"},
                 {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}]
        try:
            self.render_chat(probe, add_generation_prompt=True)
        except TemplateError as e:
            if "raised:" not in str(e):
                raise
            self.render_chat(probe[1:], add_generation_prompt=True)  # templates without a system role

    # ---- the interface nanoseek's Tokenizer has -------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Highest token id + 1 (added tokens included)."""
        return self._vocab_size

    @property
    def sample_vocab(self) -> int:
        """Token ids the engine may sample: [0, vocab_size); embedding rows beyond are padding."""
        return self.vocab_size


    def token_strings(self, ids: Iterable[int]) -> list[str]:
        return [self.decode([i]) for i in ids]

    # ---- chat ----------------------------------------------------------------------------------------
    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The template's text for `messages` (what apply_chat_template(..., tokenize=False) returns)."""
        if self._template is None:
            raise ConfigError(f"{self.source or 'this tokenizer'} has no chat_template: chat needs one (use a "
                              "plain completion, or add chat_template.jinja to the run directory)")
        return self._template.render(**self._variables(messages, add_generation_prompt))

    def _variables(self, messages: list[dict], add_generation_prompt: bool) -> dict:
        """What apply_chat_template passes the template."""
        chat = []
        for m in messages:
            if not isinstance(m, dict):
                raise ConfigError(f"chat messages must be dicts, got {type(m).__name__}")
            m = {k: v for k, v in m.items() if v is not None}
            reasoning = next((m[k] for k in ("reasoning_content", "thinking", "reasoning") if m.get(k) is not None),
                             None)
            if reasoning is not None:
                m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
            chat.append(m)
        return dict(messages=chat, tools=None, documents=None, add_generation_prompt=add_generation_prompt,
                    **self.special_tokens)

    def chat_ids(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """apply_chat_template(messages, add_generation_prompt, tokenize=True), token for token."""
        return self.encode(self.render_chat(messages, add_generation_prompt))

    def chat_document(self, messages: list[dict], add_generation_prompt: bool = False
                      ) -> tuple[list[int], list[bool]]:
        """A training conversation: (ids, mask), ids == chat_ids(messages, add_generation_prompt) and mask True on
        the tokens of every assistant turn: those the template's `{% generation %}` blocks mark, else found by
        rendering prefixes (module docstring); ConfigError (one line) when the template breaks the prefix
        property."""
        chat = [_plain_message(m, i) for i, m in enumerate(messages)]
        if self._template is not None and self._template.has_generation:
            return self._generation_document(chat, add_generation_prompt)
        ids = self.chat_ids(chat, add_generation_prompt)
        mask = [False] * len(ids)
        for i, m in enumerate(chat):
            if m["role"] != "assistant":
                continue
            before = self.chat_ids(chat[:i], add_generation_prompt=True)
            through = self.chat_ids(chat[:i + 1], add_generation_prompt=False)
            if through[:len(before)] != before:
                raise ConfigError(f"the chat template does not render assistant message {i} as its generation "
                                  f"prompt followed by the reply (the prompt continues "
                                  f"{self._divergence(before, through, 'the rendered turn')}), so a "
                                  "conversation cannot be trained token for token as it is prompted; give "
                                  '{"prompt", "completion"} rows instead (the completion continues the generation '
                                  "prompt)")
            if ids[:len(through)] != through:
                where = self._divergence(through, ids, "in the conversation")
                raise ConfigError(f"the chat template renders assistant message {i} differently once later "
                                  f"messages follow (alone it continues {where}), so its tokens cannot be found in "
                                  'the conversation; give {"prompt", "completion"} rows instead')
            mask[len(before):len(through)] = [True] * (len(through) - len(before))
        return ids, mask

    def _generation_document(self, chat: list[dict], add_generation_prompt: bool) -> tuple[list[int], list[bool]]:
        """A template with `{% generation %}` marks its assistant spans itself: a token is trained iff its
        characters overlap a marked span (transformers' return_assistant_tokens_mask)."""
        text, spans = self._template.render_spans(**self._variables(chat, add_generation_prompt))
        enc = self._tok.encode(text, add_special_tokens=False)
        mask = [any(s < b and a < e for a, b in spans) for s, e in enc.offsets]
        return list(enc.ids), mask

    def _divergence(self, a: list[int], b: list[int], other: str) -> str:
        """Where two token lists part: "'text of a' where <other> continues 'text of b'"."""
        k = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        return f"{self.decode(a[k:k + 8])!r} where {other} continues {self.decode(b[k:k + 8])!r}"

    def completion_text(self, prompt: list[int], text: str) -> str:
        """A reply as a reward parser reads it: when `prompt` ends inside a think block (R1's generation prompt
        opens `<think>`), the prompt's text from that `<think>` on is put back in front of `text`, so
        `<think>...</think><answer>...</answer>` is seen whole."""
        if not self.opens_thinking(prompt):
            return text
        start = max(i for i, t in enumerate(prompt) if t == self.think_ids[0])
        return self.decode(prompt[start:]) + text

    def prompt_ids(self, user_text: str) -> list[int]:
        """One user message through the chat template; without a template, the text itself after bos."""
        if self._template is None:
            return self.encode(user_text, bos=True)
        return self.chat_ids([{"role": "user", "content": user_text}])

    def document_ids(self, user_text: str, completion: str) -> list[int]:
        return self.prompt_ids(user_text) + self.encode(completion) + [self.eos_id]

    def opens_thinking(self, prompt: list[int]) -> bool:
        """Whether the prompt ends inside a think block (DeepSeek-R1's generation prompt opens `<think>`)."""
        if self.think_ids is None:
            return False
        start, end = self.think_ids
        for t in reversed(prompt):
            if t in (start, end):
                return t == start
        return False


def _plain_message(message: object, index: int) -> dict:
    """A message with its content as one string (OpenAI text parts joined); role checked as nanoseek's own
    template checks it, the message's other keys (reasoning_content, ...) kept for the template."""
    from nanoseek.tokenizer import message_role_content

    _, content = message_role_content(message, index)
    return {**message, "content": content}


def _add_declared_tokens(tok: HFTokenizer, tok_config: dict, file: Path) -> None:
    """tokenizer_config.json's `added_tokens_decoder` entries missing from tokenizer.json are added (as
    transformers does); one that exists under another id, or lands on another id, is an error."""
    decl = tok_config.get("added_tokens_decoder") or {}
    if not isinstance(decl, dict):
        raise ConfigError(f"{file.parent}/tokenizer_config.json: added_tokens_decoder must be an object")
    for key, entry in sorted(decl.items(), key=lambda kv: int(kv[0]) if str(kv[0]).isdigit() else -1):
        content = _token_text(entry)
        if not str(key).isdigit() or content is None:
            raise ConfigError(f"{file.parent}/tokenizer_config.json: bad added_tokens_decoder entry {key!r}")
        have = tok.token_to_id(content)
        if have is None:
            special = bool(entry.get("special", False)) if isinstance(entry, dict) else False
            token = AddedToken(content, special=special, normalized=not special)
            (tok.add_special_tokens if special else tok.add_tokens)([token])
            have = tok.token_to_id(content)
        if have != int(key):
            raise ConfigError(f"{file.parent}: added token {content!r} has id {have} in tokenizer.json but "
                              f"{key} in tokenizer_config.json")


def is_imported(run_dir: str | Path) -> bool:
    path = Path(run_dir)
    return (path.parent if path.suffix == ".json" else path).joinpath("tokenizer_config.json").is_file()


def load_tokenizer(run_dir: str | Path):
    """The tokenizer of a run directory (or of the folder of a tokenizer.json path): an ImportedTokenizer when
    the run was imported (it holds tokenizer_config.json), else nanoseek's own Tokenizer."""
    from nanoseek.tokenizer import Tokenizer

    path = Path(run_dir)
    folder = path.parent if path.suffix == ".json" else path
    if is_imported(folder):
        return ImportedTokenizer.from_dir(folder)
    return Tokenizer.load(path if path.suffix == ".json" else folder / "tokenizer.json")


def copy_tokenizer_files(src_run: str | Path, out: str | Path) -> list[str]:
    """Copy a run's tokenizer files (tokenizer.json, and for an imported run tokenizer_config.json, the chat
    template, generation_config.json, special_tokens_map.json) into `out`, atomically each: a run made from an
    imported one is itself self-contained. Returns the names copied."""
    from nanoseek.io import atomic_write

    src = Path(src_run)
    src = src.parent if src.suffix == ".json" else src
    names = [n for n in TOKENIZER_FILES if (src / n).is_file()]
    if "tokenizer.json" not in names:
        raise ConfigError(f"{src} holds no tokenizer.json")
    Path(out).mkdir(parents=True, exist_ok=True)
    for name in names:
        atomic_write(Path(out) / name, lambda tmp, n=name: shutil.copyfile(src / n, tmp))
    return names
