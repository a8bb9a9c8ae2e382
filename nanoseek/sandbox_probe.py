"""Which isolation untrusted model output gets on this machine (nanoseek.sandbox runs it), and whether the user
allowed running it without the full sandbox.

`probe` tries, once per process (again when PATH changes which tools it finds), bubblewrap under prlimit as a
throw-away uid (as root) or as this user: mode "bwrap" when that starts; else mode "unsafe", with a util-linux
`unshare` prefix for a pid (and, where it works, network and ipc) namespace when one works here. `require` is
the gate every sandboxed run passes: the full sandbox, or the unsafe mode only when the user opted in with
`--unsafe-no-sandbox` (`allow_unsafe`) or `NANOSEEK_UNSAFE_NO_SANDBOX=1` (a warning is printed once), or a
ConfigError of one line naming the Debian package to install. See nanoseek.sandbox for what each mode gives.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading

from nanoseek.config import ConfigError

_UID_BASE = 100_000 + (os.getpid() % 4000) * 16  # distinct per parent process, then per slot


# ---- which isolation this machine supports ----------------------------------------------------------
UNSAFE_ENV = "NANOSEEK_UNSAFE_NO_SANDBOX"
UNSAFE_FLAG = "--unsafe-no-sandbox"
_probe_lock = threading.Lock()
_probes: dict[tuple, dict] = {}  # keyed by where bwrap/prlimit/unshare are found (PATH may change)
_unsafe_cli = False
_warned: set[tuple] = set()


def _as_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _bwrap_args(hide: tuple[str, ...] = (), binds: tuple[str, ...] = (), bwrap: str = "bwrap") -> list[str]:
    args = [bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp",
            "--unshare-all", "--die-with-parent", "--new-session", "--chdir", "/tmp", "--clearenv",
            "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/tmp"]
    for path in hide:
        if os.path.isdir(path):
            args += ["--tmpfs", path]
    for path in binds:  # after the tmpfs mounts, so a bound path under /tmp or a hidden folder stays visible
        args += ["--ro-bind", path, path]
    return args


def _try(cmd: list[str], uid: int | None) -> bool:
    try:
        r = subprocess.run(cmd, user=uid, group=uid, extra_groups=[] if uid is not None else None,
                           capture_output=True, timeout=30, env={"PATH": "/usr/bin:/bin"})
        return r.returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _tools() -> dict[str, str | None]:
    """Where PATH finds each tool, resolved (a link in a folder the throw-away uid cannot enter still runs)."""
    found = {t: shutil.which(t) for t in ("bwrap", "prlimit", "unshare")}
    return {t: os.path.realpath(p) if p else None for t, p in found.items()}


def probe() -> dict:
    """How sandboxes run on this machine, probed once per process (again if PATH changes which tools it finds):
    {"mode": "bwrap"|"unsafe", "python": interpreter the sandbox can execute, "drop_uid": bool,
     "problem": None, or one line saying why the full sandbox cannot run (with the Debian package to install),
     "pidns": the `unshare` prefix giving unsafe mode a pid (and, where it works, network and ipc) namespace, or
     None, "tools": their paths}."""
    tools = _tools()
    key = tuple(tools.values())
    with _probe_lock:
        if key in _probes:
            return _probes[key]
        pythons = [p for p in dict.fromkeys([python_executable(), "/usr/bin/python3"]) if os.path.exists(p)]
        uids = [_UID_BASE, None] if _as_root() else [None]
        found = None
        if tools["bwrap"] and tools["prlimit"]:
            found = _first_working(uids, pythons, _bwrap_args(bwrap=tools["bwrap"]), "bwrap")
        problem = None
        if found is None:
            missing = [(n, pkg) for n, pkg in (("bubblewrap (`bwrap`)", "bubblewrap"), ("util-linux `prlimit`", "util-linux"))
                       if not tools["bwrap" if pkg == "bubblewrap" else "prlimit"]]
            problem = (f"{' and '.join(n for n, _ in missing)} not found (Debian: apt-get install "
                       f"{' '.join(pkg for _, pkg in missing)})" if missing
                       else "bubblewrap (Debian `bubblewrap`) cannot start a sandbox here: it needs unprivileged "
                            "user namespaces (sysctl kernel.unprivileged_userns_clone=1)")
            found = (_first_working(uids, pythons, [], "unsafe")
                     or {"mode": "unsafe", "python": pythons[0] if pythons else sys.executable, "drop_uid": False})
        found.update(problem=problem, tools=tools, pidns=None)
        if found["mode"] == "unsafe" and tools["unshare"]:
            uid = _UID_BASE if found["drop_uid"] else None
            for user in ([[]] if uid is None and _as_root() else []) + [["--user"]]:
                for net in (["--net", "--ipc"], []):  # no network either, where that works
                    cmd = [tools["unshare"], *user, *net, "--pid", "--fork", "--kill-child"]
                    if found["pidns"] is None and _try(cmd + [found["python"], "-I", "-S", "-c", "pass"], uid):
                        found["pidns"] = cmd
        _probes[key] = found
        return found


def _first_working(uids: list, pythons: list[str], prefix: list[str], mode: str) -> dict | None:
    for uid in uids:
        for py in pythons:
            if _try(prefix + [py, "-I", "-S", "-c", "pass"], uid):
                return {"mode": mode, "python": py, "drop_uid": uid is not None}
    return None


def sandbox_mode() -> str:
    """'bwrap' if the full sandbox (bubblewrap with user namespaces, prlimit) works here, else 'unsafe'."""
    return probe()["mode"]


def requirement_missing() -> str | None:
    """One line naming what to install if the full sandbox cannot run here, else None."""
    return probe()["problem"]


def allow_unsafe(on: bool = True) -> None:
    """`--unsafe-no-sandbox`: in this process, let untrusted output run without the full sandbox when that cannot
    run here (the sandbox is still used where it works)."""
    global _unsafe_cli
    _unsafe_cli = bool(on)


def unsafe_allowed() -> bool:
    return _unsafe_cli or os.environ.get(UNSAFE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def require() -> str:
    """The mode untrusted output will run in: 'bwrap', or 'unsafe' when the full sandbox cannot run here and the
    user allowed it (a warning is printed once). Raises ConfigError (one line, what to install) otherwise."""
    p = probe()
    if p["problem"] is None:
        return "bwrap"
    if not unsafe_allowed():
        raise ConfigError(f"refusing to run untrusted model output without a sandbox: {p['problem']}; or pass "
                          f"{UNSAFE_FLAG} (or set {UNSAFE_ENV}=1) to run it with NO file-system isolation")
    key = tuple(p["tools"].values())
    if key not in _warned:
        _warned.add(key)
        contained = ("a pid namespace" if p["pidns"] else "the process group only") + " holds its descendants"
        net = "network isolation" if p["pidns"] and "--net" in p["pidns"] else "NO network isolation"
        print(f"sandbox: WARNING: running untrusted model output with NO file-system isolation and {net} "
              f"({UNSAFE_FLAG} / {UNSAFE_ENV}): {p['problem']}; rlimits apply and {contained}", file=sys.stderr)
    return "unsafe"


def check_for_task(task_name: str, unsafe: bool = False) -> str | None:
    """For a command about to score `task_name`: apply `--unsafe-no-sandbox` and, if the task runs untrusted
    output, fail now (before any work or write) when no sandbox may run. The mode it will use, or None."""
    from nanoseek.tasks import get_task

    if unsafe:
        allow_unsafe(True)
        print(f"sandbox: WARNING: {UNSAFE_FLAG} given: untrusted model output runs unconfined wherever the "
              "full sandbox cannot run", file=sys.stderr)
    return require() if get_task(task_name).sandboxed else None


def add_unsafe_argument(p) -> None:
    """The `--unsafe-no-sandbox` flag of every command that scores untrusted output."""
    p.add_argument(UNSAFE_FLAG, action="store_true",
                   help="score code/proof/math answers even where the sandbox (bubblewrap, prlimit) cannot run: "
                        f"model output then runs with NO file-system isolation (also {UNSAFE_ENV}=1)")


def python_executable() -> str:
    """The real interpreter behind this process (not a venv link)."""
    return os.path.realpath(getattr(sys, "_base_executable", sys.executable) or sys.executable)


def sandbox_python() -> str:
    """An interpreter the sandbox uid can execute (for `python -I -S` checks that need only the stdlib)."""
    return probe()["python"]
