"""An OpenAI-compatible HTTP server with continuous batching, and a web chat page (`nanoseek serve`).

Endpoints: POST /v1/chat/completions and POST /v1/completions (both streaming over SSE or not), GET /v1/models,
GET /health, and the chat page at / (static files in nanoseek/engine/static, no build step).

* Every choice of every request is one `batcher.Request`; one background thread runs `Batcher.step()` (admit
  + prefill newcomers, one batched decode for all) and pushes each token into the request's asyncio queue
  (one loop wake-up per burst of tokens; nanoseek.engine.jobs). The queue is unbounded, so a slow reader only
  delays itself.
* A client that disconnects (stream closed, or a non-streaming request abandoned) cancels its requests and
  their cache rows are free at the next step; a stop string hit also cancels right away.
* Admission control (one client must not stall the others): a request may ask for at most `max_choices`
  choices (prompts x n, 400 beyond); when `max_waiting` choices already wait for a row, or one client
  (peer address) already has `max_client_waiting` requests waiting, a new one gets 429 with `Retry-After`;
  the batcher gives free rows round-robin between clients and between requests and keeps a few rows for
  light clients' newcomers (batcher.FairQueue). Prompts are tokenized off the event loop, and a body
  that does not arrive within `body_timeout_s` gets 408. Stop strings are capped and matched incrementally
  (protocol.py), so the event loop's work per token does not grow with them.
* Binds 127.0.0.1 unless told otherwise. With API keys (one or several), every /v1 and /health request needs
  `Authorization: Bearer KEY` with one of them (401 otherwise); the static page itself holds no data and asks
  for the key; with keys, a request's client is its key (nanoseek.engine.http_guard).
* Browser attacks on a local server (CSRF, DNS rebinding) are refused before anything else: a foreign Host
  (421), a foreign Origin (403), a POST not declared as JSON (415): nanoseek.engine.http_guard.
* Bad input gets a 4xx JSON body in OpenAI's error shape: invalid JSON (400), failed field validation (400,
  `param` names the field), unknown model (404, model_not_found), prompt + max_tokens over the context
  (400, context_length_exceeded), body over `max_body_bytes` (413), unknown route (404), wrong method (405).
  A server fault is logged with its traceback (logger "nanoseek.serve") and answered with a generic 500.
The text side (chat template, thinking -> `reasoning_content`, stop strings) is in nanoseek.engine.protocol; a
request's choices and their token delivery in nanoseek.engine.jobs.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanoseek.engine.batcher import Batcher, Request
from nanoseek.engine.http_guard import (CLIENT_SCOPE_KEY, BearerAuth, RequestGuard, RequestPolicy, split_host,  # noqa: F401
                                        split_origin)
from nanoseek.engine.jobs import Choice, Job, Mailbox
from nanoseek.engine.protocol import (
    APIError,
    ChatRequest,
    ChoiceStream,
    CompletionRequest,
    SamplingRequest,
    chat_prompt_ids,
    parse,
    token_bytes,
)
from nanoseek.engine.sampling import SamplingParams

STATIC_DIR = Path(str(resources.files("nanoseek.engine") / "static"))
log = logging.getLogger("nanoseek.serve")


@dataclass
class ServeConfig:
    model_name: str = "nanoseek"
    api_key: str | None = None  # one key (kept for callers that pass one); api_keys adds more
    api_keys: tuple[str, ...] = ()  # each request's client (fair shares, 429 per client) is the key it sent
    host: str = "127.0.0.1"  # the bound address and port: Host / Origin headers naming them are ours
    port: int = 8000
    allowed_hosts: tuple[str, ...] = ()  # extra Host values: "name" (any port) or "name:port"; "*": no check
    allowed_origins: tuple[str, ...] = ()  # extra Origins: "scheme://name[:port]"; "*": no check
    max_slots: int = 32
    max_body_bytes: int = 1 << 20
    default_temperature: float = 1.0  # OpenAI's default (an imported run: its generation_config.json's)
    default_top_p: float | None = None  # None: no nucleus cut (an imported run: its generation_config.json's)
    max_choices: int = 64  # prompts x n of one request (400 beyond)
    max_waiting: int | None = None  # choices waiting for a row before new requests get 429 (None: 4 x max_slots)
    max_client_waiting: int | None = None  # requests of one client address waiting for a row (None: max_slots)
    body_timeout_s: float = 30.0  # a request body must arrive within this (408 otherwise)

    @property
    def waiting_limit(self) -> int:
        return 4 * self.max_slots if self.max_waiting is None else self.max_waiting

    @property
    def client_waiting_limit(self) -> int:
        return self.max_slots if self.max_client_waiting is None else self.max_client_waiting

    @property
    def keys(self) -> tuple[str, ...]:
        """Every accepted API key, each once, in the order given (empty: no authentication)."""
        given = ((self.api_key,) if self.api_key else ()) + tuple(self.api_keys)
        return tuple(dict.fromkeys(k for k in given if k))




class Server:
    def __init__(self, model, tokenizer, cfg: ServeConfig | None = None):
        self.cfg = cfg or ServeConfig()
        self.tokenizer = tokenizer
        # with keys a client is its key, so the reserve rows go by identity alone: the express lane (any short
        # request may take a reserve row) exists for clients that share one address, and on a short context it
        # would let one key's flood of short streams take the reserve as well
        stops = getattr(tokenizer, "stop_ids", None) or tokenizer.eos_id
        self.batcher = Batcher(model, stops, max_slots=self.cfg.max_slots,
                               sample_vocab=getattr(tokenizer, "sample_vocab", None),
                               **({"express_tokens": 0} if self.cfg.keys else {}))
        token_bytes(tokenizer)  # build the detokenizer's table now, not during the first request
        self.context = self.batcher.max_seq_len
        self.created = int(time.time())
        self.policy = RequestPolicy.of(self.cfg)
        self._mailboxes: dict[asyncio.AbstractEventLoop, Mailbox] = {}
        self.app = self._build_app()

    # ---- app ------------------------------------------------------------------------------------------
    def _build_app(self) -> FastAPI:
        @asynccontextmanager
        async def lifespan(app):
            self.batcher.start()
            try:
                yield
            finally:
                self.batcher.close()

        app = FastAPI(title="nanoseek", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

        if self.cfg.keys:
            app.add_middleware(BearerAuth, keys=self.cfg.keys)
        app.add_middleware(RequestGuard, policy=self.policy)  # added last: runs first

        @app.exception_handler(APIError)
        async def api_error(_, e: APIError):
            return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

        @app.exception_handler(StarletteHTTPException)
        async def http_error(_, e: StarletteHTTPException):
            code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
            return JSONResponse(APIError(e.status_code, str(e.detail), code=code).body(), status_code=e.status_code)

        @app.exception_handler(Exception)
        async def server_error(request: HTTPRequest, e: Exception):
            # the details stay in the server log: a client learns nothing about the internals
            log.error("internal error on %s %s", request.method, request.url.path, exc_info=e)
            err = APIError(500, "The server had an error while processing your request.", type="server_error")
            return JSONResponse(err.body(), status_code=500)

        @app.get("/health")
        async def health():
            b = self.batcher
            return {"status": "ok", "model": self.cfg.model_name, "active": b.n_active, "pending": b.n_pending,
                    "max_slots": b.max_slots, "context": self.context, "steps": b.stats.steps,
                    "decode_tokens": b.stats.decode_tokens, "prefill_tokens": b.stats.prefill_tokens,
                    "max_batch": b.stats.max_batch, "cancelled": b.stats.cancelled}

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [self._model_card()]}

        @app.get("/v1/models/{name}")
        async def model(name: str):
            self._check_model(name)
            return self._model_card()

        @app.post("/v1/chat/completions")
        async def chat(request: HTTPRequest):
            req = parse(ChatRequest, await self._read_json(request))
            self._check_model(req.model)
            self._check_choices(req, 1, self._client(request))
            prompt = await asyncio.to_thread(chat_prompt_ids, self.tokenizer, req.messages)
            thinking = bool(getattr(self.tokenizer, "imported", False) and self.tokenizer.opens_thinking(prompt))
            return await self._respond(request, req, [prompt], chat=True, thinking=thinking)

        @app.post("/v1/completions")
        async def completions(request: HTTPRequest):
            req = parse(CompletionRequest, await self._read_json(request))
            self._check_model(req.model)
            self._check_choices(req, len(req.prompt) if isinstance(req.prompt, list) and req.prompt
                                and not isinstance(req.prompt[0], int) else 1, self._client(request))
            prompts = await asyncio.to_thread(self._completion_prompts, req.prompt)  # a big prompt: off the loop
            return await self._respond(request, req, prompts, chat=False)

        @app.get("/")
        async def page():
            return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
        return app

    # ---- request handling -------------------------------------------------------------------------------
    def _mailbox(self) -> Mailbox:
        loop = asyncio.get_running_loop()
        if loop not in self._mailboxes:
            self._mailboxes[loop] = Mailbox(loop)
        return self._mailboxes[loop]

    @staticmethod
    def _client(request: HTTPRequest) -> object:
        """Who asks, for fair shares: the API key it authenticated with when the server has keys, otherwise
        the peer address (behind a proxy that is the proxy)."""
        key = request.scope.get(CLIENT_SCOPE_KEY)
        if key is not None:
            return key
        return request.client.host if request.client else None

    def _model_card(self) -> dict:
        return {"id": self.cfg.model_name, "object": "model", "created": self.created, "owned_by": "nanoseek",
                "context_length": self.context}

    def _check_model(self, name: str | None) -> None:
        if name is not None and name != self.cfg.model_name:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{self.cfg.model_name}'.",
                           param="model", code="model_not_found")

    def _check_choices(self, req: SamplingRequest, n_prompts: int, client: object) -> None:
        """Per-request bound (400) and the waiting-queue bounds, all clients' and this client's (429 +
        Retry-After), before any real work."""
        n = n_prompts * (req.n or 1)
        if n > self.cfg.max_choices:
            raise APIError(400, f"this request asks for {n} choices ({n_prompts} prompts x n={req.n or 1}); "
                                f"the limit is {self.cfg.max_choices} per request: split it", param="n")
        waiting, limit = self.batcher.n_pending, self.cfg.waiting_limit
        mine, my_limit = self.batcher.pending.waiting_groups(client), self.cfg.client_waiting_limit
        if mine >= my_limit:
            raise APIError(429, f"too many of your requests are waiting ({mine}, limit {my_limit}); retry in 1 s",
                           type="rate_limit_error", code="rate_limit_exceeded", headers={"Retry-After": "1"})
        if waiting + n > limit:
            # a rough wait: the queue ahead drains max_slots choices per generation (~1 s each at this scale)
            retry = max(1, math.ceil(waiting / self.cfg.max_slots))
            raise APIError(429, f"the server is busy ({waiting} choices waiting, limit {limit}); retry in "
                                f"{retry} s", type="rate_limit_error", code="rate_limit_exceeded",
                           headers={"Retry-After": str(retry)})

    async def _read_json(self, request: HTTPRequest) -> object:
        limit = self.cfg.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"request body is {declared} bytes; the limit is {limit}")
        body = bytearray()

        async def read() -> None:
            async for chunk in request.stream():
                body.extend(chunk)
                if len(body) > limit:
                    raise APIError(413, f"request body exceeds the limit of {limit} bytes")

        try:
            await asyncio.wait_for(read(), self.cfg.body_timeout_s)
        except asyncio.TimeoutError:
            raise APIError(408, f"the request body did not arrive within {self.cfg.body_timeout_s:g} s") from None
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"invalid JSON body: {e}") from None

    def _completion_prompts(self, prompt) -> list[list[int]]:
        if isinstance(prompt, str):
            prompts = [self.tokenizer.encode(prompt)]
        elif prompt and all(isinstance(p, int) for p in prompt):
            prompts = [list(prompt)]
        else:
            prompts = [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompt]
        if not prompts or any(not p for p in prompts):
            raise APIError(400, "prompt is empty", param="prompt")
        vocab = self.batcher.cfg.vocab_size
        if any(t < 0 or t >= vocab for p in prompts for t in p):
            raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        return prompts

    def _submit(self, req: SamplingRequest, prompts: list[list[int]], chat: bool, mailbox: Mailbox,
                queue: asyncio.Queue, client: object = None, group: object = None,
                thinking: bool = False) -> list[Choice]:
        """Validate lengths and sampling values, then queue n choices per prompt with the batcher."""
        n = req.n or 1
        for p in prompts:
            if len(p) >= self.context:
                raise APIError(400, f"This model's maximum context length is {self.context} tokens; the prompt "
                                    f"has {len(p)} tokens.", param="messages" if chat else "prompt",
                               code="context_length_exceeded")
            if req.limit is not None and len(p) + req.limit > self.context:
                raise APIError(400, f"This model's maximum context length is {self.context} tokens; the prompt "
                                    f"({len(p)}) + max_tokens ({req.limit}) exceed it.", param="max_tokens",
                               code="context_length_exceeded")
        temp = self.cfg.default_temperature if req.temperature is None else req.temperature
        top_p = self.cfg.default_top_p if req.top_p is None else req.top_p
        params = SamplingParams(temp, req.top_k, top_p)
        logprobs = getattr(req, "logprobs", None)
        choices: list[Choice] = []
        for p in prompts:
            for j in range(n):
                i = len(choices)
                seed = None if req.seed is None else req.seed + j
                r = Request(p, req.limit or self.context - len(p), params, seed, ignore_eos=req.ignore_eos,
                            client=client, group=group, logprobs=logprobs)

                def on_token(tok, fin, i=i, r=r):  # on the batcher thread
                    lp = r.token_logprobs[-1] if r.logprobs is not None and tok is not None else None
                    mailbox.post(queue, (i, tok, fin, lp))

                r.on_token = on_token
                choices.append(Choice(r, ChoiceStream(self.tokenizer, chat, req.stops, logprobs, thinking),
                                       len(p)))
        for c in choices:
            self.batcher.submit(c.req)
        return choices

    async def _respond(self, request: HTTPRequest, req: SamplingRequest, prompts: list[list[int]], chat: bool,
                       thinking: bool = False):
        queue: asyncio.Queue = asyncio.Queue()
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        client = self._client(request)
        self._check_choices(req, len(prompts), client)  # again: the queue grew while the prompts were encoded
        choices = self._submit(req, prompts, chat, self._mailbox(), queue, client, rid, thinking)
        job = Job(self.batcher, choices, queue, sum(len(p) for p in prompts))
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self._sse(job, rid, chat, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self._collect(request, job, rid, chat)

    @staticmethod
    def _logprobs_delta(c: Choice) -> dict | None:
        """The logprob entries of tokens not streamed yet (OpenAI streams them chunk by chunk)."""
        body = c.stream.logprobs_body()
        if body is None:
            return None
        k, c.lp_sent = c.lp_sent, len(body["tokens"])
        return {key: (v[k:] if v is not None else None) for key, v in body.items()}

    def _envelope(self, rid: str, chat: bool, stream: bool) -> dict:
        obj = ("chat.completion" if chat else "text_completion") + (".chunk" if stream and chat else "")
        return {"id": rid, "object": obj, "created": int(time.time()), "model": self.cfg.model_name}

    async def _sse(self, job: Job, rid: str, chat: bool, include_usage: bool):
        def event(payload: dict) -> str:
            return f"data: {json.dumps(payload)}\n\n"

        try:
            if chat:
                for i in range(len(job.choices)):
                    yield event({**self._envelope(rid, chat, True), "choices": [
                        {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
            async for batch in job.batches():
                events = []
                for i, deltas, fin in batch:
                    if fin == "error":
                        events.append(event(APIError(500, "generation failed", type="server_error").body()))
                    elif chat:
                        events.append(event({**self._envelope(rid, chat, True), "choices": [
                            {"index": i, "delta": deltas, "finish_reason": fin}]}))
                    else:
                        events.append(event({**self._envelope(rid, chat, True), "choices": [
                            {"index": i, "text": deltas.get("text", ""), "finish_reason": fin,
                             "logprobs": self._logprobs_delta(job.choices[i])}]}))
                yield "".join(events)
            if include_usage:
                yield event({**self._envelope(rid, chat, True), "choices": [], "usage": job.usage()})
            yield "data: [DONE]\n\n"
        finally:  # normal end, or the client went away (the task is cancelled inside an await)
            job.cancel()

    async def _collect(self, request: HTTPRequest, job: Job, rid: str, chat: bool) -> JSONResponse:
        async def consume() -> None:
            async for _ in job.batches():
                pass

        async def client_gone() -> None:  # a non-streaming caller that hangs up should not keep its rows
            while not await request.is_disconnected():
                await asyncio.sleep(0.1)

        work, watch = asyncio.ensure_future(consume()), asyncio.ensure_future(client_gone())
        try:
            await asyncio.wait([work, watch], return_when=asyncio.FIRST_COMPLETED)
        finally:
            job.cancel()
            for t in (work, watch):
                t.cancel()
        if not work.done() or work.cancelled():
            raise APIError(499, "client disconnected")
        work.result()
        if any(c.stream.finish_reason == "error" for c in job.choices):
            raise APIError(500, "generation failed", type="server_error")
        choices = []
        for i, c in enumerate(job.choices):
            s = c.stream
            if chat:
                msg = {"role": "assistant", "content": s.text("content") or "",
                       "reasoning_content": s.text("reasoning_content")}
                choices.append({"index": i, "message": msg, "finish_reason": s.finish_reason, "logprobs": None})
            else:
                choices.append({"index": i, "text": s.text("text") or "", "finish_reason": s.finish_reason,
                                "logprobs": s.logprobs_body()})
        return JSONResponse({**self._envelope(rid, chat, False), "choices": choices, "usage": job.usage()})


def load_server(run_dir: str | Path, cfg: ServeConfig | None = None, device: str = "cpu") -> Server:
    """A Server for a run directory's latest checkpoint and its tokenizer (nanoseek's own or an imported
    checkpoint's; the latter's generation_config.json sets the default temperature and top-p)."""
    import dataclasses

    from nanoseek.hf_tokenizer import load_tokenizer
    from nanoseek.train.checkpoint import load_run_model

    model, _, _ = load_run_model(run_dir, device=device)
    tokenizer = load_tokenizer(run_dir)
    cfg = cfg or ServeConfig()
    gen = getattr(tokenizer, "generation", {})
    if gen.get("temperature") is not None or gen.get("top_p") is not None:
        cfg = dataclasses.replace(cfg, default_temperature=float(gen.get("temperature", cfg.default_temperature)),
                                  default_top_p=gen.get("top_p", cfg.default_top_p))
    return Server(model, tokenizer, cfg)


def serve(server: Server, log_level: str = "info") -> None:
    """Run the server on its config's host and port (which its Host / Origin checks name as its own).
    uvicorn's proxy headers are off: by default it believes `X-Forwarded-For` from 127.0.0.1, so any local
    client could name its own address and take a fresh fair share (and 429 budget) per request."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    uvicorn.run(server.app, host=server.cfg.host, port=server.cfg.port, log_level=log_level,
                timeout_graceful_shutdown=5, proxy_headers=False)
