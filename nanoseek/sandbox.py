"""Running untrusted model output (Python code, Coq proofs, math answers) in a separate, limited process.

A reward that executes model output is an attack surface (DeepSeek-R1 sec. 2.2.2 runs code against test
cases; this module is what makes that safe here). Every untrusted process gets:

- **bubblewrap** (`bwrap`, Debian `bubblewrap`) when it works on this machine: read-only root, fresh
  `/tmp` and `/dev`, new user/pid/net/ipc/uts namespaces (no network at all, not even loopback), killed
  with its parent; chosen paths (the project, answer keys) hidden under empty tmpfs mounts.
  Fallback when bwrap is missing or user namespaces are off: rlimits + setsid + a private temp dir as cwd,
  with one warning line (`sandbox: ...`) saying that file-system and network isolation are off.
- rlimits (through util-linux `prlimit`, so no `preexec_fn` runs in a threaded parent): CPU seconds, address
  space, process count, file size, open files, no core dumps;
- when the caller is root: a throw-away uid per concurrent slot (so the process limit is real, root is exempt
  from it, and every leftover process of that uid can be swept with `kill -9 -1` run as that uid);
- a wall-clock deadline that kills the whole process group (and, under bwrap, the pid namespace with it);
- stdout read with a byte cap (the process is killed at the cap), stderr discarded.

Two ways to run: `run_once` (one fresh process per check, payload on stdin, one capped reply) and `Worker`
(a long-lived process speaking a line protocol, for warm Coq and math-verify workers; a request that misses
its deadline or overflows kills and restarts it).

Simplifications: the throw-away uids are derived from the parent's pid, so two parents whose pids collide
modulo 4000 share uids (a sweep of one could kill the other's check, which then scores wrong); no seccomp filter
and no cgroup (memory is bounded by RLIMIT_AS, processes by RLIMIT_NPROC
per uid); the read-only root means a sandbox can *read* world-readable files that are not hidden.
"""
from __future__ import annotations

import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

_UID_BASE = 100_000 + (os.getpid() % 4000) * 16  # distinct per parent process, then per slot
_SLOTS = 16


@dataclass(frozen=True)
class Limits:
    """Resource limits of one sandboxed process. `wall_s` is enforced by the parent, the rest by the kernel."""
    wall_s: float = 5.0
    cpu_s: int = 5
    memory_mb: int = 512  # RLIMIT_AS (address space); CPython needs ~30 MB, coqtop with Lia ~400 MB
    nproc: int = 64  # per sandbox uid (root only); bwrap itself needs headroom: 16 made clean starts fail
    fsize_mb: int = 4
    open_files: int = 64
    output_bytes: int = 1 << 20

    def prlimit_args(self) -> list[str]:
        mem = self.memory_mb << 20
        return ["prlimit", f"--cpu={self.cpu_s}:{self.cpu_s + 1}", f"--as={mem}", f"--fsize={self.fsize_mb << 20}",
                f"--nofile={self.open_files}", "--core=0"] + ([f"--nproc={self.nproc}"] if probe()["drop_uid"] else []) + ["--"]


# ---- which isolation this machine supports ----------------------------------------------------------
_probe_lock = threading.Lock()
_probe: dict | None = None


def _as_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _bwrap_args(hide: tuple[str, ...] = (), binds: tuple[str, ...] = ()) -> list[str]:
    args = ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp",
            "--unshare-all", "--die-with-parent", "--new-session", "--chdir", "/tmp", "--clearenv",
            "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/tmp"]
    for path in hide:
        if os.path.isdir(path):
            args += ["--tmpfs", path]
    for path in binds:  # after the tmpfs mounts, so a bound path under /tmp or a hidden folder stays visible
        args += ["--ro-bind", path, path]
    return args


_packages_lock = threading.Lock()
_packages: dict[tuple[str, ...], str] = {}


def readable_packages(*names: str) -> str:
    """A folder holding the installed top-level packages `names` and their dist-info metadata (hard links, or
    copies across file systems), world-readable, made once per process and removed at exit. A sandboxed interpreter puts it on
    sys.path (and a Worker binds it with `binds=`): the environment's own site-packages may sit below a folder
    the throw-away uid cannot enter (/root/...) or below /tmp, which the sandbox replaces."""
    import atexit
    import importlib.metadata
    import importlib.util

    key = tuple(sorted(names))
    with _packages_lock:
        if key in _packages:
            return _packages[key]
        root = tempfile.mkdtemp(prefix="nanoseek-pkgs-")
        os.chmod(root, 0o755)
        atexit.register(shutil.rmtree, root, True)

        def link_or_copy(src: str, dst: str) -> None:
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)

        for name in key:
            spec = importlib.util.find_spec(name)
            if spec is None or not spec.submodule_search_locations:
                raise ImportError(f"package {name} is not installed")
            src = list(spec.submodule_search_locations)[0]
            shutil.copytree(src, os.path.join(root, name), copy_function=link_or_copy,
                            ignore=shutil.ignore_patterns("__pycache__"))
            for dist_name in importlib.metadata.packages_distributions().get(name, []):  # metadata: versions
                meta = getattr(importlib.metadata.distribution(dist_name), "_path", None)
                if meta is not None and os.path.isdir(meta):
                    shutil.copytree(meta, os.path.join(root, os.path.basename(meta)), copy_function=link_or_copy,
                                    dirs_exist_ok=True)
        for dirpath, _, _ in os.walk(root):
            os.chmod(dirpath, 0o755)
        _packages[key] = root
        return root


def _try(cmd: list[str], uid: int | None) -> bool:
    try:
        r = subprocess.run(cmd, user=uid, group=uid, extra_groups=[] if uid is not None else None,
                           capture_output=True, timeout=30)
        return r.returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def probe() -> dict:
    """How sandboxes run on this machine, probed once per process:
    {"mode": "bwrap"|"rlimits", "python": interpreter the sandbox can execute, "drop_uid": bool}."""
    global _probe
    with _probe_lock:
        if _probe is not None:
            return _probe
        pythons = [p for p in dict.fromkeys([python_executable(), "/usr/bin/python3"]) if os.path.exists(p)]
        have_bwrap = shutil.which("bwrap") is not None and shutil.which("prlimit") is not None
        uids = [_UID_BASE, None] if _as_root() else [None]
        found = None
        for uid in uids:
            for mode in (["bwrap"] if have_bwrap else []) + ["rlimits"]:
                for py in pythons:
                    prefix = _bwrap_args() if mode == "bwrap" else []
                    if _try(prefix + [py, "-I", "-S", "-c", "pass"], uid):
                        found = {"mode": mode, "python": py, "drop_uid": uid is not None}
                        break
                if found:
                    break
            if found:
                break
        found = found or {"mode": "rlimits", "python": pythons[0] if pythons else sys.executable, "drop_uid": False}
        if found["mode"] != "bwrap":
            print("sandbox: bubblewrap unusable here (apt-get install bubblewrap; needs user namespaces); falling "
                  "back to rlimits + setsid + private temp dir: NO network or file-system isolation", file=sys.stderr)
        if _as_root() and not found["drop_uid"]:
            print("sandbox: running as root without a throw-away uid: the process-count limit is not enforced",
                  file=sys.stderr)
        _probe = found
        return found


def sandbox_mode() -> str:
    """'bwrap' if bubblewrap with user namespaces works here, else 'rlimits'."""
    return probe()["mode"]


def requirement_missing() -> str | None:
    """One line naming what to install if the strong sandbox cannot run here, else None."""
    if shutil.which("prlimit") is None:
        return "util-linux `prlimit` not found"
    if sandbox_mode() != "bwrap":
        return "bubblewrap not usable (apt-get install bubblewrap; needs user namespaces)"
    return None


# ---- slots: one uid per concurrent sandbox --------------------------------------------------------
class _Slots:
    def __init__(self, n: int):
        self.free = list(range(n))
        self.cv = threading.Condition()

    def take(self) -> int:
        with self.cv:
            while not self.free:
                self.cv.wait()
            return self.free.pop()

    def give(self, slot: int) -> None:
        with self.cv:
            self.free.append(slot)
            self.cv.notify()


_slots = _Slots(_SLOTS)


def live_processes(uid: int) -> list[int]:
    """Pids of running (not zombie) processes owned by uid."""
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if os.stat(f"/proc/{d}").st_uid != uid:
                    continue
                with open(f"/proc/{d}/stat", "rb") as f:
                    state = f.read().rsplit(b")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if state != b"Z":
                pids.append(int(d))
    return pids


def _sweep(proc: subprocess.Popen, uid: int | None) -> None:
    """Kill the process group, and (as root) every process left running under the slot's uid."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    if uid is not None:
        for _ in range(20):
            if not live_processes(uid):
                break
            subprocess.run(["kill", "-9", "-1"], user=uid, group=uid, extra_groups=[],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.01)


def _slot_uid(slot: int) -> int | None:
    return _UID_BASE + slot if probe()["drop_uid"] else None


def _spawn(argv: list[str], limits: Limits, slot: int, hide: tuple[str, ...], cwd: str | None,
           merge_stderr: bool = False, binds: tuple[str, ...] = ()) -> tuple[subprocess.Popen, int | None]:
    uid = _slot_uid(slot)
    prefix = limits.prlimit_args() if shutil.which("prlimit") else []
    if sandbox_mode() == "bwrap":
        cmd = prefix + _bwrap_args(hide, binds) + argv
        env = None
    else:
        cmd = prefix + argv
        env = {"PATH": "/usr/bin:/bin", "HOME": cwd or "/tmp", "TMPDIR": cwd or "/tmp"}
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT if merge_stderr else subprocess.DEVNULL,
                            start_new_session=True, user=uid, group=uid, extra_groups=[] if uid else None,
                            cwd=cwd, env=env, close_fds=True)
    return proc, uid


def _private_dir(uid: int | None) -> str | None:
    if sandbox_mode() == "bwrap":
        return None  # /tmp inside is a fresh tmpfs
    d = tempfile.mkdtemp(prefix="nanoseek-sbx-")
    if uid is not None:
        os.chown(d, uid, uid)
    return d


@dataclass
class RunResult:
    stdout: bytes
    returncode: int | None
    timed_out: bool
    overflow: bool
    seconds: float

    @property
    def ok(self) -> bool:
        return not self.timed_out and not self.overflow


def _read_capped(fd: int, deadline: float, cap: int, until: bytes | None = None, buf: bytearray | None = None
                 ) -> tuple[bytearray, str]:
    """Read from fd until EOF, `until` appears, the deadline passes or `cap` bytes: (data, why)."""
    buf = buf if buf is not None else bytearray()
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    try:
        while True:
            if until is not None and until in buf:
                return buf, "marker"
            left = deadline - time.monotonic()
            if left <= 0:
                return buf, "timeout"
            if not sel.select(timeout=min(left, 0.5)):
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return buf, "eof"
            buf += chunk
            if len(buf) > cap:
                return buf, "overflow"
    finally:
        sel.close()


def run_once(argv: list[str], stdin: bytes, limits: Limits = Limits(), hide: tuple[str, ...] = ()) -> RunResult:
    """Run argv once in the sandbox with `stdin` as input; never raises for anything the child does.
    A run that failed to start (OSError, or bwrap's exit 1 without output, e.g. when the machine is briefly out
    of processes) is retried twice before it counts; a candidate that exits 1 silently just costs three runs."""
    for attempt in range(3):
        r = _run_once(argv, stdin, limits, hide)
        if r.returncode not in (None, 1) or r.timed_out or r.overflow or r.stdout:
            return r
        time.sleep(0.05 * (attempt + 1))
    return r


def _run_once(argv: list[str], stdin: bytes, limits: Limits, hide: tuple[str, ...]) -> RunResult:
    slot = _slots.take()
    t0 = time.monotonic()
    proc = uid = cwd = None
    try:
        uid = _slot_uid(slot)
        cwd = _private_dir(uid)
        proc, uid = _spawn(argv, limits, slot, hide, cwd)
        writer = threading.Thread(target=_feed, args=(proc, stdin), daemon=True)
        writer.start()
        buf, why = _read_capped(proc.stdout.fileno(), t0 + limits.wall_s, limits.output_bytes)
        if why == "eof":
            try:
                proc.wait(timeout=max(0.05, t0 + limits.wall_s - time.monotonic()))
            except subprocess.TimeoutExpired:
                why = "timeout"
        return RunResult(bytes(buf), proc.poll(), why == "timeout", why == "overflow", time.monotonic() - t0)
    except OSError:
        return RunResult(b"", None, False, False, time.monotonic() - t0)
    finally:
        if proc is not None:
            _sweep(proc, uid)
            for f in (proc.stdin, proc.stdout):
                try:
                    f.close()
                except OSError:
                    pass
        if cwd:
            shutil.rmtree(cwd, ignore_errors=True)
        _slots.give(slot)


def _feed(proc: subprocess.Popen, data: bytes) -> None:
    try:
        proc.stdin.write(data)
        proc.stdin.close()
    except (OSError, ValueError):
        pass


# ---- long-lived workers ------------------------------------------------------------------------------
class Worker:
    """A long-lived sandboxed process answering requests on stdin/stdout (a warm coqtop or math worker).

    Start (and call) it from a long-lived thread: bwrap's --die-with-parent follows the starting *thread*.
    `request(text, marker, wall_s)` writes text and reads until the marker bytes appear; on a timeout,
    overflow or exit the process is killed (None is returned) and the next request starts a fresh one.
    """

    def __init__(self, argv: list[str], limits: Limits, startup: str = "", startup_marker: bytes | None = None,
                 startup_wall_s: float = 60.0, hide: tuple[str, ...] = (), merge_stderr: bool = False,
                 binds: tuple[str, ...] = ()):
        self.argv, self.limits, self.hide, self.merge_stderr = argv, replace(limits), hide, merge_stderr
        self.binds = binds
        self.startup, self.startup_marker, self.startup_wall_s = startup, startup_marker, startup_wall_s
        self.proc: subprocess.Popen | None = None
        self.uid: int | None = None
        self.slot: int | None = None
        self.cwd: str | None = None
        self.starts = 0

    def _start(self) -> bool:
        self.starts += 1
        self.slot = _slots.take()
        uid = _slot_uid(self.slot)
        self.cwd = _private_dir(uid)
        self.proc, self.uid = _spawn(self.argv, self.limits, self.slot, self.hide, self.cwd, self.merge_stderr,
                                     self.binds)
        if self.startup:
            return self._exchange(self.startup, self.startup_marker, self.startup_wall_s) is not None
        return True

    def _exchange(self, text: str, marker: bytes | None, wall_s: float) -> bytes | None:
        try:
            self.proc.stdin.write(text.encode("utf-8"))
            self.proc.stdin.flush()
        except (OSError, ValueError):
            self.close()
            return None
        buf, why = _read_capped(self.proc.stdout.fileno(), time.monotonic() + wall_s, self.limits.output_bytes,
                                until=marker)
        if why != "marker":
            self.close()
            return None
        return bytes(buf)

    def request(self, text: str, marker: bytes, wall_s: float) -> bytes | None:
        if self.proc is None or self.proc.poll() is not None:
            self.close()
            if not self._start():
                return None
        return self._exchange(text, marker, wall_s)

    def close(self) -> None:
        if self.proc is not None:
            _sweep(self.proc, self.uid)
            for f in (self.proc.stdin, self.proc.stdout):
                try:
                    f.close()
                except OSError:
                    pass
            self.proc = None
        if self.cwd:
            shutil.rmtree(self.cwd, ignore_errors=True)
            self.cwd = None
        if self.slot is not None:
            _slots.give(self.slot)
            self.slot = None


def python_executable() -> str:
    """The real interpreter behind this process (not a venv link)."""
    return os.path.realpath(getattr(sys, "_base_executable", sys.executable) or sys.executable)


def project_root() -> str:
    return str(Path(__file__).resolve().parent.parent)


def sandbox_python() -> str:
    """An interpreter the sandbox uid can execute (for `python -I -S` checks that need only the stdlib)."""
    return probe()["python"]
