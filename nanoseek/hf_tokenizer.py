"""An imported checkpoint's own tokenizer and chat template, behind the same calls as nanoseek.tokenizer.Tokenizer.

A transformers checkpoint directory (or an imported run, which keeps the same files) holds `tokenizer.json` (the
`tokenizers` model: pre-tokenizer, BPE, added tokens, decoder), `tokenizer_config.json` (which added tokens are
bos / eos / pad / unk, `added_tokens_decoder`, and usually `chat_template`), optionally `chat_template.jinja` (the
template as its own file, transformers >= 4.43) and `generation_config.json` (eos ids, default temperature / top-p).
`ImportedTokenizer` reads them and answers encode / decode / special ids / `prompt_ids` / `document_ids` like
nanoseek's own tokenizer, plus `chat_ids(messages, add_generation_prompt)`; `load_tokenizer(run_dir)` returns
whichever kind a run has (an imported run is recognised by its `tokenizer_config.json`).

Chat rendering reproduces `transformers.PreTrainedTokenizerBase.apply_chat_template(..., tokenize=True)` as of
transformers 5: the same Jinja environment (`ImmutableSandboxedEnvironment`, trim_blocks, lstrip_blocks,
loopcontrols; `raise_exception`, `strftime_now`, `tojson` without HTML escaping, `dict`, an underscore-refusing
`namespace`), the same variables (`messages` with None-valued keys dropped and `reasoning_content` / `thinking`
aliased, `tools=None`, `documents=None`, `add_generation_prompt`, and every named special token: `bos_token`,
`eos_token`, `unk_token`, `pad_token`, ...), and the rendered text encoded with `add_special_tokens=False`.
Simplifications: no tools / documents / `continue_final_message` / assistant masks / control-token sanitizing
(`{% generation %}` blocks render their body, as transformers does without assistant masks).

Bounds (templates are untrusted code from the Hub): the sandbox refuses Python internals (`__class__`, ...);
a render is stopped after `RENDER_SECONDS` of wall time (a trace function on the template's own frames checks
the deadline on every line it runs, so a loop that prints nothing is stopped too) and once its output passes
`MAX_RENDER_CHARS`; the operators `* ** + %`, string concatenation `~`, every filter and every method call
refuse to build a string or list over that size (checked before the allocation where the size is knowable).
Every failure is one ConfigError line. The template is compiled and test-rendered when the tokenizer loads,
so an import refuses a broken template before any weight is read.

Stop tokens: the tokenizer's eos plus every `eos_token_id` of generation_config.json (what vLLM stops on).
`vocab_size` is the highest token id + 1; a checkpoint whose embedding has more rows pads it, and the engine
never samples those rows (`sample_vocab`).
"""
from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer

from nanoseek.config import ConfigError

MAX_RENDER_CHARS = 1_000_000
RENDER_SECONDS = 2.0
SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
THINK_TAGS = ("<think>", "</think>")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json", "special_tokens_map.json")
_TEMPLATE_FILE = "<template>"  # the filename jinja compiles `from_string` templates under


# ---- the bounded Jinja environment ------------------------------------------------------------------------
class TemplateError(ConfigError):
    """A chat template that fails to compile, raises, runs too long, grows too big or breaks the sandbox."""


class _Budget(Exception):
    """Raised inside a render that passed its time or size budget."""


def _size(x: Any) -> int:
    return len(x) if isinstance(x, (str, bytes, list, tuple, dict)) else 0


def _check_size(x: Any) -> Any:
    if _size(x) > MAX_RENDER_CHARS:
        raise _Budget(f"builds a value of {_size(x):,} items (limit {MAX_RENDER_CHARS:,})")
    return x


def _check_args(args: Iterable[Any]) -> None:
    """An integer argument over the size limit would let one call allocate without bound ('x'|center(10**9))."""
    for a in args:
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > MAX_RENDER_CHARS:
            raise _Budget(f"passes {a} to a function (limit {MAX_RENDER_CHARS:,})")


# a width or precision of 7+ digits inside a %-conversion or a {...:spec} field
_BIG_WIDTH = re.compile(r"%[-#0 +]*(?:\d{7,}|\d*\.\d{7,})|\{[^{}]*:[^{}]*\d{7,}[^{}]*\}")


def _check_format(fmt: Any) -> None:
    """A format string whose width or precision has 7+ digits ('%0999999999d', '{:>999999999}') would allocate
    without bound in one C call."""
    if isinstance(fmt, str) and _BIG_WIDTH.search(fmt):
        raise _Budget("formats with a width or precision over the size limit")


def _predict_method(obj: Any, args: tuple, kwargs: dict) -> None:
    """Size of str.join / str.replace results, known before they run; str.format widths."""
    obj = getattr(obj, "__wrapped__", obj)  # the sandbox wraps str.format in its own formatter
    owner, name = getattr(obj, "__self__", None), getattr(obj, "__name__", "")
    if isinstance(owner, str) and name in ("format", "format_map"):
        _check_format(owner)
    if isinstance(owner, str) and name == "join" and args and isinstance(args[0], (list, tuple)):
        items = args[0]
        total = len(owner) * max(len(items) - 1, 0) + sum(_size(i) for i in items)
        if total > MAX_RENDER_CHARS:
            _raise_size(total)
    if isinstance(owner, str) and name == "replace" and len(args) >= 2 and all(isinstance(a, str) for a in args[:2]):
        n = owner.count(args[0]) if args[0] else len(owner) + 1
        total = len(owner) + n * (len(args[1]) - len(args[0]))
        if total > MAX_RENDER_CHARS:
            _raise_size(total)


def _raise_size(total: int) -> None:
    raise _Budget(f"builds a value of {total:,} items (limit {MAX_RENDER_CHARS:,})")


def _binop_size(op: str, left: Any, right: Any) -> None:
    if op == "*":
        seq, n = (left, right) if isinstance(right, int) else (right, left)
        if isinstance(n, int) and _size(seq) * max(n, 0) > MAX_RENDER_CHARS:
            _raise_size(_size(seq) * n)
    elif op == "**" and isinstance(right, int) and isinstance(left, int) and abs(left) > 1 and right > 4096:
        raise _Budget(f"computes {left} ** {right}")
    elif op == "+" and _size(left) + _size(right) > MAX_RENDER_CHARS:
        _raise_size(_size(left) + _size(right))
    elif op == "%" and isinstance(left, str):
        _check_format(left)


def _environment():
    import jinja2
    import jinja2.ext
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Bounded(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "+", "%"})

        def call_binop(self, context, operator, left, right):
            _binop_size(operator, left, right)
            return _check_size(super().call_binop(context, operator, left, right))

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 -- jinja's signature
            _check_args(args)
            _check_args(kwargs.values())
            _predict_method(__obj, args, kwargs)
            return _check_size(super().call(__context, __obj, *args, **kwargs))

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    class TemplateDict:  # as transformers: dict() without dict's attributes
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):  # noqa: N805 -- Namespace's signature trick
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with an underscore")

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask tag) renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    env = Bounded(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, Generation])
    env.filters["tojson"] = tojson

    def bounded(name, f):
        skip = 2 if hasattr(f, "jinja_pass_arg") else 1  # (context,) value: what is filtered, not a size

        def wrapper(*args, **kwargs):
            _check_args(args[skip:])
            _check_args(kwargs.values())
            if name == "format" and args[skip - 1:skip]:
                _check_format(args[skip - 1])
            return _check_size(f(*args, **kwargs))
        for attr in ("jinja_pass_arg",):  # keep pass_context / pass_eval_context markers
            if hasattr(f, attr):
                setattr(wrapper, attr, getattr(f, attr))
        return wrapper

    env.filters = {name: bounded(name, f) for name, f in env.filters.items()}
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, dict=TemplateDict(),
                       namespace=TemplateNamespace)
    return env


def _str_join(seq) -> str:
    parts = [str(x) for x in seq]
    if sum(len(p) for p in parts) > MAX_RENDER_CHARS:
        _raise_size(sum(len(p) for p in parts))
    return "".join(parts)


class ChatTemplate:
    """A compiled chat template rendered within a time and size budget."""

    def __init__(self, source: str):
        import jinja2

        if len(source) > MAX_RENDER_CHARS:
            raise TemplateError(f"chat template is {len(source):,} characters (limit {MAX_RENDER_CHARS:,})")
        self.source = source
        try:
            self.template = _environment().from_string(source)
        except jinja2.exceptions.TemplateError as e:
            raise TemplateError(f"chat template does not compile: {_first_line(e)}") from None
        self.template.root_render_func.__globals__["str_join"] = _str_join  # `~` concatenation, bounded

    def render(self, seconds: float | None = None, **variables: Any) -> str:
        """The template's text for these variables; TemplateError (one line) on any failure."""
        import jinja2

        deadline = time.monotonic() + (RENDER_SECONDS if seconds is None else seconds)

        def local(frame, event, arg):
            if time.monotonic() > deadline:
                raise _Budget(f"ran longer than {RENDER_SECONDS if seconds is None else seconds:g} s")
            return local

        def tracer(frame, event, arg):
            return local(frame, event, arg) if frame.f_code.co_filename == _TEMPLATE_FILE else None

        chunks, n = [], 0
        previous = sys.gettrace()
        sys.settrace(tracer)
        try:
            for chunk in self.template.generate(**variables):
                n += len(chunk)
                if n > MAX_RENDER_CHARS:
                    raise _Budget(f"renders more than {MAX_RENDER_CHARS:,} characters")
                chunks.append(chunk)
        except _Budget as e:
            raise TemplateError(f"chat template stopped: it {e}") from None
        except jinja2.exceptions.SecurityError as e:
            raise TemplateError(f"chat template refused by the sandbox: {_first_line(e)}") from None
        except jinja2.exceptions.TemplateError as e:
            raise TemplateError(f"chat template raised: {_first_line(e)}") from None
        except (RecursionError, MemoryError) as e:
            raise TemplateError(f"chat template failed: {type(e).__name__}") from None
        except Exception as e:  # noqa: BLE001 -- a template can raise anything its operations raise
            raise TemplateError(f"chat template failed: {type(e).__name__}: {_first_line(e)}") from None
        finally:
            sys.settrace(previous)
        return "".join(chunks)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


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
class ImportedTokenizer:
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

    def token_strings(self, ids: Iterable[int]) -> list[str]:
        return [self.decode([i]) for i in ids]

    # ---- chat ----------------------------------------------------------------------------------------
    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The template's text for `messages` (what apply_chat_template(..., tokenize=False) returns)."""
        if self._template is None:
            raise ConfigError(f"{self.source or 'this tokenizer'} has no chat_template: chat needs one (use a "
                              "plain completion, or add chat_template.jinja to the run directory)")
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
        return self._template.render(messages=chat, tools=None, documents=None,
                                     add_generation_prompt=add_generation_prompt, **self.special_tokens)

    def chat_ids(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """apply_chat_template(messages, add_generation_prompt, tokenize=True), token for token."""
        return self.encode(self.render_chat(messages, add_generation_prompt))

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
