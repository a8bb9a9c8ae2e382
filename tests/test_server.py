"""`nanoseek serve` end to end: the official openai client against a live server (a subprocess on a random
localhost port, with an API key) over a tiny model trained here for a few seconds to write
<think>..</think><answer>..</answer>; the error shapes; disconnects and slow clients; admission control
(choice cap, 429, fair share); logprobs; 32 concurrent streaming clients against the same requests run one
after another; the chat page in headless Chromium; the CSRF / DNS-rebinding guard on the live socket. Unit tests of the text side (template, thinking split,
incremental detokenization and stop strings against naive re-decoding references) and in-process tests of
the app (5xx, 429, --insecure) come first. Throughput figures live in bench/serve_load.py and
bench/serve_soak.py, not here."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from requires import require, require_binary

from nanoseek.config import ConfigError, ModelConfig
from nanoseek.corpus import corpus_texts
from nanoseek.engine import Engine
from nanoseek.engine.protocol import MAX_STOP_CHARS, APIError, ChatRequest, ChoiceStream, Message, chat_prompt_ids, parse
from nanoseek.model import Transformer
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.checkpoint import save_checkpoint

openai = require("openai")
require("fastapi")
require("uvicorn")

KEY = "sk-test-nanoseek"
REPO = Path(__file__).resolve().parent.parent
OUT_DIR = Path(os.environ.get("NANOSEEK_TEST_OUTPUT", REPO / "tmp" / "test-output"))


# ---- fixtures ------------------------------------------------------------------------------------------
def train_tiny_run(run: Path, steps: int = 150) -> None:
    """A run directory whose model has seen the reasoning format (a few seconds of next-token training)."""
    texts = corpus_texts("arithmetic", 300, seed=0)
    tok = Tokenizer.train(texts, vocab_size=300)
    tok.save(run / "tokenizer.json")
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=48, inter_dim=96, moe_inter_dim=48, n_layers=2,
                      n_dense_layers=1, n_heads=2, n_routed_experts=4, n_activated_experts=2, kv_lora_rank=16,
                      qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, max_seq_len=128, original_seq_len=128)
    model = Transformer(cfg)
    docs = [tok.encode(t) for t in texts]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    T, B = 64, 16
    for _ in range(steps):
        ids = torch.full((B, T), tok.pad_id)
        tgt = torch.full((B, T), -1)
        for i, j in enumerate(torch.randint(len(docs), (B,), generator=g).tolist()):
            d = docs[j][:T + 1]
            ids[i, :len(d) - 1] = torch.tensor(d[:-1])
            tgt[i, :len(d) - 1] = torch.tensor(d[1:])
        _, parts = model(ids, tgt)
        opt.zero_grad()
        parts.main.backward()
        opt.step()
    (run / "config.json").write_text(json.dumps({"model": cfg.to_dict()}))
    save_checkpoint(run / "checkpoints", 1, model.eval(), None, {})


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("tiny")
    train_tiny_run(run)
    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(run: Path, name: str):
    """`nanoseek serve` on a free localhost port as a subprocess (log in the run folder); yields its URL."""
    port = free_port()
    log = (run / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "nanoseek.cli", "serve", "--run", str(run), "--port", str(port),
                             "--api-key", KEY, "--model-name", name], stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    try:
        while True:
            try:
                if httpx.get(f"{url}/health", headers=auth(), timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail("server did not start:\n" + (run / "serve.log").read_text()[-3000:])
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def server(run_dir):
    with serving(run_dir, "tiny") as url:
        yield url


@pytest.fixture(scope="module")
def preset_server(run_dir, tmp_path_factory):
    """The `tiny` preset's shape with random weights (no training needed): what the load test serves."""
    run = tmp_path_factory.mktemp("preset")
    shutil.copy(run_dir / "tokenizer.json", run / "tokenizer.json")
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny", vocab_size=Tokenizer.load(run).vocab_size))
    for p in model.parameters():
        if p.dim() > 1:
            p.data.normal_(0, 0.05)
    (run / "config.json").write_text(json.dumps({"model": model.cfg.to_dict()}))
    save_checkpoint(run / "checkpoints", 1, model, None, {})
    with serving(run, "tiny") as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tok(run_dir) -> Tokenizer:
    return Tokenizer.load(run_dir / "tokenizer.json")


@pytest.fixture(scope="module")
def engine(run_dir, tok) -> Engine:
    from nanoseek.train.checkpoint import load_run_model
    return Engine(load_run_model(run_dir)[0], tokenizer=tok)


def auth() -> dict:
    return {"Authorization": f"Bearer {KEY}"}


def health(url: str) -> dict:
    return httpx.get(f"{url}/health", headers=auth(), timeout=5).json()


# ---- the text side ----------------------------------------------------------------------------------------
def test_chat_template_extends_prompt_ids(tok):
    one = chat_prompt_ids(tok, [Message(role="user", content="Compute 1 + 2.")])
    assert one == tok.prompt_ids("Compute 1 + 2.")
    msgs = [Message(role="system", content="Be brief."), Message(role="user", content="hi"),
            Message(role="assistant", content="3"), Message(role="user", content="x")]
    multi = chat_prompt_ids(tok, msgs)
    # a previous assistant turn ends with eos, as multi-turn SFT trains it (Tokenizer.chat_document)
    assert tok.decode(multi) == "<|bos|><|system|>Be brief.<|user|>hi<|assistant|>3<|eos|><|user|>x<|assistant|>"
    assert multi == tok.chat_ids([{"role": m.role, "content": m.content} for m in msgs])


def feed_all(stream: ChoiceStream, text: str, tok: Tokenizer, finish: str = "stop") -> dict[str, str]:
    ids = tok.encode(text)
    got: dict[str, str] = {}
    for k, t in enumerate(ids):
        for name, d in stream.feed(t, finish if k == len(ids) - 1 else None).items():
            got[name] = got.get(name, "") + d
    return got


def test_thinking_goes_to_reasoning_content_and_answer_to_content(tok):
    s = ChoiceStream(tok, chat=True)
    got = feed_all(s, "<think>2*3=6. 6+1=7.</think><answer>7</answer><|eos|>", tok)
    assert got == {"reasoning_content": "2*3=6. 6+1=7.", "content": "7"}
    assert s.text("reasoning_content") == "2*3=6. 6+1=7." and s.text("content") == "7"
    assert s.n_tokens == len(tok.encode("<think>2*3=6. 6+1=7.</think><answer>7</answer><|eos|>"))
    raw = ChoiceStream(tok, chat=False)
    assert feed_all(raw, "<think>a</think><answer>7</answer><|eos|>", tok) == \
        {"text": "<think>a</think><answer>7</answer>"}


def test_stop_string_cuts_text_and_nothing_past_it_is_sent(tok):
    s = ChoiceStream(tok, chat=False, stop=["=6"])
    text = "2*3=6. 6+1=7."
    ids = tok.encode(text)
    sent = ""
    for t in ids:
        sent += s.feed(t).get("text", "")
        assert "=" not in sent[len("2*3"):] or sent == "2*3"  # "=" is held back until it cannot start "=6"
        if s.finish_reason:
            break
    assert s.finish_reason == "stop" and sent == "2*3" and s.text("text") == "2*3"


def test_unfinished_utf8_is_held_back(tok):
    s = ChoiceStream(tok, chat=False)
    ids = tok.encode("é!")  # byte-level: 'é' is two bytes, maybe two tokens
    parts = [s.feed(t, "length" if k == len(ids) - 1 else None).get("text", "") for k, t in enumerate(ids)]
    assert "".join(parts) == "é!" and all("\ufffd" not in p for p in parts)


CONTROL = ("<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>")


def naive_raw_completion(tok: Tokenizer, ids: list[int], stops: list[str]) -> tuple[str, str]:
    """The reference: re-decode everything after each token and look for the stop strings in the whole text
    (quadratic, obviously right). Returns (text, finish reason)."""
    control = {tok.id_of(t) for t in CONTROL}
    kept: list[int] = []
    for t in ids:
        if t not in control:
            kept.append(t)
        text = tok.decode(kept)
        hits = [text.find(s) for s in stops if s in text]
        if hits:
            return text[:min(hits)], "stop"
    return tok.decode(kept), "length"


def stream_raw(tok: Tokenizer, ids: list[int], stops: list[str]) -> tuple[str, str, ChoiceStream]:
    s = ChoiceStream(tok, chat=False, stop=stops)
    sent = ""
    for k, t in enumerate(ids):
        sent += s.feed(t, "length" if k == len(ids) - 1 else None).get("text", "")
        if s.finish_reason:
            break
    assert s.finish_reason is not None and (s.text("text") or "") == sent
    return sent, s.finish_reason, s


def test_incremental_detokenization_equals_full_decode_on_random_tokens(tok):
    rng = random.Random(0)
    multi = "é€日本𝄞ß"
    for trial in range(400):
        if trial % 2:
            ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 60))]  # invalid UTF-8 too
        else:
            ids = tok.encode("".join(rng.choice("12+=*. ab" + multi) for _ in range(rng.randrange(1, 40))))
        sent, finish, _ = stream_raw(tok, ids, [])
        assert (sent, finish) == naive_raw_completion(tok, ids, []), ids


def test_stop_strings_match_incrementally_like_a_full_rescan(tok):
    rng = random.Random(1)
    alphabet = "12+= aé€"
    for _ in range(600):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 40)))
        ids = tok.encode(text)
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 5))) for _ in range(rng.randrange(1, 5))]
        if rng.random() < 0.3:  # a stop that straddles token boundaries for sure
            i = rng.randrange(len(text))
            stops[0] = text[i:i + rng.randrange(2, 6)] or stops[0]
        sent, finish, _ = stream_raw(tok, ids, stops)
        assert (sent, finish) == naive_raw_completion(tok, ids, stops), (text, stops)


def test_detokenization_work_per_token_does_not_grow_with_the_text(tok, monkeypatch):
    """The old stream re-decoded every token so far at each step (quadratic): count what reaches decode."""
    decoded = [0]
    real = tok.decode

    def counting(ids, *a, **kw):
        ids = list(ids)
        decoded[0] += len(ids)
        return real(ids, *a, **kw)

    monkeypatch.setattr(tok, "decode", counting)
    monkeypatch.setattr(tok._tok, "decode", lambda ids, *a, **kw: (decoded.__setitem__(0, decoded[0] + len(ids)),
                                                                    type(tok._tok).decode(tok._tok, ids, *a, **kw))[1])
    ids = tok.encode("12 + 34 = 46. " * 150)
    stops = ["z" * MAX_STOP_CHARS, "9" * MAX_STOP_CHARS, "y" * 999, "1 + 1 + 1 + " * 80]
    sent, finish, s = stream_raw(tok, ids, stops)
    assert finish == "length" and sent == real(ids)
    assert decoded[0] <= len(ids), f"{decoded[0]} token decodes for {len(ids)} tokens"


def test_stop_strings_are_capped_in_count_and_length():
    base = {"messages": [{"role": "user", "content": "hi"}]}
    assert parse(ChatRequest, {**base, "stop": ["x" * MAX_STOP_CHARS] * 4}).stops
    for stop, words in [(["x" * (MAX_STOP_CHARS + 1)], f"at most {MAX_STOP_CHARS} characters"),
                        ("x" * 250_000, f"at most {MAX_STOP_CHARS} characters"),
                        (["a", "b", "c", "d", "e"], "at most 4")]:
        with pytest.raises(APIError) as e:
            parse(ChatRequest, {**base, "stop": stop})
        assert e.value.status == 400 and e.value.param == "stop" and words in e.value.message


def test_raw_completion_hides_control_tokens_but_keeps_reasoning_tags(tok):
    ids = tok.encode("<|assistant|>7<think>a</think><|user|><answer>7</answer><|pad|>") + [tok.eos_id]
    s = ChoiceStream(tok, chat=False)
    got = feed_all_ids(s, ids)
    assert got == {"text": "7<think>a</think><answer>7</answer>"} and s.text("text") == got["text"]


def feed_all_ids(stream: ChoiceStream, ids: list[int]) -> dict[str, str]:
    got: dict[str, str] = {}
    for k, t in enumerate(ids):
        for name, d in stream.feed(t, "stop" if k == len(ids) - 1 else None).items():
            got[name] = got.get(name, "") + d
    return got


# ---- the app in process (no batcher thread: a request that would be queued never returns) -------------------
@pytest.fixture
def app_server(tok):
    from nanoseek.engine.server import ServeConfig, Server
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=32, inter_dim=64, moe_inter_dim=32, n_layers=2,
                      n_dense_layers=1, n_heads=2, n_routed_experts=4, n_activated_experts=2, kv_lora_rank=16,
                      qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, max_seq_len=64, original_seq_len=64)
    return Server(Transformer(cfg), tok, ServeConfig(model_name="tiny", max_slots=2, max_waiting=3))


def asgi_post(app, path: str, body: dict, timeout: float = 10) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as c:
            return await asyncio.wait_for(c.post(path, json=body), timeout)
    return asyncio.run(go())


def test_server_error_is_logged_with_its_details_and_answered_generically(app_server, monkeypatch, caplog):
    def broken(prompt):
        raise RuntimeError("secret detail /srv/weights")

    monkeypatch.setattr(app_server, "_completion_prompts", broken)
    with caplog.at_level(logging.ERROR, logger="nanoseek.serve"):
        r = asgi_post(app_server.app, "/v1/completions", {"prompt": "1 + 1"})
    assert r.status_code == 500
    err = r.json()["error"]
    assert err["type"] == "server_error" and err["message"]
    assert "secret" not in r.text and "RuntimeError" not in r.text
    logged = [rec for rec in caplog.records if rec.name == "nanoseek.serve" and rec.exc_info]
    assert logged and "secret detail" in str(logged[0].exc_info[1]) and "/v1/completions" in logged[0].getMessage()


def test_full_waiting_queue_gets_429_with_retry_after(app_server):
    from nanoseek.engine.batcher import Request
    for _ in range(3):  # max_waiting=3 choices already wait (the batcher is not running)
        app_server.batcher.submit(Request([1, 2, 3], 4))
    r = asgi_post(app_server.app, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 429, r.text
    assert int(r.headers["retry-after"]) >= 1
    assert r.json()["error"]["code"] == "rate_limit_exceeded" and "busy" in r.json()["error"]["message"]
    assert app_server.batcher.n_pending == 3  # nothing was queued


def test_one_client_with_too_many_waiting_requests_gets_429(app_server):
    from nanoseek.engine.batcher import Request
    app_server.cfg.max_waiting, app_server.cfg.max_client_waiting = 100, 2
    for g in range(2):  # the ASGI test client's address is 127.0.0.1
        app_server.batcher.submit(Request([1, 2, 3], 4, client="127.0.0.1", group=g))
    app_server.batcher.submit(Request([1, 2, 3], 4, client="10.0.0.9", group="other"))
    r = asgi_post(app_server.app, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 429 and "your requests" in r.json()["error"]["message"], r.text


def test_a_body_that_trickles_in_gets_408(app_server):
    app_server.cfg.body_timeout_s = 0.3

    async def go():
        async def trickle():
            yield b'{"messages": '
            await asyncio.sleep(5)  # a slowloris body
            yield b"[]}"

        transport = httpx.ASGITransport(app=app_server.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as c:
            return await asyncio.wait_for(c.post("/v1/chat/completions", content=trickle(),
                                                 headers={"Content-Type": "application/json"}), 3)

    r = asyncio.run(go())
    assert r.status_code == 408 and "did not arrive within 0.3 s" in r.json()["error"]["message"]


def test_too_many_choices_in_one_request_is_refused_before_any_work(app_server):
    body = {"prompt": ["<|bos|><|user|>Compute 1 + 2.<|assistant|>"] * 5000, "n": 16, "max_tokens": 5}
    r = asgi_post(app_server.app, "/v1/completions", body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "n" and "80000 choices" in err["message"] and "limit is 64" in err["message"]
    assert app_server.batcher.n_pending == 0


def test_non_loopback_bind_needs_an_api_key_or_insecure(tmp_path, capsys):
    from nanoseek.cli import main
    from nanoseek.commands.serve import check_exposure, is_loopback
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.5", "example.com"))
    with pytest.raises(ConfigError, match="--insecure"):
        check_exposure("0.0.0.0", None, False)
    check_exposure("0.0.0.0", "KEY", False)
    check_exposure("0.0.0.0", None, True)
    check_exposure("127.0.0.1", None, False)
    # refused before the run directory is even read
    assert main(["serve", "--run", str(tmp_path / "missing"), "--host", "0.0.0.0", "--api-key", ""]) == 2
    err = capsys.readouterr().err + capsys.readouterr().out
    assert "--insecure" in err and "API key" in err


# ---- API through the official client ------------------------------------------------------------------
def test_models_and_health(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    h = health(server)
    assert h["status"] == "ok" and h["max_slots"] == 32 and h["context"] == 128


def test_chat_non_streaming_matches_engine_and_splits_thinking(client, engine, tok):
    q = "Compute 12 + 7."
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": q}], temperature=0,
                                       max_tokens=40)
    ref = engine.generate([tok.prompt_ids(q)], max_new_tokens=40)[0]
    s = ChoiceStream(tok, chat=True)
    for k, t in enumerate(ref.tokens):
        s.feed(t, ref.finish_reason if k == len(ref.tokens) - 1 else None)
    msg = r.choices[0].message
    assert msg.role == "assistant"
    assert msg.content == (s.text("content") or "")
    assert msg.reasoning_content == s.text("reasoning_content")
    assert msg.reasoning_content  # the trained model opens with <think>
    assert r.choices[0].finish_reason == ref.finish_reason
    assert r.usage.prompt_tokens == len(tok.prompt_ids(q))
    assert r.usage.completion_tokens == len(ref.tokens)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_streaming_equals_non_streaming(client):
    kw = {"model": "tiny", "messages": [{"role": "user", "content": "Compute 3 * 4 - 5."}], "temperature": 0,
          "max_tokens": 48}
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    assert content == full.choices[0].message.content
    assert reasoning == full.choices[0].message.reasoning_content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [full.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert sum(1 for c in chunks if c.choices) > 3  # it really streamed


def test_completions_raw_text_and_streaming(client, engine, tok):
    prompt = "<|bos|><|user|>Compute 8 - 3.<|assistant|>"
    r = client.completions.create(model="tiny", prompt=prompt, temperature=0, max_tokens=30)
    ref = engine.generate([tok.encode(prompt)], max_new_tokens=30)[0]
    assert r.choices[0].text == ref.text
    assert r.usage.prompt_tokens == len(tok.encode(prompt)) and r.usage.completion_tokens == len(ref.tokens)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt=prompt, temperature=0, max_tokens=30, stream=True) if c.choices)
    assert streamed == r.choices[0].text


def test_sampling_n_seed_stop_and_max_tokens(client):
    msgs = [{"role": "user", "content": "Compute 9 + 9."}]
    a = client.chat.completions.create(model="tiny", messages=msgs, temperature=1.0, top_p=0.9, seed=7, n=3,
                                       max_tokens=20)
    b = client.chat.completions.create(model="tiny", messages=msgs, temperature=1.0, top_p=0.9, seed=7, n=3,
                                       max_tokens=20)
    texts = [(c.message.reasoning_content, c.message.content) for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert texts == [(c.message.reasoning_content, c.message.content) for c in b.choices]  # same seed, same
    assert len(set(texts)) > 1  # choices use different seeds
    short = client.completions.create(model="tiny", prompt="<|bos|><|user|>Compute 1 + 1.<|assistant|>",
                                      temperature=0, max_tokens=3, extra_body={"ignore_eos": True})
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"
    free = client.completions.create(model="tiny", prompt="<|bos|><|user|>Compute 1 + 1.<|assistant|>",
                                     temperature=0, max_tokens=30).choices[0].text
    stop = free[8:10]
    cut = client.completions.create(model="tiny", prompt="<|bos|><|user|>Compute 1 + 1.<|assistant|>",
                                    temperature=0, max_tokens=30, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == free[:free.find(stop)]


def test_completions_logprobs_in_openai_format(client):
    prompt = "<|bos|><|user|>Compute 8 - 3.<|assistant|>"
    kw = {"model": "tiny", "prompt": prompt, "temperature": 0, "max_tokens": 16, "logprobs": 3}
    r = client.completions.create(**kw)
    c = r.choices[0]
    lp = c.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == \
        r.usage.completion_tokens
    assert "".join(lp.tokens) == c.text  # eos shows as ""
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(lp.tokens))]
    for value, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert value <= 0 and 1 <= len(top) <= 3
        assert value == pytest.approx(max(top.values()), abs=1e-5)  # greedy picks the most likely token
    streamed = [ch.choices[0].logprobs for ch in client.completions.create(stream=True, **kw) if ch.choices]
    assert sum((x.tokens for x in streamed if x), []) == lp.tokens
    assert sum((x.token_logprobs for x in streamed if x), []) == pytest.approx(lp.token_logprobs, abs=1e-6)
    assert client.completions.create(**{**kw, "logprobs": None}).choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError):
        client.completions.create(**{**kw, "logprobs": 6})


def test_one_huge_request_is_refused_and_the_server_keeps_serving(server, client):
    prompts = ["<|bos|><|user|>Compute 1 + 2.<|assistant|>"] * 5000
    r = raw_post(server, {"model": "tiny", "prompt": prompts, "n": 16, "max_tokens": 5}, path="/v1/completions")
    assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text
    assert health(server)["pending"] == 0
    stop = raw_post(server, {"messages": [{"role": "user", "content": "hi"}], "stop": ["x" * 250_000] * 4})
    assert stop.status_code == 400 and stop.json()["error"]["param"] == "stop"
    ok = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Compute 1."}],
                                        temperature=0, max_tokens=5)
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_a_small_request_is_not_queued_behind_a_big_one(server):
    """64 choices x 100 tokens need three rounds of rows; a one-choice request sent after them (from the same
    address) gets the next free row, round-robin between requests, so it ends long before the big one. First
    come, first served would run it only after the big request's last row."""
    wait_idle(server)
    big_body = {"model": "tiny", "prompt": ["<|bos|><|user|>Compute 1 + 2.<|assistant|>"] * 4, "n": 16,
                "max_tokens": 100, "ignore_eos": True, "temperature": 0, "stream": True}
    order: list[str] = []

    def big() -> None:
        with httpx.stream("POST", f"{server}/v1/completions", json=big_body, headers=auth(), timeout=120) as r:
            assert r.status_code == 200
            for _ in r.iter_lines():
                pass
        order.append("big")

    t = threading.Thread(target=big)
    t.start()
    deadline = time.time() + 30
    while health(server)["active"] < 16:
        assert time.time() < deadline
        time.sleep(0.01)
    small = raw_post(server, {"model": "tiny", "messages": [{"role": "user", "content": "Compute 2."}],
                              "max_tokens": 5, "ignore_eos": True, "temperature": 0}, timeout=120)
    order.append("small")
    t.join(120)
    assert small.status_code == 200 and small.json()["usage"]["completion_tokens"] == 5
    assert order == ["small", "big"]


# ---- errors -------------------------------------------------------------------------------------------------
def raw_post(url: str, body, headers=None, path="/v1/chat/completions", timeout: float = 30) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(url + path, content=content, timeout=timeout,
                      headers={"Content-Type": "application/json", **(auth() if headers is None else headers)})


@pytest.mark.parametrize("body,status,param,code", [
    (b"{not json", 400, None, None),
    ({"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, 404, "model", "model_not_found"),
    ({"model": "tiny"}, 400, "messages", None),
    ({"messages": []}, 400, "messages", None),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role", None),
    ({"messages": [{"role": "user", "content": "1 + " * 200}]}, 400, "messages", "context_length_exceeded"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 500}, 400, "max_tokens",
     "context_length_exceeded"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 5}, 400, "temperature", None),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, "top_p", None),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens", None),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 99}, 400, "n", None),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", None),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ["a" * 1001]}, 400, "stop", None),
    ([1, 2, 3], 400, None, None),
])
def test_bad_input_gets_openai_error_shape(server, body, status, param, code):
    r = raw_post(server, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] == "invalid_request_error"
    assert err["param"] == param and err["code"] == code


def test_oversized_body_auth_and_routes(server):
    big = json.dumps({"messages": [{"role": "user", "content": "x" * (2 << 20)}]})
    assert raw_post(server, big).status_code == 413
    r = raw_post(server, {"messages": [{"role": "user", "content": "hi"}]}, headers={})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert raw_post(server, {"messages": [{"role": "user", "content": "hi"}]},
                    headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(f"{server}/health").status_code == 401
    assert httpx.get(f"{server}/").status_code == 200  # the page itself is static and public
    nf = httpx.get(f"{server}/v1/nothing", headers=auth())
    assert nf.status_code == 404 and "error" in nf.json()
    assert httpx.get(f"{server}/v1/chat/completions", headers=auth()).status_code == 405
    assert raw_post(server, {"prompt": ""}, path="/v1/completions").status_code == 400
    assert health(server)["status"] == "ok"  # still serving


def test_browser_attacks_are_refused_on_the_live_socket(server):
    """CSRF and DNS rebinding through uvicorn (the cases one by one: tests/test_server_security.py)."""
    port = server.rsplit(":", 1)[1]
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}
    before = health(server)["prefill_tokens"]
    assert raw_post(server, body, headers={**auth(), "Content-Type": "text/plain"}).status_code == 415
    assert raw_post(server, body, headers={**auth(), "Origin": "http://evil.example"}).status_code == 403
    rebound = {**auth(), "Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"}
    assert raw_post(server, body, headers=rebound).status_code == 421
    assert httpx.get(f"{server}/", headers={"Host": f"evil.example:{port}"}).status_code == 421
    assert health(server)["prefill_tokens"] == before  # none of them reached the model
    for headers in ({"Origin": server}, {"Host": f"localhost:{port}", "Origin": f"http://localhost:{port}"}, {}):
        assert raw_post(server, body, headers={**auth(), **headers}).status_code == 200, headers


def test_official_client_raises_typed_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], temperature=3)
    assert e.value.body["param"] == "temperature"
    bad = openai.OpenAI(base_url=client.base_url, api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


# ---- disconnects and slow clients ---------------------------------------------------------------------------
def wait_idle(url: str, timeout: float = 10) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        h = health(url)
        if h["active"] == 0 and h["pending"] == 0:
            return h
        time.sleep(0.05)
    pytest.fail(f"server not idle: {health(url)}")


def test_closed_stream_frees_its_slot(server):
    wait_idle(server)
    before = health(server)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Compute 5 + 5."}], "stream": True,
            "max_tokens": 110, "ignore_eos": True, "temperature": 0}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, headers=auth(), timeout=30) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
    after = wait_idle(server)
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["decode_tokens"] - before["decode_tokens"] < 100  # it stopped long before max_tokens


def test_abandoned_non_streaming_request_frees_its_slots(server):
    wait_idle(server)
    before = health(server)
    prompts = ["<|bos|><|user|>Compute 1 + 2.<|assistant|>"] * 4  # 4 x 16 choices: 24 rows, then 24, then 16
    body = json.dumps({"model": "tiny", "prompt": prompts, "n": 16, "max_tokens": 110, "ignore_eos": True,
                       "temperature": 0}).encode()
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:  # a raw socket we can hang up on at will
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                     f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.time() + 30
        while health(server)["active"] < 24:  # the first 24 choices are decoding
            assert time.time() < deadline, health(server)
            time.sleep(0.01)
    after = wait_idle(server)
    # every decode token of a full run: 64 choices x 109 (each choice's first token comes from its prefill);
    # the 40 choices still waiting when the client hung up must never have run
    assert after["cancelled"] - before["cancelled"] >= 40, (before, after)
    assert after["decode_tokens"] - before["decode_tokens"] <= 64 * 109 - 40 * 109


def test_slow_reader_does_not_stall_others(server, client):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Compute 6 * 7."}], "stream": True,
            "max_tokens": 100, "ignore_eos": True, "temperature": 0}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, headers=auth(), timeout=60) as slow:
        quick = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Compute 1."}],
                                               temperature=0, max_tokens=20, extra_body={"ignore_eos": True})
        assert quick.usage.completion_tokens == 20  # done while the slow reader has read nothing
        assert health(server)["active"] <= 1
        time.sleep(0.5)  # the slow reader has read nothing yet; its tokens wait in its own queue
        events = [json.loads(x[6:]) for x in slow.iter_lines() if x.startswith("data: {")]
    finish = [c["choices"][0]["finish_reason"] for c in events if c["choices"][0]["finish_reason"]]
    assert finish == ["length"]


# ---- load: continuous batching vs one at a time --------------------------------------------------------------
LOAD_CLIENTS = 32


def load_requests() -> list[dict]:
    """Mixed prompt lengths (1 to ~12 operands) and 16-24 new tokens each."""
    reqs = []
    for i in range(LOAD_CLIENTS):
        ops = " + ".join(str((i * 7 + k) % 20) for k in range(1 + i % 12))
        reqs.append({"messages": [{"role": "user", "content": f"Compute {ops}."}], "max_tokens": 16 + i % 9})
    return reqs


async def stream_one(client: httpx.AsyncClient, req: dict) -> tuple[str, str, int]:
    """One streaming chat request read as raw SSE (a light client, so the server is what gets measured)."""
    body = {"model": "tiny", "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
            "ignore_eos": True, **req}
    content, reasoning, n = [], [], 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                n = chunk["usage"]["completion_tokens"]
            for c in chunk["choices"]:
                content.append(c["delta"].get("content") or "")
                reasoning.append(c["delta"].get("reasoning_content") or "")
    return "".join(reasoning), "".join(content), n


async def run_load(url: str) -> dict:
    reqs = load_requests()
    async with httpx.AsyncClient(base_url=url, headers=auth(), timeout=120,
                                 limits=httpx.Limits(max_connections=LOAD_CLIENTS)) as client:
        await stream_one(client, reqs[0])  # warm-up
        t0 = time.perf_counter()
        alone = [await stream_one(client, r) for r in reqs]
        t_seq = time.perf_counter() - t0
        t0 = time.perf_counter()
        together = await asyncio.wait_for(asyncio.gather(*(stream_one(client, r) for r in reqs)), timeout=120)
        t_conc = time.perf_counter() - t0
    tokens = sum(n for *_, n in together)
    return {"alone": alone, "together": together, "tokens": tokens, "sequential_s": t_seq,
            "concurrent_s": t_conc, "sequential_tok_s": tokens / t_seq, "concurrent_tok_s": tokens / t_conc}


LOAD_CLIENT = """
import asyncio, json, sys
sys.path.insert(0, sys.argv[1])
import test_server
print(json.dumps(asyncio.run(test_server.run_load(sys.argv[2]))))
"""


def test_32_concurrent_streams_match_solo_runs(preset_server):
    server = preset_server
    wait_idle(server)
    # The clients run in a fresh interpreter: this process's heap (every earlier test) would slow the client
    # side. The speed-up itself is a benchmark (bench/serve_load.py), not asserted here.
    out = subprocess.run([sys.executable, "-c", LOAD_CLIENT, str(Path(__file__).parent), server],
                         capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["tokens"] == sum(r["max_tokens"] for r in load_requests())  # every request completed in full
    assert res["together"] == res["alone"]  # greedy outputs do not depend on the batch
    ratio = res["concurrent_tok_s"] / res["sequential_tok_s"]
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    summary = {k: res[k] for k in ("tokens", "sequential_s", "concurrent_s", "sequential_tok_s",
                                   "concurrent_tok_s")} | {"ratio": ratio, "clients": LOAD_CLIENTS,
                                                            "max_batch": health(server)["max_batch"]}
    (OUT_DIR / "serve_load.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nserve load: {LOAD_CLIENTS} clients, {res['tokens']} tokens: concurrent "
          f"{res['concurrent_tok_s']:.0f} tok/s vs sequential {res['sequential_tok_s']:.0f} tok/s = {ratio:.1f}x")
    assert summary["max_batch"] >= 8, summary  # the concurrent requests really were decoded together


# ---- the page in headless Chromium --------------------------------------------------------------------------
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def test_chat_page_streams_answer_and_thinking(server):
    chromium = require_binary("chromium", "chromium-browser", reason="apt-get install -y chromium (.ci/run does)")
    sync_api = require("playwright.sync_api", reason="pip install playwright")
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 700})
            page.goto(server + "/")
            page.fill("#api-key", KEY)
            page.dispatch_event("#api-key", "change")
            page.wait_for_function("document.getElementById('model').textContent.includes('tiny')", timeout=10000)
            page.eval_on_selector("#temperature", "e => { e.value = '0'; e.dispatchEvent(new Event('input')); }")
            page.fill("#input", "Compute 12 + 7 * 3.")
            page.press("#input", "Enter")
            page.wait_for_selector(".msg.user .bubble", timeout=10000)
            page.wait_for_function(
                "document.querySelector('.msg.assistant .stats') && "
                "document.querySelector('.msg.assistant .stats').textContent.includes('tok/s')", timeout=30000)
            thinking = page.locator(".msg.assistant details.thinking")
            assert thinking.is_visible()
            assert page.locator(".msg.assistant .thinking-text").inner_text().strip()
            assert page.locator(".msg.assistant .answer").inner_text().strip()
            # a second turn keeps the conversation
            page.fill("#input", "Compute 2 + 2.")
            page.press("#input", "Enter")
            page.wait_for_function("document.querySelectorAll('.msg.assistant .stats').length == 2 && "
                                   "document.querySelectorAll('.msg.assistant .stats')[1].textContent.includes('tok/s')",
                                   timeout=30000)
            assert page.locator(".msg.user").count() == 2
            page.screenshot(path=str(OUT_DIR / "chat_page.png"), full_page=True)
        finally:
            browser.close()
    assert (OUT_DIR / "chat_page.png").stat().st_size > 10_000
