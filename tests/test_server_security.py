"""`nanoseek serve` against browser attacks on a local server and clients that share one address.

* CSRF / DNS rebinding (nanoseek.engine.http_guard.RequestGuard): a web page on another site can make the
  browser POST `text/plain` (a "simple" request, no CORS preflight) to a keyless loopback server, and a
  rebinding page (its own domain name resolved to 127.0.0.1) is even same-origin with it. Each is refused:
  415 for a body not declared as JSON, 403 for a foreign Origin, 421 for a Host that is not the server's;
  the server's own origins, requests without Origin, and configured allow-list entries still work.
* Per-API-key fairness: with several keys, each request's client is its key, not its address, so a flood
  from key A behind one address neither starves key B in the admission order nor spends B's 429 budget.
  The scheduling test drives the batcher by hand (no background thread): deterministic, no timing.

All in process (httpx's ASGI transport; every request comes from 127.0.0.1). The live-server checks of the
same headers and the chat page in Chromium (which posts JSON from the page's own origin) are in
tests/test_server.py.
"""
from __future__ import annotations

import argparse
import asyncio
import json

import httpx
import pytest
import torch

from requires import require

from nanoseek.config import ConfigError, ModelConfig
from nanoseek.corpus import corpus_texts
from nanoseek.model import Transformer
from nanoseek.tokenizer import Tokenizer

require("fastapi")

URL = "http://127.0.0.1:8000"  # ServeConfig's default bind: what the in-process app believes it serves on
CHAT = {"messages": [{"role": "user", "content": "Compute 1 + 2."}], "max_tokens": 2, "temperature": 0}
KEY_A, KEY_B = "sk-flood-aaaa", "sk-normal-bbbb"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(corpus_texts("arithmetic", 100, seed=0), vocab_size=300)


@pytest.fixture(scope="module")
def model(tok) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=tok.vocab_size, dim=32, inter_dim=64, moe_inter_dim=32, n_layers=2,
                                   n_dense_layers=1, n_heads=2, n_routed_experts=4, n_activated_experts=2,
                                   kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                                   max_seq_len=64, original_seq_len=64))


def make_server(model, tok, **cfg):
    from nanoseek.engine.server import ServeConfig, Server
    return Server(model, tok, ServeConfig(model_name="tiny", max_slots=4, **cfg))


@pytest.fixture
def running(model, tok):
    """A factory of servers whose batcher thread runs (so an accepted request is answered)."""
    made = []

    def factory(**cfg):
        s = make_server(model, tok, **cfg)
        s.batcher.start()
        made.append(s)
        return s

    yield factory
    for s in made:
        s.batcher.close()


def send(app, method: str, path: str, headers: dict | None = None, body: object = CHAT,
         content_type: str | None = "application/json") -> httpx.Response:
    """One request through the ASGI app; `headers` may override Host. POST bodies are JSON text."""
    async def go():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url=URL) as c:
            h = {**({"Content-Type": content_type} if content_type and method == "POST" else {}), **(headers or {})}
            content = json.dumps(body) if method == "POST" else None
            return await asyncio.wait_for(c.request(method, path, content=content, headers=h), 30)
    return asyncio.run(go())


def error(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert err["code"] == code and err["message"] and err["type"] == "invalid_request_error"
    return err


# ---- header parsing (hand-made examples) -------------------------------------------------------------------
def test_host_and_origin_parsing():
    from nanoseek.engine.server import split_host, split_origin
    assert split_host("LocalHost:8000") == ("localhost", 8000)
    assert split_host("[::1]:8000") == ("[::1]", 8000) and split_host("[::1]") == ("[::1]", None)
    assert split_host("evil.example") == ("evil.example", None)
    for bad in ("::1", "a:b", "a:0", "a:70000", "[evil]:80", "a/b:80", "", "[::1]x", "u@h:80"):
        with pytest.raises(ValueError):
            split_host(bad)
    assert split_origin("http://127.0.0.1:8000") == ("http", "127.0.0.1", 8000)
    assert split_origin("https://Chat.Example.com") == ("https", "chat.example.com", 443)
    assert split_origin("http://[::1]:8000") == ("http", "[::1]", 8000)
    for bad in ("null", "file://", "ftp://a", "http://a/path", "evil.example", "http://u@a"):
        with pytest.raises(ValueError):
            split_origin(bad)


# ---- CSRF: the body must be declared JSON ------------------------------------------------------------------
@pytest.mark.parametrize("ctype", ["text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
                                   "multipart/form-data; boundary=x", None, "application/json, text/plain"])
def test_post_that_is_not_declared_json_gets_415_and_no_work(model, tok, ctype):
    server = make_server(model, tok)  # keyless, loopback: the case a cross-site form could use
    r = send(server.app, "POST", "/v1/chat/completions", content_type=ctype)
    err = error(r, 415, "unsupported_media_type")
    assert "application/json" in err["message"]
    assert server.batcher.n_pending == 0  # refused before anything was queued


def test_json_post_with_charset_and_without_origin_works(running):
    server = running()
    for ctype in ("application/json", "application/json; charset=utf-8", "Application/JSON"):
        r = send(server.app, "POST", "/v1/chat/completions", content_type=ctype)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, r.text


# ---- CSRF: foreign origins ---------------------------------------------------------------------------------
@pytest.mark.parametrize("origin", ["http://evil.example", "https://evil.example:8000", "null",
                                    "http://localhost:9999", "http://127.0.0.1", "http://127.0.0.1.evil.example:8000"])
def test_foreign_origin_gets_403(model, tok, origin):
    server = make_server(model, tok)
    err = error(send(server.app, "POST", "/v1/chat/completions", {"Origin": origin}), 403, "origin_not_allowed")
    assert "--allowed-origin" in err["message"]
    error(send(server.app, "GET", "/v1/models", {"Origin": origin}), 403, "origin_not_allowed")
    assert server.batcher.n_pending == 0


@pytest.mark.parametrize("origin,host", [("http://127.0.0.1:8000", None), ("http://localhost:8000", "localhost:8000"),
                                         ("http://[::1]:8000", "[::1]:8000"), ("http://localhost:8000", None)])
def test_same_origin_post_works(running, origin, host):
    """What the chat page sends: its own origin (the loopback names are one machine, so any of them on the
    server's port is the server's own)."""
    server = running()
    r = send(server.app, "POST", "/v1/chat/completions", {"Origin": origin, **({"Host": host} if host else {})})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length", r.text


# ---- DNS rebinding: foreign Host ---------------------------------------------------------------------------
@pytest.mark.parametrize("host", ["evil.example:8000", "evil.example", "127.0.0.1:9999", "localhost.evil.example:8000",
                                  "192.168.1.5:8000", "[::1"])
def test_rebinding_host_gets_421_on_every_path(model, tok, host):
    server = make_server(model, tok)
    # a rebinding page is same-origin with itself: Origin == Host, and still refused
    r = send(server.app, "POST", "/v1/chat/completions", {"Host": host, "Origin": f"http://{host}"})
    err = error(r, 421, "host_not_allowed")
    assert "--allowed-host" in err["message"]
    for path in ("/health", "/v1/models", "/"):  # nothing is readable through the rebound name either
        assert send(server.app, "GET", path, {"Host": host}).status_code == 421
    assert server.batcher.n_pending == 0


def test_default_hosts_are_accepted(model, tok):
    server = make_server(model, tok)
    for host in ("127.0.0.1:8000", "localhost:8000", "LOCALHOST:8000", "[::1]:8000", "localhost", "127.0.0.1"):
        assert send(server.app, "GET", "/v1/models", {"Host": host}).status_code == 200, host


def test_bound_host_and_wildcard_bind(model, tok):
    named = make_server(model, tok, host="box.lan", port=9000)
    assert send(named.app, "GET", "/v1/models", {"Host": "box.lan:9000", "Origin": "http://box.lan:9000"}).status_code == 200
    assert send(named.app, "GET", "/v1/models", {"Host": "box.lan:8000"}).status_code == 421  # not its port
    assert send(named.app, "GET", "/v1/models", {"Host": "127.0.0.1:9000"}).status_code == 200
    wild = make_server(model, tok, host="0.0.0.0")
    # bound everywhere: any address of the machine is ours (an IP literal cannot be rebound), names are not
    assert send(wild.app, "GET", "/v1/models", {"Host": "192.168.1.5:8000",
                                                "Origin": "http://192.168.1.5:8000"}).status_code == 200
    assert send(wild.app, "GET", "/v1/models", {"Host": "evil.example:8000"}).status_code == 421
    assert send(wild.app, "GET", "/v1/models", {"Host": "[::1]:8000"}).status_code == 200


def test_allow_list_admits_configured_hosts_and_origins(running):
    server = running(allowed_hosts=("chat.example.com", "proxy.lan:8443"), allowed_origins=("https://ui.example.org",))
    ok = [({"Host": "chat.example.com"}, "POST"),
          ({"Host": "chat.example.com:8000", "Origin": "http://chat.example.com:8000"}, "POST"),  # its own page
          ({"Host": "proxy.lan:8443"}, "GET"),
          ({"Host": "chat.example.com", "Origin": "https://chat.example.com"}, "GET"),  # behind a TLS proxy
          ({"Origin": "https://ui.example.org"}, "POST"),
          ({"Origin": "https://ui.example.org:443"}, "GET")]
    for headers, method in ok:
        r = send(server.app, method, "/v1/chat/completions" if method == "POST" else "/v1/models", headers)
        assert r.status_code == 200, (headers, r.text)
    for headers, code in [({"Host": "proxy.lan:8444"}, 421), ({"Host": "evil.example:8000"}, 421),
                          ({"Origin": "http://ui.example.org"}, 403),  # another scheme is another origin
                          ({"Host": "chat.example.com", "Origin": "https://other.example.com"}, 403),
                          ({"Host": "chat.example.com:8000", "Origin": "http://chat.example.com:9000"}, 403)]:
        assert send(server.app, "GET", "/v1/models", headers).status_code == code, headers


def test_star_turns_each_check_off(model, tok):
    hosts = make_server(model, tok, allowed_hosts=("*",))
    assert send(hosts.app, "GET", "/v1/models", {"Host": "evil.example:8000"}).status_code == 200
    # with the Host check off, "Origin equals Host" proves nothing: a rebinding page's origin is still refused
    assert send(hosts.app, "GET", "/v1/models", {"Host": "evil.example:8000",
                                                 "Origin": "http://evil.example:8000"}).status_code == 403
    origins = make_server(model, tok, allowed_origins=("*",))
    assert send(origins.app, "GET", "/v1/models", {"Origin": "http://evil.example"}).status_code == 200
    assert send(origins.app, "GET", "/v1/models", {"Host": "evil.example:8000"}).status_code == 421
    r = send(origins.app, "POST", "/v1/chat/completions", {"Origin": "http://evil.example"}, content_type="text/plain")
    assert r.status_code == 415  # the content-type rule has no off switch


def test_duplicate_host_or_origin_headers_are_refused(model, tok):
    server = make_server(model, tok)

    async def go(headers):
        transport = httpx.ASGITransport(app=server.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url=URL) as c:
            return await c.get("/v1/models", headers=httpx.Headers(headers))
    assert asyncio.run(go([("Origin", "http://127.0.0.1:8000"), ("Origin", "http://evil.example")])).status_code == 400


def test_bad_allow_list_entries_are_config_errors(model, tok):
    from nanoseek.engine.server import RequestPolicy, ServeConfig
    with pytest.raises(ConfigError, match="--allowed-host 'http://a.example'"):
        RequestPolicy.of(ServeConfig(allowed_hosts=("http://a.example",)))
    with pytest.raises(ConfigError, match="--allowed-origin 'a.example'"):
        RequestPolicy.of(ServeConfig(allowed_origins=("a.example",)))


# ---- keys: several, a key file, each a client -------------------------------------------------------------
def test_several_keys_each_work_and_others_are_refused(model, tok):
    server = make_server(model, tok, api_keys=(KEY_A, KEY_B))
    for key in (KEY_A, KEY_B):
        assert send(server.app, "GET", "/v1/models", {"Authorization": f"Bearer {key}"}).status_code == 200
    for h in ({"Authorization": "Bearer sk-other"}, {"Authorization": f"Bearer {KEY_A}x"}, {}):
        error(send(server.app, "GET", "/v1/models", h), 401, "invalid_api_key")
    assert send(server.app, "GET", "/", {}).status_code == 200  # the page stays public


def cli_args(**kw) -> argparse.Namespace:
    from nanoseek.commands.serve import add_arguments
    p = argparse.ArgumentParser()
    add_arguments(p)
    argv = ["--run", "r"]
    for k, v in kw.items():
        for x in (v if isinstance(v, list) else [v]):
            argv += [f"--{k.replace('_', '-')}", x]
    return p.parse_args(argv)


def test_api_key_flags_file_and_env(tmp_path, monkeypatch):
    from nanoseek.commands.serve import api_keys
    monkeypatch.setenv("NANOSEEK_API_KEY", "sk-env")
    assert api_keys(cli_args()) == ("sk-env",)
    assert api_keys(cli_args(api_key=["sk-1", "sk-2", "sk-1"])) == ("sk-1", "sk-2")  # the flag wins over $
    f = tmp_path / "keys"
    f.write_text("# team keys\nsk-f1\n\n  sk-f2  \nsk-1\n")
    assert api_keys(cli_args(api_key=["sk-1"], api_key_file=str(f))) == ("sk-1", "sk-f1", "sk-f2")
    monkeypatch.delenv("NANOSEEK_API_KEY")
    assert api_keys(cli_args(api_key=[""])) == ()
    (tmp_path / "empty").write_text("# nothing\n\n")
    for bad, match in [(cli_args(api_key_file=str(tmp_path / "empty")), "holds no key"),
                       (cli_args(api_key_file=str(tmp_path / "missing")), "cannot read it"),
                       (cli_args(api_key=["sk with space"]), "number 1"),
                       (cli_args(api_key=["sk-é"]), "printable ASCII")]:
        with pytest.raises(ConfigError, match=match):
            api_keys(bad)
    (tmp_path / "spaced").write_text("sk-ok\nsk bad\n")
    with pytest.raises(ConfigError, match="line 2") as e:
        api_keys(cli_args(api_key_file=str(tmp_path / "spaced")))
    assert "sk bad" not in str(e.value)  # a key is never echoed


def test_cli_refuses_bad_flags_before_reading_the_run(tmp_path, capsys):
    from nanoseek.cli import main
    missing = str(tmp_path / "missing")
    for argv, match in [(["--allowed-origin", "evil"], "--allowed-origin 'evil'"),
                        (["--allowed-host", "a b"], "--allowed-host 'a b'"),
                        (["--api-key-file", str(tmp_path / "nokeys")], "--api-key-file")]:
        assert main(["serve", "--run", missing, *argv]) == 2
        out = capsys.readouterr()
        assert match in out.err + out.out
    assert main(["serve", "--run", missing, "--host", "0.0.0.0", "--api-key", "", "--api-key", ""]) == 2
    assert "--insecure" in "".join(capsys.readouterr())


# ---- fairness per key, same address -------------------------------------------------------------------------
async def wait_for(cond, what: str, timeout: float = 10) -> None:
    for _ in range(int(timeout / 0.01)):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def flood_then_one(server, key_a: str | None, key_b: str | None, client_limit: int) -> dict:
    """Client A (key_a) takes all 4 rows, then queues 6 more requests; client B (key_b), from the same address,
    sends one short request after them (and after A's 7th). Then rows free one at a time (A's requests are cancelled, as if they
    ended) and each step admits one waiting request. Returns B's status, A's status for a 7th waiting request,
    and after how many freed rows B got one (None: not within 8). The batcher is stepped here, by hand."""
    b = server.batcher
    b.reserve_slots = 0  # every free row goes by the round-robin turn (the reserve is tested in test_server.py)
    server.cfg.max_client_waiting = client_limit

    def body(key: str | None, tokens: int) -> tuple[dict, dict]:
        return ({**CHAT, "max_tokens": tokens, "ignore_eos": True},
                {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})})

    async def go() -> dict:
        transport = httpx.ASGITransport(app=server.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url=URL, timeout=30) as c:
            def post(key, tokens):
                payload, headers = body(key, tokens)
                return asyncio.ensure_future(c.post("/v1/chat/completions", json=payload, headers=headers))

            tasks = [post(key_a, 40) for _ in range(4)]
            await wait_for(lambda: b.n_pending == 4, "A's first four requests")
            b.step()
            assert b.n_active == 4 and b.n_pending == 0
            tasks += [post(key_a, 40) for _ in range(6)]
            await wait_for(lambda: b.n_pending == 10 - 4, "A's six waiting requests")
            extra_a = post(key_a, 40)  # A's 7th waiting request: over a limit of 6
            await wait_for(lambda: extra_a.done() or b.n_pending == 7, "A's 7th request")
            queued = b.n_pending
            b_task = post(key_b, 3)
            await wait_for(lambda: b_task.done() or b.n_pending == queued + 1, "B's request")
            out = {"a_extra": extra_a.result().status_code if extra_a.done() else "queued",
                   "b": b_task.result().status_code if b_task.done() else "queued", "b_admitted_after": None}
            if out["b"] == "queued":
                for k in range(1, 9):
                    b.cancel(next(r for r in b.rows if r.max_new_tokens == 40))
                    b.step()
                    if any(r.max_new_tokens == 3 for r in b.rows):
                        out["b_admitted_after"] = k
                        break
            for t in tasks + [extra_a, b_task]:
                t.cancel()
            await asyncio.gather(*tasks, extra_a, b_task, return_exceptions=True)
            return out
    return asyncio.run(go())


def test_a_flood_from_one_key_does_not_starve_another_key_on_the_same_address(model, tok):
    keyed = flood_then_one(make_server(model, tok, api_keys=(KEY_A, KEY_B)), KEY_A, KEY_B, client_limit=100)
    # round-robin between the two keys: A's queue re-entered the turn first, so A takes the first freed row and
    # B the second, although seven of A's requests were queued before B's
    assert keyed["a_extra"] == "queued" and keyed["b"] == "queued" and keyed["b_admitted_after"] == 2, keyed
    # the control: the same traffic without keys is one client (one address), and B waits behind all seven of
    # A's queued requests (8th freed row): the scenario does starve B when clients are told apart by address
    plain = flood_then_one(make_server(model, tok), None, None, client_limit=100)
    assert plain["b"] == "queued" and plain["b_admitted_after"] == 8, plain


def test_per_client_429_counts_per_key(model, tok):
    keyed = flood_then_one(make_server(model, tok, api_keys=(KEY_A, KEY_B)), KEY_A, KEY_B, client_limit=6)
    assert keyed["a_extra"] == 429 and keyed["b"] == "queued", keyed  # A is at its limit, B is not
    plain = flood_then_one(make_server(model, tok), None, None, client_limit=6)
    assert plain["a_extra"] == 429 and plain["b"] == 429, plain  # one address: B pays for A's flood


def test_serve_binds_the_configured_address_and_ignores_forwarded_for(model, tok, monkeypatch):
    """uvicorn trusts X-Forwarded-For from 127.0.0.1 unless told not to: a local flooder could then be a new
    client (a fresh fair share and 429 budget) with every request."""
    import uvicorn

    from nanoseek.engine.server import serve
    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(kw))
    serve(make_server(model, tok, host="::1", port=8123))
    assert seen["host"] == "::1" and seen["port"] == 8123 and seen["proxy_headers"] is False


def test_the_reserve_rows_stay_free_for_another_key_even_when_the_flood_is_short(model, tok):
    """4 rows, 1 in reserve. Key A sends 4 short requests (within the express lane's budget); with keys the
    reserve row is kept for a client that holds few rows, and key B's later request gets it at once. The
    control, one address and no keys: the express lane gives the reserve to A's short requests too."""
    def admitted(server, key_a, key_b) -> tuple[int, bool]:
        b = server.batcher

        async def go():
            transport = httpx.ASGITransport(app=server.app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url=URL, timeout=30) as c:
                def post(key, tokens):
                    h = {"Authorization": f"Bearer {key}"} if key else {}
                    return asyncio.ensure_future(c.post("/v1/chat/completions", headers=h,
                                                        json={**CHAT, "max_tokens": tokens, "ignore_eos": True}))
                tasks = [post(key_a, 40) for _ in range(4)]  # 4: the per-client waiting limit
                await wait_for(lambda: b.n_pending == 4, "A's requests")
                b.step()
                a_rows = b.n_active
                tasks.append(post(key_b, 3))
                await wait_for(lambda: b.n_pending == 4 - a_rows + 1, "B's request")
                b.step()
                b_in = any(r.max_new_tokens == 3 for r in b.rows)
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                return a_rows, b_in
        return asyncio.run(go())

    keyed = make_server(model, tok, api_keys=(KEY_A, KEY_B))
    assert keyed.batcher.reserve_slots == 1
    assert admitted(keyed, KEY_A, KEY_B) == (3, True)
    plain = make_server(model, tok)
    assert 40 <= plain.batcher.express_tokens  # A's requests are express-sized: the control means something
    assert admitted(plain, None, None) == (4, False)
