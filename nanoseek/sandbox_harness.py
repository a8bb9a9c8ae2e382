"""Stdlib-only code that runs *inside* the sandbox (passed to `python -I -S -c`), plus the plain-data codec
that both sides share.

The codec turns a value into JSON only if every node is of an exact builtin type (`type(v) is int`, never a
subclass), so an object with a hostile `__eq__`/`__hash__`/`__repr__` cannot reach the comparison: the
verifier outside compares the decoded JSON trees, never a candidate's object.

    None, bool, str        -> themselves            int   -> {"int": "123"}   float -> {"float": "1.5"}
    list / tuple           -> {"list"|"tuple": [..]} dict  -> {"dict": [[k, v], ...]} in insertion order
    set / frozenset        -> {"set": [..]} sorted by the elements' JSON text (order-free comparison)

Anything else raises `TypeError` (the call scores wrong). Size and depth are bounded (`MAX_NODES`, `MAX_DEPTH`).

Modes of the harness (read from the JSON payload on stdin; results go to a saved copy of fd 1 while the
candidate's own fds 1 and 2 point at /dev/null):
- "call":   exec the candidate source, call `entry(*args)` for each input, write the encoded outputs.
- "record": run the dataset's `check(candidate)` with a proxy that records each call's arguments and encoded
            output (HumanEval); the proxy hands the test a decoded *copy*. The candidate itself runs in a fresh
            child interpreter (`_Candidate`) that receives only its source and each call's arguments, never the
            test: in-process, `sys._getframe(1).f_locals` or a `gc.get_objects()` walk reached the test's
            asserts (and its compiled `check`), so a candidate could return the expected values. This process is
            made non-dumpable first, so the child cannot read its memory or fds through /proc either.
- "replay": no candidate code at all: run `check(candidate)` where `candidate` looks the arguments up in the
            recorded table, and report whether every assertion held.
In "record" and "replay" a trusted `prelude` (the dataset's prompt: helpers some tests call) runs before the test.
"""
from __future__ import annotations

import json

MAX_NODES = 100_000
MAX_DEPTH = 50


def encode(value, _state=None, _depth=0):
    """Plain-data JSON tree of `value` (exact builtin types only); raises TypeError/ValueError otherwise."""
    if _state is None:
        _state = [0]
    _state[0] += 1
    if _state[0] > MAX_NODES or _depth > MAX_DEPTH:
        raise ValueError("value too large or too deep")
    t = type(value)
    if value is None or t is bool or t is str:
        return value
    if t is int:
        return {"int": str(value)}
    if t is float:
        return {"float": repr(value)}
    if t is list or t is tuple:
        return {t.__name__: [encode(v, _state, _depth + 1) for v in value]}
    if t is dict:
        return {"dict": [[encode(k, _state, _depth + 1), encode(v, _state, _depth + 1)] for k, v in value.items()]}
    if t is set or t is frozenset:
        items = [encode(v, _state, _depth + 1) for v in value]
        return {"set": sorted(items, key=lambda x: json.dumps(x, sort_keys=True))}
    raise TypeError(f"not plain data: {t.__name__}")


def decode(tree):
    """The value an `encode` tree stands for (fresh builtin objects)."""
    if tree is None or isinstance(tree, (bool, str)):
        return tree
    (tag, body), = tree.items()
    if tag == "int":
        return int(body)
    if tag == "float":
        return float(body)
    if tag == "list":
        return [decode(v) for v in body]
    if tag == "tuple":
        return tuple(decode(v) for v in body)
    if tag == "dict":
        return {decode(k): decode(v) for k, v in body}
    if tag == "set":
        return {decode(v) for v in body}
    raise ValueError(f"unknown tag {tag!r}")


def key_of(args) -> str:
    """Lookup key of a call's (plain) arguments."""
    return json.dumps(encode(list(args)), sort_keys=True)


def _own_source() -> str:
    """This harness's source text (it runs as `python -I -S -c SOURCE`), to start a fresh copy of it."""
    import sys

    argv = list(getattr(sys, "orig_argv", []))
    if "-c" not in argv:
        with open("/proc/self/cmdline", "rb") as f:
            argv = [a.decode("utf-8", "surrogateescape") for a in f.read().split(b"\0")]
    return argv[argv.index("-c") + 1]


def _not_dumpable() -> None:
    """PR_SET_DUMPABLE 0: a process of the same uid (the candidate) can no longer read this one's memory through
    /proc/PID/mem, ptrace or process_vm_readv, nor open its fds through /proc/PID/fd."""
    import ctypes

    if ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE = 4
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")


class _Candidate:
    """The candidate in a fresh interpreter (`python -I -S -c HARNESS --candidate`) that only ever receives its
    source, the entry name and each call's arguments: the test text, its compiled `check` and the record
    table live in this (non-dumpable) process, out of reach of frame walks, gc walks and memory reads."""

    def __init__(self, source: str, entry: str):
        import subprocess
        import sys

        self.proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _own_source(), "--candidate"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     close_fds=True)
        self.ready = self._ask({"source": source, "entry": entry}).get("ready") is True

    def _ask(self, msg) -> dict:
        try:
            self.proc.stdin.write(json.dumps(msg).encode("utf-8") + b"\n")
            self.proc.stdin.flush()
            reply = json.loads(self.proc.stdout.readline(64 << 20).decode("utf-8"))
        except (OSError, ValueError):
            return {}
        return reply if type(reply) is dict else {}

    def call(self, key: str):
        """The encoded output of the candidate on the arguments `key`; raises if it raised, died or sent junk."""
        reply = self._ask(json.loads(key))
        if "ok" not in reply:
            raise RuntimeError("the candidate raised, exited or replied nonsense")
        return encode(decode(reply["ok"]))  # re-encoded: only plain data goes into the table


def candidate_main() -> None:  # the candidate's own process (see _Candidate)
    import os
    import sys

    rd, wr = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    rf, wf = os.fdopen(rd, "rb"), os.fdopen(wr, "wb")
    sys.setrecursionlimit(3000)

    def reply(msg) -> None:
        wf.write(json.dumps(msg).encode("utf-8") + b"\n")
        wf.flush()

    first = json.loads(rf.readline())
    ns = {"__name__": "__candidate__"}
    try:
        exec(compile(first["source"], "<candidate>", "exec"), ns)
        fn = ns[first["entry"]]
    except Exception as e:  # noqa: BLE001 -- a broken candidate: the test sees every call fail
        reply({"error": type(e).__name__})
        os._exit(0)
    del first
    reply({"ready": True})
    for line in rf:
        try:
            out = {"ok": encode(fn(*decode(json.loads(line))))}
        except Exception as e:  # noqa: BLE001 -- that call raised (or returned something not plain)
            out = {"error": type(e).__name__}
        reply(out)
    os._exit(0)


def main() -> None:  # runs inside the sandbox
    import os
    import random
    import sys

    if sys.argv[1:] == ["--candidate"]:
        candidate_main()
        return
    payload = json.loads(sys.stdin.buffer.read().decode("utf-8"))
    out = os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    sys.setrecursionlimit(3000)
    mode = payload["mode"]
    result = {"done": False}
    try:
        if mode == "call":
            ns = {"__name__": "__candidate__"}
            exec(compile(payload["source"], "<candidate>", "exec"), ns)
            fn = ns[payload["entry"]]
            outputs = []
            for args in payload["inputs"]:
                try:
                    outputs.append({"ok": encode(fn(*decode(args)))})
                except Exception as e:  # noqa: BLE001 -- a raising candidate scores that call wrong
                    outputs.append({"error": type(e).__name__})
            result = {"done": True, "outputs": outputs}
        elif mode == "record":
            _not_dumpable()
            cand = _Candidate(payload.pop("source"), payload["entry"])
            calls = []

            def proxy(*args):
                key = key_of(args)  # before the call: the candidate may mutate its arguments
                out_tree = cand.call(key)
                calls.append([key, out_tree])
                return decode(out_tree)

            tns = {"__name__": "__test__"}
            exec(compile(payload.get("prelude", ""), "<prelude>", "exec"), tns)  # the dataset's helpers
            exec(compile(payload["test"], "<test>", "exec"), tns)
            tns[payload["entry"]] = proxy  # some tests call the function by name (HumanEval/33)
            random.seed(0)  # tests that draw random inputs draw the same ones in record and replay
            try:
                if cand.ready:
                    tns["check"](proxy)
            except Exception:  # noqa: BLE001 -- a failing assertion ends the recording; replay judges
                pass
            cand.proc.kill()
            result = {"done": True, "calls": calls}
        elif mode == "replay":
            table = dict(payload["calls"])

            def replay(*args):
                return decode(table[key_of(args)])

            tns = {"__name__": "__test__"}
            exec(compile(payload.get("prelude", ""), "<prelude>", "exec"), tns)
            exec(compile(payload["test"], "<test>", "exec"), tns)
            tns[payload["entry"]] = replay
            random.seed(0)
            tns["check"](replay)
            result = {"done": True, "passed": True}
    except BaseException as e:  # noqa: BLE001 -- SystemExit before the tests included: not done
        result = {"done": result.get("done", False) and mode != "replay", "error": type(e).__name__,
                  **{k: v for k, v in result.items() if k != "done"}}
    data = json.dumps(result).encode("utf-8")
    while data:
        data = data[os.write(out, data):]
    os._exit(0)


if __name__ == "__main__":
    main()
