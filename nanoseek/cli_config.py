"""Command-line options generated from config dataclasses: each knob is declared once, on its field.

A field declared with `knob(default, help=...)` is a command-line option of every command that builds a
`ConfigCLI` on its dataclass. The field holds everything about the knob: the default (the dataclass's, shown
in --help), the help text, the flag (`--field-name`, or metadata `flag`, e.g. TrainConfig.warmup_steps is
`--warmup`), choices, a metavar, a unit `scale` (DistillConfig.budget_s is `--minutes`, x60), and the resume
rule: "keep" (a resumed run keeps its stored value; the flag is ignored on --resume, as before) or
"override" (the stored value unless the flag is given). Types come from the annotation (`int | None` -> int);
`list[X]` takes one or more values and may repeat; a bool is a `--flag/--no-flag` pair (argparse.BooleanOptionalAction), so `--compile`, `--no-compile`,
`--dynamic-sampling` and `--no-bias-update` (bias_update defaults to True) all keep working. Nested
dataclass fields (SFTConfig.train: TrainConfig) contribute their knobs with the defaults of the enclosing
default instance (SFT's lr 1e-3, not TrainConfig's 4e-3). A command may `skip` knobs it does not use
(dotted paths, e.g. "train.eval_interval"). Every generated option parses to None when not given, which is
how "stored unless given" and "defaults unless given" are told apart; nothing maps flags back by hand.

Every converted command also gets `--config-file FILE.json` (start from a resolved config: what
`--print-config` prints, or a run's own config.json, whose command section is used; flags given on top
win) and `--print-config` (print the resolved config as JSON and exit). `--config-file`, not `--config`:
`pretrain --config` already means a MODEL config JSON and keeps that meaning.

Why our own ~150 lines on argparse rather than a library (checked against transformers 5.25's
HfArgumentParser, the one already installed):
- HfArgumentParser always adds `--field_name` and `--field-name` (an alias can only add a spelling), so
  `--warmup` would come with `--warmup_steps` / `--warmup-steps`; a bool defaulting to False gets
  `--flag [true|false]` and no `--no-flag` (`--no-compile` would break); a nested dataclass field
  (SFTConfig.train) becomes an option of type TrainConfig; it fills every default in, so "not given" (the
  resume rule) cannot be told from "given the default"; it is an ArgumentParser subclass, not something to
  add to nanoseek's subcommand parsers; and importing transformers costs each CLI call seconds.
- tyro and jsonargparse (not installed) can rename flags and nest, but only through their own annotation
  types on every field (tyro.conf.arg / Annotated), their own bool and None conventions, and a new
  dependency; the resume rule would still be ours. The part they would save is the ~40 lines of `options`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any

from nanoseek.config import ConfigError

RESUME_RULES = ("keep", "override")


@dataclass(frozen=True)
class Knob:
    """What a field's metadata says about its command-line option."""

    help: str
    flag: str | None = None  # default: --field-name
    choices: tuple | None = None
    resume: str = "keep"  # "keep" | "override" (the stored value on --resume unless given)
    metavar: str | None = None
    scale: float | None = None  # field value = flag value * scale (minutes -> seconds)


def knob(default: Any = MISSING, *, help: str, flag: str | None = None, choices: Sequence | None = None,
         resume: str = "keep", metavar: str | None = None, scale: float | None = None,
         default_factory: Any = MISSING) -> Any:
    """A dataclass field that is also a command-line option (see the module docstring)."""
    if resume not in RESUME_RULES:
        raise ValueError(f"resume must be one of {RESUME_RULES}, got {resume!r}")
    meta = Knob(help, flag, tuple(choices) if choices is not None else None, resume, metavar, scale)
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"knob": meta})


@dataclass(frozen=True)
class Option:
    """One generated option: the field's dotted path in the config (its argparse dest), flag and default."""

    path: str
    flag: str
    type: type
    default: Any
    knob: Knob

    def shown_default(self) -> str:
        """The default as --help shows it (in the flag's unit)."""
        value = self.default if self.knob.scale is None else self.default / self.knob.scale
        return "none" if value is None else str(value)


def _base_type(hint: Any) -> Any:
    """`X | None` -> X; anything else unchanged."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def options(cls: type, default: Any = None, skip: Iterable[str] = (), prefix: str = "") -> list[Option]:
    """The options of dataclass `cls` (and of its nested dataclass fields), in field order. `default` is the
    instance whose values are the defaults (a nested field's default instance for nested ones)."""
    default = cls() if default is None else default
    skip = set(skip)
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        path, hint, value = prefix + f.name, _base_type(hints[f.name]), getattr(default, f.name)
        if path in skip:
            continue
        meta = f.metadata.get("knob")
        if meta is not None:
            out.append(Option(path, meta.flag or "--" + f.name.replace("_", "-"), hint, value, meta))
        elif dataclasses.is_dataclass(hint):
            out.extend(options(hint, value, skip, path + "."))
    return out


def _replace(cfg: Any, path: str, value: Any) -> Any:
    """`cfg` with the field at dotted `path` set to `value` (nested dataclasses replaced, not mutated)."""
    head, _, rest = path.partition(".")
    new = _replace(getattr(cfg, head), rest, value) if rest else value
    return dataclasses.replace(cfg, **{head: new})


def to_dict(cfg: Any) -> dict:
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dataclasses.asdict(cfg)


def from_dict(cls: type, d: dict) -> Any:
    """The class's own from_dict when it has one, else field by field (nested dataclasses too)."""
    if hasattr(cls, "from_dict"):
        return cls.from_dict(d)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
    return cls(**{k: from_dict(hints[k], v) if dataclasses.is_dataclass(hints[k]) and isinstance(v, dict) else v
                  for k, v in d.items()})


def read_config(path: str | Path, cls: type, section: str | None = None) -> Any:
    """A `cls` from JSON file `path`: a resolved config, or a run's config.json (then its `section`)."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path} must hold a JSON object (a {cls.__name__})")
    if section is not None and isinstance(d.get(section), dict):
        d = d[section]
    try:
        return from_dict(cls, d)
    except (TypeError, KeyError) as e:
        raise ConfigError(f"{path} is not a {cls.__name__}: {e!r}") from None


def stored_config(run_dir: str | Path, cls: type, section: str) -> Any | None:
    """The config stored in a run directory's config.json, or None when it has none (the trainer then says
    what is missing)."""
    path = Path(run_dir) / "config.json"
    return read_config(path, cls, section) if path.exists() else None


class ConfigCLI:
    """The options of one command's config dataclass: `add_arguments(p)`, then `resolve(args, stored)`."""

    def __init__(self, cls: type, skip: Iterable[str] = (), section: str | None = None):
        self.cls, self.section = cls, section
        self.options = options(cls, skip=skip)

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        for o in self.options:
            k = o.knob
            text = f"{k.help} (default: {o.shown_default()}"
            text += "; on --resume the stored value unless given)" if k.resume == "override" else ")"
            kw: dict[str, Any] = {"dest": o.path, "default": None, "help": text.replace("%", "%%")}
            if o.type is bool:
                kw["action"] = argparse.BooleanOptionalAction
            else:
                kw["type"] = float if k.scale is not None else o.type
                if typing.get_origin(o.type) is list:  # list[X]: --flag A B, repeatable (--flag A --flag B)
                    kw.update(type=typing.get_args(o.type)[0], nargs="+", action="extend")
                kw["metavar"] = k.metavar or o.flag.lstrip("-").replace("-", "_").upper()
                if k.choices is not None:
                    kw["choices"], kw["metavar"] = k.choices, None
            p.add_argument(o.flag, **kw)
        p.add_argument("--config-file", metavar="FILE.json", help="start from this resolved config (as "
                       "--print-config prints it, or a run's config.json); options given on top win")
        p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")

    def given(self, args: argparse.Namespace) -> dict[str, Any]:
        """{dotted path: value in the field's unit} of the options given on the command line."""
        out = {}
        for o in self.options:
            v = getattr(args, o.path, None)
            if v is not None:
                out[o.path] = v * o.knob.scale if o.knob.scale is not None else v
        return out

    def resolve(self, args: argparse.Namespace, stored: Any = None, rebase: Callable[[Any], Any] | None = None) -> Any:
        """The run's config: the dataclass defaults (or --config-file) with the given options on top; on a
        resume (`stored` is the run's config) the stored values, with only the "override" options given.
        `rebase` (a recipe's --smoke) makes a new starting point from that config, and the given options are
        applied again on top of it."""
        file = getattr(args, "config_file", None)
        if stored is not None and file:
            raise ConfigError("--config-file does not combine with --resume (the run's own config.json holds)")
        cfg = stored if stored is not None else read_config(file, self.cls, self.section) if file else self.cls()
        cfg = self.apply(args, cfg, resume=stored is not None)
        return cfg if rebase is None else self.apply(args, rebase(cfg))

    def apply(self, args: argparse.Namespace, cfg: Any, resume: bool = False) -> Any:
        """`cfg` with the given options on top (with `resume`, only the "override" ones)."""
        rules = {o.path: o.knob.resume for o in self.options}
        for path, value in self.given(args).items():
            if not resume or rules[path] == "override":
                cfg = _replace(cfg, path, value)
        return cfg

    @staticmethod
    def print_config(args: argparse.Namespace, cfg: Any) -> bool:
        """With --print-config: print `cfg` as JSON and return True (the command then exits)."""
        if getattr(args, "print_config", False):
            print(json.dumps(to_dict(cfg), indent=2))
            return True
        return False
