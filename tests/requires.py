"""Optional test dependencies: skipped on a developer's machine that lacks them, a failure in CI.

`require("openai")` is `pytest.importorskip("openai")` unless the environment variable CI is set (GitHub
Actions and `.ci/run` set CI=true), where a missing dependency raises ImportError at collection, so a
broken install can never turn a suite into green skips."""
from __future__ import annotations

import importlib
import os
import shutil

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def require(module: str, reason: str | None = None):
    """The imported module; locally a skip when it is missing, in CI an ImportError."""
    if in_ci():
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=reason)


def require_binary(*names: str, reason: str) -> str:
    """The path of the first of `names` on PATH; locally a skip when none is, in CI a failure."""
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    if in_ci():
        pytest.fail(f"{' / '.join(names)} not found on PATH in CI: {reason}")
    pytest.skip(f"{' / '.join(names)} not installed: {reason}")
