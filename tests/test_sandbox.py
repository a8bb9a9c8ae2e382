"""Hostile completions against the code task's sandbox: each scores wrong, ends within its deadline, leaves no
file or process behind, and the caller survives. Plus the plain-data codec the comparison relies on."""
from __future__ import annotations

import os
import random
import socket
import time

import pytest

from nanoseek import sandbox
from nanoseek.sandbox_harness import decode, encode
from nanoseek.tasks.base import format_completion
from nanoseek.tasks.code import CodeTask
from sandbox_util import leftovers, need

WALL = 2.0
LIMITS = sandbox.Limits(wall_s=WALL, cpu_s=1, memory_mb=256, nproc=64, fsize_mb=1, output_bytes=1 << 20)


def hostile_sources(host_file: str, port: int) -> dict[str, str]:
    return {
        "infinite loop": "def f(xs):\n    while True:\n        pass\n",
        "sleep forever": "import time\ndef f(xs):\n    time.sleep(1000)\n",
        "fork bomb": "import os\ndef f(xs):\n    while True:\n        try:\n            os.fork()\n        except OSError:\n"
                     "            pass\n",
        "memory bomb": "def f(xs):\n    a = []\n    while True:\n        a.append(bytearray(1 << 24))\n",
        "write a host file": f"def f(xs):\n    open({host_file!r}, 'w').write('pwned')\n    return 0\n",
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
        "read the generator": "def f(xs):\n    return open(" + repr(os.path.join(sandbox.project_root(), "nanoseek",
                                                                             "tasks", "code.py")) + ").read()\n",
        "detached child": "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(100)\n"
                          "def f(xs):\n    return 0\n",
    }


@pytest.fixture(scope="module")
def task():
    t = CodeTask()
    t.limits = LIMITS
    return t


def test_hostile_code_scores_wrong_in_time_and_leaves_nothing(task, tmp_path):
    need("bwrap", "file-system and network isolation of the code sandbox")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.05)
    port = listener.getsockname()[1]
    host_file = str(tmp_path / "pwned.txt")
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
    assert not os.path.exists(host_file)
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
    assert p["mode"] in ("bwrap", "rlimits") and os.path.exists(p["python"])
