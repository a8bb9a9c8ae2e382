"""Soak: normal streaming clients keep chatting while abusive clients hammer `nanoseek serve`.

Starts `nanoseek serve` on a free localhost port (the tiny preset with random weights unless --run is
given; --server-root runs the server from another checkout, e.g. an older commit, for before/after
figures), measures the normal request's quiet latency (alone, median of 5), then for --duration seconds
runs --normal streaming chat clients (greedy, --normal-tokens fixed-length answers, one request after
another) alongside the abusive kinds chosen with --abuse:

  stop       2 loops, each a chat request with four 250,000-character stop strings (the issue's case)
  fanout     1 loop, /v1/completions with 5,000 prompts x n=16
  flood      64 concurrent loops of streaming chats running to the end of the context
  maxtokens  1 loop alternating max_tokens=10**9 and n=16 choices to the end of the context
  slowloris  60 sockets sending request headers one byte a second, 4 sending a body one byte a second
  slowread   2 loops, streaming n=16 to the end of the context, reading one event a second

Every loop is bounded (a short pause after each answer, 0.5 s after a 429) and everything stays on
loopback. Each abusive kind connects from its own loopback address (127.0.0.2, .3, ...: different clients,
as on a real network) unless --same-address puts everyone on 127.0.0.1, where the server cannot tell the
abuser from the normal clients. Reports the normal clients' p50/p95/p99/max latency against the bound
max(5 s, 20 x quiet latency), how many missed it or never finished, the status codes of each abusive kind,
and whether the server is still up.

--compare-keys: every client on 127.0.0.1 (as behind one proxy), two servers of the same model started
side by side, one without API keys and one with two (`--api-key` twice): there the abusive kinds send one
key and the normal clients the other, so the server tells them apart by key. The soak alternates between
the two (--rounds phases each, --duration seconds per server in all, the next phase only once the last
server is idle again; the order flips every round) and reports the normal clients' figures per server.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from serve_load import make_run  # noqa: E402

ABUSES = ("stop", "fanout", "flood", "maxtokens", "slowloris", "slowread")
PROMPT = "<|bos|><|user|>Compute 1 + 2.<|assistant|>"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, run: Path, port: int, log, extra: list[str] = (), keys: dict[str, str] | None = None
                 ) -> subprocess.Popen:
    root = Path(args.server_root).resolve() if args.server_root else Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": str(args.threads)}
    env.pop("NANOSEEK_API_KEY", None)
    proc = subprocess.Popen([sys.executable, "-m", "nanoseek.cli", "serve", "--run", str(run), "--port", str(port),
                             "--model-name", "soak", "--max-batch", str(args.max_batch), "--threads",
                             str(args.threads), *extra], cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {keys['normal']}"} if keys else {}
    for _ in range(600):
        try:
            if httpx.get(f"{url}/health", timeout=1, headers=headers).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not start")


class Soak:
    def __init__(self, args, url: str, keys: dict[str, str] | None = None):
        """`keys`: the API key each kind sends ("normal", and "abuse" for every abusive kind), or None."""
        self.args, self.url, self.keys = args, url, keys
        self.duration = args.duration
        self.codes: dict[str, Counter] = {k: Counter() for k in ABUSES}
        self.latencies: list[float] = []
        self.ttft: list[float] = []
        self.normal_fail: Counter = Counter()
        self.unfinished: list[float] = []
        self.deadline = 0.0
        self.pools: dict[str, httpx.AsyncClient] = {}
        port = int(url.rsplit(":", 1)[1])
        self.port = port

    def address(self, kind: str) -> str:
        return "127.0.0.1" if self.args.same_address or kind == "normal" else f"127.0.0.{2 + ABUSES.index(kind)}"

    def auth(self, kind: str) -> dict[str, str]:
        if self.keys is None:
            return {}
        return {"Authorization": f"Bearer {self.keys['normal' if kind == 'normal' else 'abuse']}"}

    def client(self, kind: str) -> httpx.AsyncClient:
        """One connection pool per kind (making a client costs ~50 ms of CPU: one each would starve the loop)."""
        if kind not in self.pools:
            transport = httpx.AsyncHTTPTransport(local_address=self.address(kind),
                                                 limits=httpx.Limits(max_connections=200))
            self.pools[kind] = httpx.AsyncClient(base_url=self.url, transport=transport, headers=self.auth(kind),
                                                 timeout=self.duration + 120)
        return self.pools[kind]

    def normal_body(self) -> dict:
        return {"model": "soak", "messages": [{"role": "user", "content": "Compute 3 + 4 * 5."}], "stream": True,
                "max_tokens": self.args.normal_tokens, "ignore_eos": True, "temperature": 0}

    async def normal_once(self, c: httpx.AsyncClient) -> tuple[int, float, float]:
        t0 = time.perf_counter()
        first = None
        async with c.stream("POST", "/v1/chat/completions", json=self.normal_body()) as r:
            if r.status_code != 200:
                await r.aread()
                return r.status_code, 0.0, 0.0
            async for line in r.aiter_lines():
                if first is None and line.startswith("data: {"):
                    delta = (json.loads(line[6:]).get("choices") or [{}])[0].get("delta", {})
                    if delta.get("content") or delta.get("reasoning_content"):
                        first = time.perf_counter() - t0
        return 200, time.perf_counter() - t0, first or 0.0

    async def quiet(self, k: int = 5) -> float:
        async with httpx.AsyncClient(base_url=self.url, timeout=120, headers=self.auth("normal")) as c:
            await self.normal_once(c)  # warm-up
            lat = []
            for _ in range(k):
                code, t, _ = await self.normal_once(c)
                assert code == 200, code
                lat.append(t)
        return statistics.median(lat)

    # ---- the normal clients -------------------------------------------------------------------------------
    async def normal_loop(self, bound: float) -> None:
        c = self.client("normal")
        while time.perf_counter() < self.deadline:
            t0 = time.perf_counter()
            task = asyncio.ensure_future(self.normal_once(c))
            done, _ = await asyncio.wait([task], timeout=max(0.0, self.deadline - t0) + bound)
            if not done:  # still running long after the soak ended: count it, do not wait forever
                task.cancel()
                self.unfinished.append(time.perf_counter() - t0)
                return
            code, t, first = task.result()
            if code == 200:
                self.latencies.append(t)
                self.ttft.append(first)
            else:
                self.normal_fail[code] += 1
            await asyncio.sleep(0.05)

    # ---- the abusive ones ----------------------------------------------------------------------------------
    async def post_loop(self, kind: str, path: str, bodies: list[bytes], pause: float = 0.2) -> None:
        c = self.client(kind)
        k = 0
        while time.perf_counter() < self.deadline:
            try:
                r = await c.post(path, content=bodies[k % len(bodies)],
                                 headers={"Content-Type": "application/json"})
                self.codes[kind][r.status_code] += 1
                await asyncio.sleep(0.5 if r.status_code == 429 else pause)
            except httpx.HTTPError as e:
                self.codes[kind][type(e).__name__] += 1
                await asyncio.sleep(pause)
            except asyncio.CancelledError:
                self.codes[kind]["no answer by the end"] += 1
                raise
            k += 1

    async def stream_loop(self, kind: str, body: dict, read_pause: float = 0.0) -> None:
        c = self.client(kind)
        while time.perf_counter() < self.deadline:
            try:
                answered = False
                async with c.stream("POST", "/v1/chat/completions", json=body) as r:
                    self.codes[kind][r.status_code] += 1
                    answered = True
                    async for _ in r.aiter_lines():
                        if time.perf_counter() > self.deadline:
                            break
                        if read_pause:
                            await asyncio.sleep(read_pause)
                await asyncio.sleep(0.5 if r.status_code == 429 else 0.05)
            except httpx.HTTPError as e:
                self.codes[kind][type(e).__name__] += 1
                await asyncio.sleep(0.2)
            except asyncio.CancelledError:
                if not answered:
                    self.codes[kind]["no answer by the end"] += 1
                raise

    async def slowloris(self, n_headers: int = 60, n_bodies: int = 4) -> None:
        loop = asyncio.get_running_loop()
        auth = "".join(f"{k}: {v}\r\n" for k, v in self.auth("slowloris").items())
        head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n{auth}"
                "Content-Type: application/json\r\nContent-Length: 400\r\n\r\n").encode()
        socks = []
        for i in range(n_headers + n_bodies):
            s = socket.socket()
            s.setblocking(False)
            s.bind((self.address("slowloris"), 0))
            try:
                await loop.sock_connect(s, ("127.0.0.1", self.port))
            except OSError as e:
                self.codes["slowloris"][type(e).__name__] += 1
                s.close()
                continue
            if i >= n_headers:
                await loop.sock_sendall(s, head)  # the headers at once, then the body byte by byte
            socks.append((s, i >= n_headers))
        k = 0
        while time.perf_counter() < self.deadline and socks:
            alive = []
            for s, body in socks:
                try:
                    s.send(b"{" if body else head[k:k + 1])
                    alive.append((s, body))
                except OSError:  # the server hung up
                    self.codes["slowloris"]["closed by server"] += 1
                    s.close()
            socks = alive
            k += 1
            await asyncio.sleep(1.0)
        for s, body in socks:
            if body:
                try:
                    data = s.recv(200)
                    self.codes["slowloris"][data.split(b" ")[1].decode() if data else "closed by server"] += 1
                except OSError:
                    self.codes["slowloris"]["still open"] += 1
            else:
                self.codes["slowloris"]["still open"] += 1
            s.close()

    async def run(self, bound: float) -> None:
        self.deadline = time.perf_counter() + self.duration
        kinds = [k for k in self.args.abuse.split(",") if k]
        for kind in ["normal", *kinds]:
            self.client(kind)
        self.deadline = time.perf_counter() + self.duration
        tasks = [asyncio.ensure_future(self.normal_loop(bound)) for _ in range(self.args.normal)]
        for kind in kinds:
            if kind == "stop":
                body = json.dumps({"model": "soak", "messages": [{"role": "user", "content": "Compute 1."}],
                                   "stop": [c * 250_000 for c in "wxyz"]}).encode()
                tasks += [asyncio.ensure_future(self.post_loop("stop", "/v1/chat/completions", [body]))
                          for _ in range(2)]
            elif kind == "fanout":
                body = json.dumps({"model": "soak", "prompt": [PROMPT] * 5000, "n": 16, "max_tokens": 16}).encode()
                tasks.append(asyncio.ensure_future(self.post_loop("fanout", "/v1/completions", [body])))
            elif kind == "flood":
                body = {"model": "soak", "messages": [{"role": "user", "content": "Compute 9 * 9."}],
                        "stream": True, "ignore_eos": True}
                tasks += [asyncio.ensure_future(self.stream_loop("flood", body)) for _ in range(64)]
            elif kind == "maxtokens":
                huge = json.dumps({"model": "soak", "messages": [{"role": "user", "content": "hi"}],
                                   "max_tokens": 10 ** 9}).encode()
                wide = json.dumps({"model": "soak", "messages": [{"role": "user", "content": "hi"}], "n": 16,
                                   "ignore_eos": True}).encode()
                tasks.append(asyncio.ensure_future(self.post_loop("maxtokens", "/v1/chat/completions",
                                                                  [huge, wide])))
            elif kind == "slowloris":
                tasks.append(asyncio.ensure_future(self.slowloris()))
            elif kind == "slowread":
                body = {"model": "soak", "messages": [{"role": "user", "content": "Compute 2 + 2."}],
                        "stream": True, "n": 16, "ignore_eos": True}
                tasks += [asyncio.ensure_future(self.stream_loop("slowread", body, read_pause=1.0))
                          for _ in range(2)]
            else:
                raise SystemExit(f"unknown abuse kind {kind!r}; choose from {', '.join(ABUSES)}")
        await asyncio.sleep(self.duration)
        await asyncio.wait(tasks[:self.args.normal], timeout=bound + 5)  # the normal ones finish or give up
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for c in self.pools.values():
            await c.aclose()
        self.pools = {}  # the next run (--compare-keys) makes its own in its own event loop


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def wait_idle(url: str, headers: dict[str, str], timeout: float = 60.0) -> None:
    """Until the server has no active or waiting request (cancelled streams free their rows at its next step)."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        try:
            h = httpx.get(f"{url}/health", headers=headers, timeout=10).json()
            if h["active"] == 0 and h["pending"] == 0:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)


def compare_keys(args) -> None:
    """The same soak against a keyless server and a two-key one (abusers one key, normal clients the other),
    every client on 127.0.0.1, phases alternating; the normal clients' figures per server."""
    args.same_address = True
    keys = {"normal": "sk-soak-normal", "abuse": "sk-soak-abuse"}
    tmp = tempfile.TemporaryDirectory()
    run = Path(args.run) if args.run else make_run(Path(tmp.name))
    sides = {"no keys": None, "keys": keys}
    procs, logs, soaks, quiet, bounds = {}, [], {}, {}, {}
    try:
        for name, k in sides.items():
            port = free_port()
            logs.append((Path(tmp.name) / f"serve-{len(logs)}.log").open("w"))
            extra = [] if k is None else ["--api-key", k["normal"], "--api-key", k["abuse"]]
            procs[name] = start_server(args, run, port, logs[-1], extra, k)
            soaks[name] = Soak(args, f"http://127.0.0.1:{port}", k)
            soaks[name].duration = args.duration / args.rounds
        for name, soak in soaks.items():
            quiet[name] = asyncio.run(soak.quiet())
            bounds[name] = max(5.0, 20 * quiet[name])
        t0 = time.perf_counter()
        for r in range(args.rounds):
            for name in (list(sides) if r % 2 == 0 else list(reversed(sides))):
                asyncio.run(soaks[name].run(bounds[name]))
                wait_idle(soaks[name].url, soaks[name].auth("normal"))
        wall = time.perf_counter() - t0
    finally:
        for p in procs.values():
            p.terminate()
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        for f in logs:
            f.close()
    print(f"tiny preset (random weights); {args.max_batch} slots, {args.threads} torch thread(s) per server; every "
          f"client on 127.0.0.1; {args.normal} normal clients ({args.normal_tokens}-token streamed answers) against "
          f"[{args.abuse}]; {args.rounds} alternating phases of {args.duration / args.rounds:.0f} s per server "
          f"({wall:.0f} s wall)")
    out = {}
    for name, soak in soaks.items():
        lat = soak.latencies
        over = sum(t > bounds[name] for t in lat) + len(soak.unfinished)
        who = ("abusers and normal clients both keyless (one client: the address)" if sides[name] is None else
               "abusers send one key, normal clients another")
        print(f"{name:<8} ({who}): quiet {quiet[name]:.3f} s; normal requests finished {len(lat)}, p50 "
              f"{pct(lat, 0.5):.3f} s, p95 {pct(lat, 0.95):.3f} s, p99 {pct(lat, 0.99):.3f} s, max "
              f"{max(lat, default=float('nan')):.3f} s; first token p50 {pct(soak.ttft, 0.5):.3f} s; over the "
              f"{bounds[name]:.2f} s bound {over} (never finished {len(soak.unfinished)}); refused "
              f"{dict(soak.normal_fail) or 0}")
        for kind in args.abuse.split(","):
            if kind:
                print(f"  abusive {kind:<10} {dict(soak.codes[kind])}")
        out[name] = {"quiet_s": quiet[name], "bound_s": bounds[name], "normal_finished": len(lat),
                     "p50_s": pct(lat, 0.5), "p95_s": pct(lat, 0.95), "p99_s": pct(lat, 0.99),
                     "max_s": max(lat, default=None), "over_bound": over, "unfinished": len(soak.unfinished),
                     "normal_refused": dict(soak.normal_fail),
                     "abusive": {k: dict(v) for k, v in soak.codes.items() if v}}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", help="run directory to serve (default: tiny preset, random weights)")
    ap.add_argument("--server-root", help="serve from this checkout instead (e.g. an older commit)")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of abuse")
    ap.add_argument("--normal", type=int, default=4, help="normal streaming clients")
    ap.add_argument("--normal-tokens", type=int, default=32, help="tokens of each normal answer")
    ap.add_argument("--abuse", default=",".join(ABUSES), help=f"comma-separated kinds: {', '.join(ABUSES)}")
    ap.add_argument("--same-address", action="store_true", help="every client on 127.0.0.1")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--compare-keys", action="store_true",
                    help="one address for all; a keyless server against one where abusers and normal clients "
                         "send different API keys, alternating (--duration per server in all)")
    ap.add_argument("--rounds", type=int, default=2, help="--compare-keys: phases per server")
    args = ap.parse_args()
    if args.compare_keys:
        compare_keys(args)
        return
    tmp = tempfile.TemporaryDirectory()
    run = Path(args.run) if args.run else make_run(Path(tmp.name))
    port = free_port()
    log_path = Path(tmp.name) / "serve.log"
    with log_path.open("w") as log:
        proc = start_server(args, run, port, log)
        url = f"http://127.0.0.1:{port}"
        try:
            soak = Soak(args, url)
            quiet = asyncio.run(soak.quiet())
            bound = max(5.0, 20 * quiet)
            t0 = time.perf_counter()
            asyncio.run(soak.run(bound))
            wall = time.perf_counter() - t0
            try:
                up = httpx.get(f"{url}/health", timeout=10).status_code == 200 and proc.poll() is None
            except httpx.HTTPError:
                up = False
            after = None
            if up:
                try:
                    after = asyncio.run(asyncio.wait_for(soak.quiet(3), 30))
                except (asyncio.TimeoutError, AssertionError, httpx.HTTPError):
                    after = None
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
    lat = soak.latencies
    over = sum(t > bound for t in lat) + len(soak.unfinished)
    where = "from " + args.server_root if args.server_root else "this checkout"
    print(f"server: {where}; {'tiny preset (random weights)' if not args.run else args.run}; "
          f"{args.max_batch} slots, {args.threads} torch thread(s); clients "
          f"{'all on 127.0.0.1' if args.same_address else 'normal on 127.0.0.1, each abusive kind on its own address'}")
    print(f"quiet latency of a normal request ({args.normal_tokens} tokens, streamed, alone): median {quiet:.3f} s"
          f" -> bound max(5 s, 20x) = {bound:.2f} s")
    print(f"soak: {args.duration:.0f} s of [{args.abuse}] with {args.normal} normal clients ({wall:.0f} s wall)")
    print(f"normal requests finished: {len(lat)}; latency p50 {pct(lat, 0.5):.3f} s, p95 {pct(lat, 0.95):.3f} s, "
          f"p99 {pct(lat, 0.99):.3f} s, "
          f"max {max(lat, default=float('nan')):.3f} s; time to first token p50 {pct(soak.ttft, 0.5):.3f} s, "
          f"p99 {pct(soak.ttft, 0.99):.3f} s")
    print(f"normal requests over the bound: {over} (of them never finished: {len(soak.unfinished)}"
          + (f", running for {max(soak.unfinished):.0f} s when dropped" if soak.unfinished else "")
          + f"); refused: {dict(soak.normal_fail) or 0}")
    for kind in args.abuse.split(","):
        if kind:
            print(f"  abusive {kind:<10} {dict(soak.codes[kind])}")
    print(f"server up after the soak: {'yes' if up else 'NO'}; quiet latency after: "
          + (f"{after:.3f} s" if after is not None else "n/a"))
    verdict = up and over == 0 and not soak.normal_fail
    print("target (every normal request within the bound, none refused, server up):", "MET" if verdict else "MISSED")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "quiet_s": quiet, "bound_s": bound, "normal_finished": len(lat), "p50_s": pct(lat, 0.5),
            "p95_s": pct(lat, 0.95), "p99_s": pct(lat, 0.99), "max_s": max(lat, default=None), "over_bound": over,
            "unfinished": len(soak.unfinished), "normal_refused": dict(soak.normal_fail),
            "abusive": {k: dict(v) for k, v in soak.codes.items() if v}, "up": up, "after_quiet_s": after,
            "met": verdict}, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
