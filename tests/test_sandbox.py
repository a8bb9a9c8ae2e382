"""Hostile completions against the code task's sandbox: each scores wrong, ends within its deadline, leaves no
file or process behind, and the caller survives. The attacks that a regression would let through are observable
(the hidden generator's length, a file written outside /tmp, a setsid grandchild seen on the host), and run in
both modes: the full sandbox and the opt-in unsafe mode without bubblewrap (which scoring refuses by default).
Plus the plain-data codec the comparison relies on."""
from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import threading
import time

import pytest

from nanoseek import cli, sandbox, sandbox_probe
from nanoseek.config import ConfigError
from nanoseek.sandbox_harness import decode, encode
from nanoseek.tasks.base import format_completion
from nanoseek.tasks.code import CodeTask, run_call
from sandbox_util import host_dir, leftovers, marked_processes, need, path_without

WALL = 2.0
LIMITS = sandbox.Limits(wall_s=WALL, cpu_s=1, memory_mb=256, nproc=64, fsize_mb=1, output_bytes=1 << 20)


GENERATOR = os.path.join(sandbox.project_root(), "nanoseek", "tasks", "code.py")


def read_len_source(path: str) -> str:
    """A candidate returning the length of `path` as it reads it, or -1 when it cannot read it."""
    return (f"def f(xs):\n    try:\n        return len(open({path!r}).read())\n    except OSError:\n"
            "        return -1\n")


def write_source(path: str) -> str:
    """A candidate writing `path`: returns 1 if the write worked inside the sandbox, else -1."""
    return (f"def f(xs):\n    try:\n        open({path!r}, 'w').write('pwned')\n        return 1\n"
            "    except OSError:\n        return -1\n")


def hostile_sources(host_file: str, port: int) -> dict[str, str]:
    return {
        "infinite loop": "def f(xs):\n    while True:\n        pass\n",
        "sleep forever": "import time\ndef f(xs):\n    time.sleep(1000)\n",
        "fork bomb": "import os\ndef f(xs):\n    while True:\n        try:\n            os.fork()\n        except OSError:\n"
                     "            pass\n",
        "memory bomb": "def f(xs):\n    a = []\n    while True:\n        a.append(bytearray(1 << 24))\n",
        "write a host file": write_source(host_file),
        "connect to a local port": (f"import socket\ndef f(xs):\n    s = socket.create_connection(('127.0.0.1', {port}), 1)\n"
                                    "    s.sendall(b'pwned')\n    return 0\n"),
        "kill the parent": "import os, signal\ndef f(xs):\n    os.kill(os.getppid(), signal.SIGKILL)\n"
                           "    for p in os.listdir('/proc'):\n        if p.isdigit() and int(p) != os.getpid():\n"
                           "            try:\n                os.kill(int(p), signal.SIGKILL)\n"
                           "            except OSError:\n                pass\n    return 0\n",
        "1 GB of output": "import os, sys\ndef f(xs):\n    chunk = b'x' * (1 << 20)\n    for _ in range(1024):\n"
                          "        for fd in range(1, 12):\n            try:\n                os.write(fd, chunk)\n"
                          "            except OSError:\n                pass\n    return 0\n",
        "exit before the tests": "import sys\nsys.exit(0)\n",
        "os._exit before the tests": "import os\nos._exit(0)\n",
        "exit inside the call": "import sys\ndef f(xs):\n    sys.exit(0)\n",
        "always-equal object": "class A:\n    def __eq__(self, o):\n        return True\n    __hash__ = None\n"
                               "def f(xs):\n    return A()\n",
        "int subclass equal to all": "class I(int):\n    def __eq__(self, o):\n        return True\n"
                                     "def f(xs):\n    return I(0)\n",
        "forged result line": "import os, json\nfor fd in range(3, 12):\n    try:\n"
                              "        os.write(fd, json.dumps({'done': True, 'outputs': []}).encode())\n"
                              "    except OSError:\n        pass\nos._exit(0)\n",
        "read the generator": read_len_source(GENERATOR),
        "detached child": "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(100)\n"
                          "def f(xs):\n    return 0\n",
    }


@pytest.fixture(scope="module")
def task():
    t = CodeTask()
    t.limits = LIMITS
    return t


@pytest.fixture
def host_folder():
    d = host_dir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_hostile_code_scores_wrong_in_time_and_leaves_nothing(task, host_folder, mode):
    """In both modes; the unsafe one (bubblewrap hidden) has no file-system isolation, so the host file is checked
    in the full sandbox only, and the port where `unshare --net` works."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.05)
    port = listener.getsockname()[1]
    host_file = str(host_folder / "pwned.txt")  # outside /tmp, which the sandbox replaces with its own tmpfs
    problem = task.sample(random.Random(0), 2)
    ref = task.score(problem, task.solution(problem, random.Random(0)))
    assert ref.correct  # the problem is solvable through the same sandbox
    srcs = hostile_sources(host_file, port)
    before = set(leftovers())
    t0 = time.monotonic()
    scores = task.score_batch([problem] * len(srcs), [format_completion("x", s) for s in srcs.values()])
    elapsed = time.monotonic() - t0
    for name, s in zip(srcs, scores):
        assert not s.correct, name
    # every check has a WALL-second deadline; checks run two at a time, so the batch is bounded by
    # ceil(n/2) deadlines plus start-up slack
    assert elapsed < (len(srcs) + 1) // 2 * (WALL + 1.5), elapsed
    if mode == "bwrap":
        assert not os.path.exists(host_file)
    if mode == "bwrap" or "--net" in (sandbox.probe()["pidns"] or []):
        with pytest.raises(socket.timeout):
            listener.accept()  # nobody reached the port
    listener.close()
    assert set(leftovers()) - before == set()
    # the caller survived and the sandbox still works
    assert task.score(problem, task.solution(problem, random.Random(0))).correct


def test_each_hostile_check_ends_by_its_deadline(task, tmp_path):
    need("bwrap", "the code sandbox")
    problem = task.sample(random.Random(1), 1)
    srcs = hostile_sources(str(tmp_path / "x"), 9)
    for name in ("infinite loop", "fork bomb", "memory bomb", "1 GB of output"):
        t0 = time.monotonic()
        assert not task.check(problem, srcs[name]), name
        assert time.monotonic() - t0 < WALL + 1.5, name


def test_results_are_compared_outside_on_plain_data():
    for v in [0, -3, 2 ** 70, 1.5, float("inf"), "s", None, True, [1, [2]], (1, 2), {"a": [1]}, {3, 1}]:
        assert decode(encode(v)) == v and type(decode(encode(v))) is type(v)
    assert encode(True) != encode(1) and encode((1,)) != encode([1])  # bool/int, tuple/list differ

    class Eq:
        def __eq__(self, other):
            return True

    class Int(int):
        pass

    for bad in (Eq(), Int(3), [Eq()], {"k": Int(1)}, {1: object()}):
        with pytest.raises(TypeError):
            encode(bad)
    with pytest.raises(ValueError):
        encode([[[[]]]] * 200_000)  # too many nodes


def test_sandbox_mode_is_reported():
    p = sandbox.probe()
    assert p["mode"] in ("bwrap", "unsafe") and os.path.exists(p["python"])
    assert (p["mode"] == "bwrap") == (p["problem"] is None)


# ---- observable attacks: each test fails under the regression it names -------------------------------------
ONE_CALL = [[[1, 2]]]


def test_the_hidden_generator_cannot_be_read():
    """Mutation `hide=()` in tasks/code.py (the project readable) makes this fail: the length comes back."""
    need("bwrap", "the code sandbox")
    assert os.path.getsize(GENERATOR) > 1000
    assert run_call(read_len_source(GENERATOR), "f", ONE_CALL, LIMITS) == [{"ok": encode(-1)}]
    # the channel works: a world-readable file that is not hidden comes back with its true length
    visible = "/etc/os-release" if os.path.exists("/etc/os-release") else "/etc/passwd"
    with open(visible) as fh:
        n = len(fh.read())
    assert run_call(read_len_source(visible), "f", ONE_CALL, LIMITS) == [{"ok": encode(n)}]


def test_a_write_outside_tmp_does_not_reach_the_host(host_folder):
    """Mutation `--bind / /` for `--ro-bind / /` (a writable root) makes this fail: the file appears on the host.
    The folder is outside /tmp (the sandbox's own tmpfs) and world-writable, so only the read-only root stops it."""
    need("bwrap", "the code sandbox")
    target = host_folder / "pwned.txt"
    assert run_call(write_source(str(target)), "f", ONE_CALL, LIMITS) == [{"ok": encode(-1)}]
    assert not target.exists() and os.listdir(host_folder) == []
    # inside the sandbox, /tmp is writable (its own tmpfs): the probe can tell a write that worked
    inside = f"/tmp/nsk-inside-{os.getpid()}-{time.monotonic_ns()}.txt"
    assert run_call(write_source(inside), "f", ONE_CALL, LIMITS) == [{"ok": encode(1)}]
    assert not os.path.exists(inside)


# ---- containment of every descendant, in both modes ------------------------------------------------------
@pytest.fixture(params=["bwrap", "unsafe"])
def mode(request, monkeypatch, tmp_path):
    """The full sandbox, or the unsafe mode: bubblewrap hidden from PATH and NANOSEEK_UNSAFE_NO_SANDBOX=1."""
    monkeypatch.setattr(sandbox_probe, "_unsafe_cli", False)
    monkeypatch.delenv(sandbox.UNSAFE_ENV, raising=False)
    if request.param == "bwrap":
        need("bwrap", "the full sandbox")
    else:
        monkeypatch.setenv("PATH", path_without("bwrap", tmp_path / "bin"))
        monkeypatch.setenv(sandbox.UNSAFE_ENV, "1")
    assert sandbox.require() == request.param
    return request.param


SETSID_GRANDCHILD = """import os, sys, time
mark, target = sys.argv[1], sys.argv[2]
if os.fork() == 0:
    os.setsid()  # a new session and process group: a process-group kill no longer reaches it
    if os.fork() == 0:
        os.execv("/bin/sleep", [mark + "-grandchild", "60"])  # visible on the host while it lives
    if os.fork() == 0:
        time.sleep(1.5)  # past the 1 s deadline
        open(target, "w").write("escaped")
        os._exit(0)
    os._exit(0)
time.sleep(100)
"""


def sample_marked(mark: str, stop: threading.Event, seen: list[int]) -> None:
    while not stop.is_set():
        seen.append(len(marked_processes(mark)))
        time.sleep(0.02)


def test_setsid_grandchildren_die_at_the_deadline(mode, host_folder):
    """Without the pid namespace (and, as root, the uid sweep) the detached grandchild outlives the deadline: it
    writes the host file at 1.5 s and its `sleep` stays; here neither happens."""
    mark, target = f"nsk-setsid-{os.getpid()}-{time.monotonic_ns()}", host_folder / "late.txt"
    stop, seen = threading.Event(), []
    watcher = threading.Thread(target=sample_marked, args=(mark + "-grandchild", stop, seen))
    watcher.start()
    try:
        r = sandbox.run_once([sandbox.sandbox_python(), "-I", "-S", "-c", SETSID_GRANDCHILD, mark, str(target)], b"",
                             sandbox.Limits(wall_s=1.0, cpu_s=2, memory_mb=256, nproc=16))
        time.sleep(2.0)  # the grandchild would have written by now
    finally:
        stop.set()
        watcher.join()
    assert r.timed_out
    assert max(seen) >= 1  # the detached grandchild did start (the check is not vacuous)
    assert marked_processes(mark) == []  # neither it nor anything else of this check is left
    assert not target.exists()


def test_no_network_in_either_mode(mode):
    """bwrap's and (where `unshare --net` works) the unsafe mode's own network namespace: not even loopback."""
    if mode == "unsafe" and "--net" not in (sandbox.probe()["pidns"] or []):
        pytest.skip("unshare --net is not usable here: the unsafe mode has network access (documented)")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.05)
    src = ("import socket, sys\ntry:\n    socket.create_connection(('127.0.0.1', int(sys.argv[1])), 1).sendall(b'x')\n"
           "    print('connected')\nexcept OSError:\n    print('refused')\n")
    try:
        r = sandbox.run_once([sandbox.sandbox_python(), "-I", "-S", "-c", src, str(listener.getsockname()[1])], b"",
                             LIMITS)
        assert r.stdout.strip() == b"refused"
        with pytest.raises(socket.timeout):
            listener.accept()
    finally:
        listener.close()


FORK_BOMB = """import os, sys
while True:
    try:
        os.fork()
    except OSError:
        pass
"""


def test_a_fork_bomb_is_capped_ends_by_its_deadline_and_leaves_nothing(mode):
    nproc, wall = 24, 2.0
    mark = f"nsk-bomb-{os.getpid()}-{time.monotonic_ns()}"
    assert marked_processes(mark) == []
    stop, seen = threading.Event(), []
    watcher = threading.Thread(target=sample_marked, args=(mark, stop, seen))
    watcher.start()
    t0 = time.monotonic()
    try:
        r = sandbox.run_once([sandbox.sandbox_python(), "-I", "-S", "-c", FORK_BOMB, mark], b"",
                             sandbox.Limits(wall_s=wall, cpu_s=2, memory_mb=256, nproc=nproc))
        elapsed = time.monotonic() - t0
        time.sleep(0.3)
    finally:
        stop.set()
        watcher.join()
    assert r.timed_out and elapsed < wall + 1.5, elapsed
    assert 4 <= max(seen) <= nproc + 4, max(seen)  # it forked, and RLIMIT_NPROC held it near the cap
    assert marked_processes(mark) == []


# ---- no sandbox, no scoring (unless the user opts out) -------------------------------------------------
@pytest.fixture
def strict(monkeypatch):
    monkeypatch.setattr(sandbox_probe, "_unsafe_cli", False)
    monkeypatch.setattr(sandbox_probe, "_warned", set())  # the unsafe-mode warning is printed once per process
    monkeypatch.delenv(sandbox.UNSAFE_ENV, raising=False)


@pytest.mark.parametrize("hidden, package", [("bwrap", "bubblewrap"), ("prlimit", "util-linux")])
def test_scoring_refuses_without_the_sandbox(strict, monkeypatch, tmp_path, capsys, hidden, package):
    task = CodeTask()
    problem = task.sample(random.Random(0), 1)
    good = task.solution(problem, random.Random(0))
    before = set(leftovers())
    monkeypatch.setenv("PATH", path_without(hidden, tmp_path / "bin"))
    assert sandbox.sandbox_mode() == "unsafe" and package in sandbox.requirement_missing()
    for attempt in (lambda: task.score_batch([problem], [good]), lambda: task.check(problem, "def f(xs): return 0"),
                    lambda: sandbox.run_once(["/bin/true"], b"")):
        with pytest.raises(ConfigError, match=f"apt-get install {package}") as e:
            attempt()
        assert "\n" not in str(e.value) and "--unsafe-no-sandbox" in str(e.value)
    assert set(leftovers()) - before == set()
    # the environment variable lets it run (with a warning), and the check is real: right scores right
    monkeypatch.setenv(sandbox.UNSAFE_ENV, "1")
    assert task.score(problem, good).correct and not task.score(problem, task.solution(
        problem, random.Random(0), flawed=True)).correct
    assert "NO file-system isolation" in capsys.readouterr().err
    # and so does the command-line flag (sandbox.allow_unsafe)
    monkeypatch.delenv(sandbox.UNSAFE_ENV)
    with pytest.raises(ConfigError):
        task.score_batch([problem], [good])
    sandbox.allow_unsafe(True)
    assert task.score(problem, good).correct


def test_commands_refuse_before_any_work(strict, monkeypatch, tmp_path, capsys):
    """`eval --task code` refuses in one line before loading anything; with --unsafe-no-sandbox it goes on (and
    then fails on the missing run directory, a different error)."""
    monkeypatch.setenv("PATH", path_without("bwrap", tmp_path / "bin"))
    run_dir = tmp_path / "no-such-run"
    assert cli.main(["eval", "--run", str(run_dir), "--task", "code"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: refusing to run untrusted model output") and "bubblewrap" in err
    assert len(err.splitlines()) == 1
    assert cli.main(["eval", "--run", str(run_dir), "--task", "arithmetic"]) != 0  # no sandbox needed: other error
    assert "refusing" not in capsys.readouterr().err
    assert cli.main(["eval", "--run", str(run_dir), "--task", "code", "--unsafe-no-sandbox"]) != 0
    err = capsys.readouterr().err
    assert "refusing" not in err and "WARNING" in err
    assert not run_dir.exists()


def test_rl_records_the_sandbox_choice():
    from nanoseek.commands.rl import config_from_args

    p = cli.build_parser()
    on = config_from_args(p.parse_args(["rl", "--init", "a", "--out", "b", "--task", "code", "--unsafe-no-sandbox"]))
    off = config_from_args(p.parse_args(["rl", "--init", "a", "--out", "b", "--task", "code"]))
    assert on.to_dict()["unsafe_no_sandbox"] is True and off.to_dict()["unsafe_no_sandbox"] is False


def need_outcome(tool: str) -> BaseException | None:
    try:
        need(tool, "the sandbox")
    except BaseException as e:  # noqa: BLE001 -- pytest's skip and fail outcomes are BaseExceptions
        return e
    return None


def test_ci_fails_instead_of_skipping_when_the_sandbox_is_missing(monkeypatch, tmp_path):
    """sandbox_util.need: CI=1 / yes / any CI name counts as CI (it compared with "true" only, so CI=1 skipped)."""
    monkeypatch.setenv("PATH", path_without("bwrap", tmp_path / "bin"))
    for value in ("true", "1", "yes", "TRUE", "github-actions"):
        monkeypatch.setenv("CI", value)
        e = need_outcome("bwrap")
        assert isinstance(e, pytest.fail.Exception) and "CI must run this test" in str(e), (value, e)
    for value in ("", "0", "false"):
        monkeypatch.setenv("CI", value)
        e = need_outcome("bwrap")
        assert isinstance(e, pytest.skip.Exception) and "apt-get install bubblewrap" in str(e), (value, e)


NON_ROOT_RUN = """import os, sys, time
sys.path.insert(0, sys.argv[1])
from nanoseek import sandbox
mode, path, mark, target, src = sys.argv[2:7]
if mode == "unsafe":
    os.environ["PATH"] = path
    os.environ[sandbox.UNSAFE_ENV] = "1"
assert sandbox.require() == mode and not sandbox.probe()["drop_uid"]
r = sandbox.run_once([sandbox.sandbox_python(), "-I", "-S", "-c", src, mark, target], b"",
                     sandbox.Limits(wall_s=1.0, cpu_s=2, memory_mb=256, nproc=16))
print("timed_out" if r.timed_out else "finished", flush=True)
"""


@pytest.mark.parametrize("as_mode", ["bwrap", "unsafe"])
def test_setsid_grandchildren_die_when_the_caller_is_not_root(host_folder, as_mode):
    """The issue's case: as a non-root caller there is no throw-away uid and no uid sweep, so only the pid
    namespace (bwrap's, or `unshare --user --pid` in the unsafe mode) stops a detached grandchild."""
    need("bwrap", "the full sandbox")
    if os.geteuid() != 0:
        pytest.skip("needs root to start the non-root caller")
    python = "/usr/bin/python3"
    uid = 54321
    root = sandbox.project_root()
    if not os.path.exists(python) or subprocess.run(
            [python, "-c", "import sys; sys.path.insert(0, sys.argv[1]); import nanoseek.sandbox", root],
            user=uid, group=uid, extra_groups=[], capture_output=True, cwd="/").returncode != 0:
        pytest.skip(f"uid {uid} cannot run {python} with nanoseek from {root}")
    mark, target = f"nsk-nonroot-{os.getpid()}-{time.monotonic_ns()}", host_folder / "late.txt"
    tools = path_without("bwrap", host_folder / "bin")  # a folder the non-root caller can enter
    stop, seen = threading.Event(), []
    watcher = threading.Thread(target=sample_marked, args=(mark + "-grandchild", stop, seen))
    watcher.start()
    try:
        out = subprocess.run([python, "-c", NON_ROOT_RUN, root, as_mode, tools, mark, str(target), SETSID_GRANDCHILD],
                             user=uid, group=uid, extra_groups=[], capture_output=True, text=True, cwd="/",
                             env={"PATH": "/usr/bin:/bin", "HOME": "/"}, timeout=60)
        time.sleep(2.0)
    finally:
        stop.set()
        watcher.join()
    assert out.stdout.strip() == "timed_out", out.stderr[-2000:]
    assert max(seen) >= 1
    assert marked_processes(mark) == []
    assert not target.exists()
