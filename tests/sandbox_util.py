"""Helpers for the sandbox/task tests: skip-or-fail on missing system tools, and leftover checks."""
from __future__ import annotations

import glob
import os
import shutil
import tempfile

import pytest

from nanoseek import sandbox


def need(tool: str, why: str) -> None:
    """Skip (one line saying what to install) when `tool` is missing, except in CI (CI=true), where it fails."""
    missing = None
    if tool == "bwrap":
        missing = sandbox.requirement_missing()
    elif shutil.which(tool) is None:
        missing = f"{tool} not found"
    if missing:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI must run this test: {missing} ({why})")
        pytest.skip(f"{missing}: {why}")


def leftovers() -> list[str]:
    """Live processes under this process's sandbox uids, and private temp dirs still on disk."""
    out = []
    if sandbox.probe()["drop_uid"]:
        for slot in range(sandbox._SLOTS):
            out += [f"pid {p} (uid {sandbox._UID_BASE + slot})" for p in sandbox.live_processes(sandbox._UID_BASE + slot)]
    out += glob.glob(os.path.join(tempfile.gettempdir(), "nanoseek-sbx-*"))
    return out
