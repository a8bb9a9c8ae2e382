"""Helpers for the sandbox/task tests: skip-or-fail on missing system tools, leftover checks, a host folder
outside /tmp that a sandbox escape could write to, marked-process counts, and a PATH without bubblewrap."""
from __future__ import annotations

import glob
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from nanoseek import sandbox
from requires import in_ci


def need(tool: str, why: str) -> None:
    """Skip (one line saying what to install) when `tool` is missing, except in CI (the CI variable set to
    anything but "", "0", "false" or "no": `requires.in_ci`), where it fails."""
    missing = None
    if tool == "bwrap":
        missing = sandbox.requirement_missing()
    elif shutil.which(tool) is None:
        missing = f"{tool} not found"
    if missing:
        if in_ci():
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


def host_dir() -> Path:
    """A fresh world-writable folder on the host *outside* /tmp and outside the paths the code sandbox hides
    (the sandbox replaces /tmp with its own tmpfs, so a write "escaping" to /tmp proves nothing): under
    /var/tmp, else the home folder. A write that reaches it reached the host. Remove it with shutil.rmtree."""
    for base in ("/var/tmp", os.path.expanduser("~")):
        if os.path.isdir(base) and os.access(base, os.W_OK):
            d = Path(tempfile.mkdtemp(prefix="nanoseek-host-", dir=base))
            os.chmod(d, 0o777)  # the sandbox's throw-away uid could write here if the root were writable
            real = os.path.realpath(d)
            assert not real.startswith("/tmp/") and not real.startswith(sandbox.project_root()), real
            return d
    pytest.skip("no writable folder outside /tmp")


def marked_processes(mark: str) -> list[int]:
    """Live processes whose command line contains `mark` (visible from here in any pid namespace below ours)."""
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != os.getpid():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    if mark.encode() not in f.read():
                        continue
                with open(f"/proc/{d}/stat", "rb") as f:
                    if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                        continue
            except (OSError, IndexError):
                continue
            pids.append(int(d))
    return pids


def path_without(tool: str, folder: Path) -> str:
    """A PATH (one folder of links) holding prlimit, unshare and coqtop where found, but not `tool`."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("bwrap", "prlimit", "unshare", "coqtop", "kill"):
        src = shutil.which(name)
        if name != tool and src and not (folder / name).exists():
            os.symlink(src, folder / name)
    return str(folder)
