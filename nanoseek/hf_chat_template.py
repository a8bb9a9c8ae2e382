"""Chat templates from the Hub rendered as transformers 5 renders them, inside time and size bounds.

`ChatTemplate(source).render(**variables)` reproduces the Jinja rendering of
`transformers.PreTrainedTokenizerBase.apply_chat_template`: the same environment (`ImmutableSandboxedEnvironment`,
trim_blocks, lstrip_blocks, loopcontrols; `raise_exception`, `strftime_now`, `tojson` without HTML escaping,
`dict`, an underscore-refusing `namespace`; `{% generation %}` blocks render their body, and `render_spans`
also returns where each body landed in the output, as transformers' AssistantTracker does for
`return_assistant_tokens_mask`). nanoseek.hf_tokenizer supplies the variables (messages, special tokens,
add_generation_prompt).

Bounds (templates are untrusted code from the Hub): the sandbox refuses Python internals (`__class__`, ...);
a render is stopped after `RENDER_SECONDS` of wall time (a trace function on the template's own frames checks
the deadline on every line it runs, so a loop that prints nothing is stopped too) and once its output passes
`MAX_RENDER_CHARS`; the operators `* ** + %`, string concatenation `~`, every filter and every method call
refuse to build a string or list over that size (checked before the allocation where the size is knowable).
Every failure is one TemplateError (a ConfigError) line.
"""
from __future__ import annotations

import json
import re
import sys
import threading
import time
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from nanoseek.config import ConfigError

MAX_RENDER_CHARS = 1_000_000
RENDER_SECONDS = 2.0
_TEMPLATE_FILE = "<template>"  # the filename jinja compiles `from_string` templates under
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*[-+]?%\}")


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


def _environment(tracker: threading.local):
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
        """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask tag) renders its body; under
        `ChatTemplate.render_spans` it also records the body's character span in the output."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            body = caller()
            spans = getattr(tracker, "spans", None)
            if spans is not None:  # render_spans: the body's place in the output (as transformers' tracker)
                spans.append((tracker.pos, tracker.pos + len(body)))
            return body

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
        self.has_generation = bool(_GENERATION_TAG.search(source))
        self._tracker = threading.local()
        try:
            self.template = _environment(self._tracker).from_string(source)
        except jinja2.exceptions.TemplateError as e:
            raise TemplateError(f"chat template does not compile: {_first_line(e)}") from None
        self.template.root_render_func.__globals__["str_join"] = _str_join  # `~` concatenation, bounded

    def render_spans(self, **variables: Any) -> tuple[str, list[tuple[int, int]]]:
        """(text, [(start, end) character span of each `{% generation %}` body]), as transformers'
        AssistantTracker finds them: a body's start is the length of the output yielded before it runs."""
        self._tracker.spans = []
        try:
            return self.render(**variables), self._tracker.spans
        finally:
            self._tracker.spans = None

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
        self._tracker.pos = 0
        previous = sys.gettrace()
        sys.settrace(tracer)
        try:
            for chunk in self.template.generate(**variables):
                n += len(chunk)
                if n > MAX_RENDER_CHARS:
                    raise _Budget(f"renders more than {MAX_RENDER_CHARS:,} characters")
                chunks.append(chunk)
                self._tracker.pos = n
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
