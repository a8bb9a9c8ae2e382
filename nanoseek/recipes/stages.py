"""A small stage runner for recipes: named stages, resume by stage, per-stage seconds, `--until STAGE`.

`<root>/stages.json` holds every finished stage's result and duration and the settings the recipe ran with.
A rerun skips finished stages (their result is read back); a rerun with different settings is refused with one
line naming the differing keys, since finished stages would no longer match the new ones (unless the recipe
lists a key as free to change, e.g. a time budget). Interrupting a stage (Ctrl-C) keeps its partial seconds,
so the per-stage time counts every attempt. Written atomically after every stage.

A stages.json of the recipes' earlier stage class (before nanoseek.recipes: `{stage: {"result", "seconds"},
"_<stage>_partial_s": s}` at the top level, no settings) is read as finished stages with no recorded settings:
the run resumes with the settings given now, and the file is rewritten in this layout at the next save.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from nanoseek.config import ConfigError
from nanoseek.io import atomic_write_text

console = Console()


class StopAfter(Exception):
    """Raised after the stage named by `until` finished: the recipe stops there (resumable later)."""


def read_state(path: Path) -> dict:
    """stages.json as {"settings", "done", "partial_s"} ({} when absent), the earlier top-level layout converted."""
    try:
        state = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, json.JSONDecodeError):
        raise ConfigError(f"{path} is corrupt; delete it to start the recipe over") from None
    if not isinstance(state, dict):
        raise ConfigError(f"{path} is corrupt; delete it to start the recipe over")
    done = state.get("done")
    if state and not (isinstance(done, dict) and "result" not in done):  # the earlier layout
        suffix = "_partial_s"
        state = {"done": {k: v for k, v in state.items() if not k.startswith("_")},
                 "partial_s": {k[1:-len(suffix)]: v for k, v in state.items()
                               if k.startswith("_") and k.endswith(suffix)}}
    return state


class StageRunner:
    """`settings=None`: no settings check (the stored ones, if any, are kept)."""

    def __init__(self, root: Path, settings: dict | None, free: tuple[str, ...] = (), until: str | None = None,
                 names: tuple[str, ...] = ()):
        self.path = root / "stages.json"
        self.until = until
        if until is not None and names and until not in names:
            raise ConfigError(f"--until must be one of {', '.join(names)}, got {until!r}")
        self.state: dict = read_state(self.path)
        old = self.state.get("settings")
        if old is not None and settings is not None:
            differ = sorted(k for k in set(old) | set(settings) if k not in free and old.get(k) != settings.get(k))
            if differ:
                raise ConfigError(f"{root} was started with other settings ({', '.join(differ)}); "
                                  "rerun with the same ones or choose another --out")
        if settings is not None:
            self.state["settings"] = settings
        self.state.setdefault("done", {})
        self.state.setdefault("partial_s", {})
        root.mkdir(parents=True, exist_ok=True)
        self._save()

    @property
    def done(self) -> dict:
        return self.state["done"]

    def run(self, name: str, fn: Callable[[], object]):
        if name in self.done:
            console.print(f"[dim]stage {name}: already done, skipped[/dim]")
            result = self.done[name]["result"]
        else:
            console.rule(f"[bold]{name}")
            prior = self.state["partial_s"].get(name, 0.0)
            t0 = time.time()
            try:
                result = fn()
            except BaseException:
                self.state["partial_s"][name] = prior + time.time() - t0
                self._save()
                raise
            self.done[name] = {"result": result, "seconds": round(prior + time.time() - t0, 2)}
            self.state["partial_s"].pop(name, None)
            self._save()
        if name == self.until:
            raise StopAfter(name)
        return result

    def seconds_by_stage(self) -> dict[str, float]:
        return {k: v["seconds"] for k, v in self.done.items()}

    def seconds(self, name: str) -> float:
        """Seconds of finished stage `name` (every attempt counted)."""
        return self.done[name]["seconds"]

    def timing(self) -> dict:
        """The summary's timing fields: seconds_total and seconds_by_stage (rounded to 0.1 s)."""
        seconds = self.seconds_by_stage()
        return {"seconds_total": round(sum(seconds.values()), 1),
                "seconds_by_stage": {k: round(v, 1) for k, v in seconds.items()}}

    def _save(self) -> None:
        atomic_write_text(self.path, json.dumps(self.state, indent=2) + "\n")


class Stages(StageRunner):
    """The earlier recipes' stage class (`Stages(root / "stages.json")`, no settings check, no --until), kept for
    callers not yet on StageRunner; it reads and writes the same stages.json."""

    def __init__(self, path: Path):
        super().__init__(path.parent, None)
