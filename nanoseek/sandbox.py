"""Running untrusted model output (Python code, Coq proofs, math answers) in a separate, limited process.

A reward that executes model output is an attack surface (DeepSeek-R1 sec. 2.2.2 runs code against test
cases; this module is what makes that safe here). Untrusted output runs only through `run_once` / `Worker`,
and those refuse to start anything (`nanoseek.config.ConfigError`, one line naming the Debian package) unless
the full sandbox works here, or the user opted out with `--unsafe-no-sandbox` (`allow_unsafe`) or
`NANOSEEK_UNSAFE_NO_SANDBOX=1` (a warning is printed; `rl` records the choice in config.json). Which mode this
machine supports, and that gate, are in nanoseek.sandbox_probe (its names are re-exported here).

The full sandbox (mode "bwrap"; needs Debian `bubblewrap` with unprivileged user namespaces, and util-linux
`prlimit`) gives every untrusted process:

- **bubblewrap**: read-only root, fresh `/tmp` and `/dev`, new user/pid/net/ipc/uts/mount namespaces (no network
  at all, not even loopback), killed with its parent; chosen paths (the project, answer keys) hidden under
  empty tmpfs mounts. Nothing it writes reaches the host (the only writable places are its own tmpfs mounts).
- **every descendant contained**: bwrap's pid namespace has bwrap's own init as pid 1; when the checked process
  exits, or the parent kills bwrap at the deadline (`--die-with-parent`), that init dies and the kernel kills
  every process left in the namespace, `setsid()` children and double forks included.
- rlimits (through `prlimit`, so no `preexec_fn` runs in a threaded parent): CPU seconds, address space,
  **process count in every mode**, file size, open files, no core dumps;
- when the caller is root: a throw-away uid per concurrent slot (root ignores RLIMIT_NPROC; the throw-away uid
  makes the process cap real, and every leftover process of that uid is swept with `kill -9 -1` run as it).
  As another user RLIMIT_NPROC counts all of that user's processes, so the cap is set to the user's current
  count plus `Limits.nproc`: a fork bomb gets `nproc` more processes, not the user's whole allowance;
- a wall-clock deadline that kills the whole process group (and with it the pid namespace);
- stdout read with a byte cap (the process is killed at the cap), stderr discarded.

The unsafe mode (mode "unsafe", only when allowed) keeps what works without bubblewrap: rlimits (`prlimit`, or
a stdlib `setrlimit` launcher when `prlimit` is missing), the throw-away uid as root, a private temp dir as cwd,
and a pid namespace from util-linux `unshare --pid --fork --kill-child` (with `--user` when not root, and with
`--net --ipc` where that works: no network, not even loopback) when that works here, so descendants still die
with the checked process. It has NO file-system isolation: the code runs with the (throw-away or own) uid's
access to every file (and to the network when `unshare` is unusable). Without a usable
`unshare` (old util-linux, user namespaces off and not root) descendants are contained only by the process
group kill and, as root, the uid sweep: a non-root `setsid()` child can then outlive the deadline.

Two ways to run: `run_once` (one fresh process per check, payload on stdin, one capped reply) and `Worker`
(a long-lived process speaking a line protocol, for warm Coq and math-verify workers; a request that misses
its deadline or overflows kills and restarts it).

Simplifications: the throw-away uids are derived from the parent's pid, so two parents whose pids collide
modulo 4000 share uids (a sweep of one could kill the other's check, which then scores wrong); no seccomp filter
and no cgroup (memory is bounded by RLIMIT_AS, processes by RLIMIT_NPROC and the pid namespace; real root without
a throw-away uid, which the probe falls back to only when switching uid fails, has no working process cap, and
as another user each concurrent check's cap is counted from the processes alive at its start, so checks running
side by side can together exceed `nproc`); the read-only root means a sandbox can *read* world-readable files
that are not hidden.
"""
from __future__ import annotations

import atexit
import os
import selectors
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

from nanoseek.sandbox_probe import (UNSAFE_ENV, UNSAFE_FLAG, _UID_BASE, _bwrap_args, add_unsafe_argument,  # noqa: F401
                                    allow_unsafe, check_for_task, probe, python_executable, require,
                                    requirement_missing, sandbox_mode, sandbox_python, unsafe_allowed)

_SLOTS = 16


@dataclass(frozen=True)
class Limits:
    """Resource limits of one sandboxed process. `wall_s` is enforced by the parent, the rest by the kernel."""
    wall_s: float = 5.0
    cpu_s: int = 5
    memory_mb: int = 512  # RLIMIT_AS (address space); CPython needs ~30 MB, coqtop with Lia ~400 MB
    # RLIMIT_NPROC in every mode: the whole throw-away uid as root, else this many above the user's current count;
    # bwrap itself needs headroom: 16 made clean starts fail
    nproc: int = 64
    fsize_mb: int = 4
    open_files: int = 64
    output_bytes: int = 1 << 20

    def rlimits(self, nproc: int) -> list[tuple[str, int, int]]:
        """(prlimit name, soft, hard) of every limit; `nproc` is the process cap actually set."""
        mem = self.memory_mb << 20
        return [("cpu", self.cpu_s, self.cpu_s + 1), ("as", mem, mem), ("fsize", self.fsize_mb << 20, self.fsize_mb << 20),
                ("nofile", self.open_files, self.open_files), ("core", 0, 0), ("nproc", nproc, nproc)]


# A stdlib stand-in for `prlimit` (unsafe mode only, when util-linux is missing): set the limits, exec the command.
_RLIMIT_LAUNCHER = """import os, resource, sys
n = int(sys.argv[1])
for i in range(n):
    name, soft, hard = sys.argv[2 + 3 * i:5 + 3 * i]
    resource.setrlimit(getattr(resource, "RLIMIT_" + name.upper()), (int(soft), int(hard)))
argv = sys.argv[2 + 3 * n:]
os.execvp(argv[0], argv)
"""


# ---- what the sandbox can read ---------------------------------------------------------------------
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


def _kill_all_of(uid: int) -> None:
    """`kill -9 -1` as uid: every process that uid may signal, i.e. its own."""
    kill = next((k for k in ("/bin/kill", "/usr/bin/kill") if os.path.exists(k)), "kill")
    subprocess.run([kill, "-9", "-1"], user=uid, group=uid, extra_groups=[], stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


def _sweep(proc: subprocess.Popen, uid: int | None) -> None:
    """Kill the process group (bwrap / unshare and the pid namespace they hold), and (as root) every process left
    running under the slot's uid."""
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
            _kill_all_of(uid)
            time.sleep(0.01)


def _slot_uid(slot: int) -> int | None:
    return _UID_BASE + slot if probe()["drop_uid"] else None


def _count_processes(uid: int) -> int:
    n = 0
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                n += os.stat(f"/proc/{d}").st_uid == uid
            except OSError:
                pass
    return n


def _rlimit_prefix(limits: Limits, uid: int | None, p: dict) -> list[str]:
    """prlimit (or the stdlib launcher) setting every limit; the process cap counts the uid's processes that exist
    already when that uid is not a throw-away one (RLIMIT_NPROC is per user)."""
    nproc = limits.nproc + (0 if uid is not None else _count_processes(os.getuid()))
    lims = limits.rlimits(nproc)
    if p["tools"]["prlimit"]:
        return [p["tools"]["prlimit"]] + [f"--{n}={s}:{h}" for n, s, h in lims] + ["--"]
    return [p["python"], "-I", "-S", "-c", _RLIMIT_LAUNCHER, str(len(lims))] + [str(x) for lim in lims for x in lim]


def _spawn(argv: list[str], limits: Limits, slot: int, hide: tuple[str, ...], cwd: str | None,
           merge_stderr: bool = False, binds: tuple[str, ...] = ()) -> tuple[subprocess.Popen, int | None]:
    p = probe()
    uid = _slot_uid(slot)
    prefix = _rlimit_prefix(limits, uid, p)
    if p["mode"] == "bwrap":
        cmd = prefix + _bwrap_args(hide, binds, p["tools"]["bwrap"]) + argv
        env = {"PATH": "/usr/bin:/bin"}
    else:
        cmd = prefix + (p["pidns"] or []) + argv
        env = {"PATH": "/usr/bin:/bin", "HOME": cwd or "/tmp", "TMPDIR": cwd or "/tmp"}
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT if merge_stderr else subprocess.DEVNULL,
                            start_new_session=True, user=uid, group=uid, extra_groups=[] if uid else None,
                            cwd=cwd, env=env, close_fds=True)
    return proc, uid


_private_dirs: set[str] = set()  # removed at exit too (a warm Worker that is never closed keeps its own)


@atexit.register
def _remove_private_dirs() -> None:
    for d in list(_private_dirs):
        shutil.rmtree(d, ignore_errors=True)


def _private_dir(uid: int | None) -> str | None:
    if sandbox_mode() == "bwrap":
        return None  # /tmp inside is a fresh tmpfs
    d = tempfile.mkdtemp(prefix="nanoseek-sbx-")
    _private_dirs.add(d)
    if uid is not None:
        os.chown(d, uid, uid)
    return d


def _remove_private_dir(d: str) -> None:
    shutil.rmtree(d, ignore_errors=True)
    _private_dirs.discard(d)


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
    """Run argv once in the sandbox with `stdin` as input; never raises for anything the child does (raises
    ConfigError when the sandbox cannot run here and the user did not allow running without it).
    A run that failed to start (OSError, or bwrap's exit 1 without output, e.g. when the machine is briefly out
    of processes) is retried twice before it counts; a candidate that exits 1 silently just costs three runs."""
    for attempt in range(3):
        r = _run_once(argv, stdin, limits, hide)
        if r.returncode not in (None, 1) or r.timed_out or r.overflow or r.stdout:
            return r
        time.sleep(0.05 * (attempt + 1))
    return r


def _run_once(argv: list[str], stdin: bytes, limits: Limits, hide: tuple[str, ...]) -> RunResult:
    require()  # no sandbox and no opt-out: ConfigError, before anything runs
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
            _remove_private_dir(cwd)
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
        require()  # no sandbox and no opt-out: ConfigError, before anything runs
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
            _remove_private_dir(self.cwd)
            self.cwd = None
        if self.slot is not None:
            _slots.give(self.slot)
            self.slot = None


def project_root() -> str:
    return str(Path(__file__).resolve().parent.parent)
