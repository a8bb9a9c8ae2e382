"""An OpenAI-compatible HTTP server with continuous batching, and a web chat page (`nanoseek serve`).

Endpoints: POST /v1/chat/completions and POST /v1/completions (both streaming over SSE or not), GET /v1/models,
GET /health, and the chat page at / (static files in nanoseek/engine/static, no build step).

* Every choice of every request is one `batcher.Request`; one background thread runs `Batcher.step()` (admit
  + prefill newcomers, one batched decode for all) and pushes each token into the request's asyncio queue
  (one loop wake-up per burst of tokens). The queue is unbounded, so a slow reader only delays itself.
* A client that disconnects (stream closed, or a non-streaming request abandoned) cancels its requests and
  their cache rows are free at the next step; a stop string hit also cancels right away.
* Binds 127.0.0.1 unless told otherwise. With an API key, every /v1 and /health request needs
  `Authorization: Bearer KEY` (401 otherwise); the static page itself holds no data and asks for the key.
* Bad input gets a 4xx JSON body in OpenAI's error shape: invalid JSON (400), failed field validation (400,
  `param` names the field), unknown model (404, model_not_found), prompt + max_tokens over the context
  (400, context_length_exceeded), body over `max_body_bytes` (413), unknown route (404), wrong method (405).
The text side (chat template, thinking -> `reasoning_content`, stop strings) is in nanoseek.engine.protocol.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import threading
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
from nanoseek.engine.protocol import (
    APIError,
    ChatRequest,
    ChoiceStream,
    CompletionRequest,
    SamplingRequest,
    chat_prompt_ids,
    parse,
)
from nanoseek.engine.sampling import SamplingParams

STATIC_DIR = Path(str(resources.files("nanoseek.engine") / "static"))


@dataclass
class ServeConfig:
    model_name: str = "nanoseek"
    api_key: str | None = None
    max_slots: int = 32
    max_body_bytes: int = 1 << 20
    default_temperature: float = 1.0  # OpenAI's default


@dataclass(eq=False)
class _Choice:
    req: Request
    stream: ChoiceStream
    prompt_tokens: int


class _Job:
    """All choices of one HTTP request, their token queue, and cancellation."""

    def __init__(self, batcher: Batcher, choices: list[_Choice], queue: asyncio.Queue, prompt_tokens: int):
        self.batcher, self.choices, self.queue = batcher, choices, queue
        self.prompt_tokens = prompt_tokens
        self.live = len(choices)

    def cancel(self) -> None:
        for c in self.choices:
            if c.req.finish_reason is None:
                self.batcher.cancel(c.req)

    async def batches(self):
        """Yield lists of (choice index, text deltas, finish reason or None) until every choice has finished.
        Each list is everything queued when the consumer woke up: fewer, larger writes under load."""
        while self.live:
            batch = [await self.queue.get()]
            while not self.queue.empty():
                batch.append(self.queue.get_nowait())
            out = []
            for i, tok, fin in batch:
                c = self.choices[i]
                if c.stream.finish_reason is not None:
                    continue
                if tok is None:  # the batcher failed this request
                    c.stream.finish_reason = "error"
                    self.live -= 1
                    out.append((i, {}, "error"))
                    continue
                deltas = c.stream.feed(tok, fin)
                if c.stream.finish_reason is not None:
                    self.live -= 1
                    if fin is None:  # a stop string ended it before the batcher did
                        self.batcher.cancel(c.req)
                if deltas or c.stream.finish_reason is not None:
                    out.append((i, deltas, c.stream.finish_reason))
            if out:
                yield out

    def usage(self) -> dict:
        """OpenAI counts each prompt once (not once per choice) and every generated token, eos included."""
        completion = sum(c.stream.n_tokens for c in self.choices)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}


class _Mailbox:
    """Carries tokens from the batcher thread into asyncio queues with one loop wake-up per burst instead of
    one per token (a decode step emits a token for every active request at once)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.items: list[tuple[asyncio.Queue, tuple]] = []
        self.lock = threading.Lock()
        self.scheduled = False

    def post(self, queue: asyncio.Queue, item: tuple) -> None:
        with self.lock:
            self.items.append((queue, item))
            if self.scheduled:
                return
            self.scheduled = True
        self.loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        with self.lock:
            items, self.items, self.scheduled = self.items, [], False
        for queue, item in items:
            queue.put_nowait(item)


class _BearerAuth:
    """Pure ASGI middleware (not BaseHTTPMiddleware, which hides client disconnects from the app): /v1/* and
    /health need `Authorization: Bearer KEY`."""

    def __init__(self, app, key: str):
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] == "http" and (path.startswith("/v1") or path == "/health"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                err = APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer KEY'.",
                               code="invalid_api_key")
                await JSONResponse(err.body(), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class Server:
    def __init__(self, model, tokenizer, cfg: ServeConfig | None = None):
        self.cfg = cfg or ServeConfig()
        self.tokenizer = tokenizer
        self.batcher = Batcher(model, tokenizer.eos_id, max_slots=self.cfg.max_slots)
        self.context = self.batcher.max_seq_len
        self.created = int(time.time())
        self._mailboxes: dict[asyncio.AbstractEventLoop, _Mailbox] = {}
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

        if self.cfg.api_key:
            app.add_middleware(_BearerAuth, key=self.cfg.api_key)

        @app.exception_handler(APIError)
        async def api_error(_, e: APIError):
            return JSONResponse(e.body(), status_code=e.status)

        @app.exception_handler(StarletteHTTPException)
        async def http_error(_, e: StarletteHTTPException):
            code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
            return JSONResponse(APIError(e.status_code, str(e.detail), code=code).body(), status_code=e.status_code)

        @app.exception_handler(Exception)
        async def server_error(_, e: Exception):
            err = APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error")
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
            prompt = chat_prompt_ids(self.tokenizer, req.messages)
            return await self._respond(request, req, [prompt], chat=True)

        @app.post("/v1/completions")
        async def completions(request: HTTPRequest):
            req = parse(CompletionRequest, await self._read_json(request))
            self._check_model(req.model)
            return await self._respond(request, req, self._completion_prompts(req.prompt), chat=False)

        @app.get("/")
        async def page():
            return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
        return app

    # ---- request handling -------------------------------------------------------------------------------
    def _mailbox(self) -> _Mailbox:
        loop = asyncio.get_running_loop()
        if loop not in self._mailboxes:
            self._mailboxes[loop] = _Mailbox(loop)
        return self._mailboxes[loop]

    def _model_card(self) -> dict:
        return {"id": self.cfg.model_name, "object": "model", "created": self.created, "owned_by": "nanoseek",
                "context_length": self.context}

    def _check_model(self, name: str | None) -> None:
        if name is not None and name != self.cfg.model_name:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{self.cfg.model_name}'.",
                           param="model", code="model_not_found")

    async def _read_json(self, request: HTTPRequest) -> object:
        limit = self.cfg.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"request body is {declared} bytes; the limit is {limit}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise APIError(413, f"request body exceeds the limit of {limit} bytes")
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

    def _submit(self, req: SamplingRequest, prompts: list[list[int]], chat: bool, mailbox: _Mailbox,
                queue: asyncio.Queue) -> list[_Choice]:
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
        params = SamplingParams(temp, req.top_k, req.top_p)
        choices: list[_Choice] = []
        for p in prompts:
            for j in range(n):
                i = len(choices)

                def on_token(tok, fin, i=i):
                    mailbox.post(queue, (i, tok, fin))

                seed = None if req.seed is None else req.seed + j
                r = Request(p, req.limit or self.context - len(p), params, seed, on_token, ignore_eos=req.ignore_eos)
                choices.append(_Choice(r, ChoiceStream(self.tokenizer, chat, req.stops), len(p)))
        for c in choices:
            self.batcher.submit(c.req)
        return choices

    async def _respond(self, request: HTTPRequest, req: SamplingRequest, prompts: list[list[int]], chat: bool):
        queue: asyncio.Queue = asyncio.Queue()
        choices = self._submit(req, prompts, chat, self._mailbox(), queue)
        job = _Job(self.batcher, choices, queue, sum(len(p) for p in prompts))
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self._sse(job, rid, chat, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self._collect(request, job, rid, chat)

    def _envelope(self, rid: str, chat: bool, stream: bool) -> dict:
        obj = ("chat.completion" if chat else "text_completion") + (".chunk" if stream and chat else "")
        return {"id": rid, "object": obj, "created": int(time.time()), "model": self.cfg.model_name}

    async def _sse(self, job: _Job, rid: str, chat: bool, include_usage: bool):
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
                            {"index": i, "text": deltas.get("text", ""), "finish_reason": fin, "logprobs": None}]}))
                yield "".join(events)
            if include_usage:
                yield event({**self._envelope(rid, chat, True), "choices": [], "usage": job.usage()})
            yield "data: [DONE]\n\n"
        finally:  # normal end, or the client went away (the task is cancelled inside an await)
            job.cancel()

    async def _collect(self, request: HTTPRequest, job: _Job, rid: str, chat: bool) -> JSONResponse:
        async def consume() -> None:
            async for _ in job.batches():
                pass

        async def client_gone() -> None:  # a non-streaming caller that hangs up should not keep its rows
            while not await request.is_disconnected():
                await asyncio.sleep(0.2)

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
                                "logprobs": None})
        return JSONResponse({**self._envelope(rid, chat, False), "choices": choices, "usage": job.usage()})


def load_server(run_dir: str | Path, cfg: ServeConfig | None = None, device: str = "cpu") -> Server:
    """A Server for a run directory's latest checkpoint and its tokenizer.json."""
    from nanoseek.tokenizer import Tokenizer
    from nanoseek.train.checkpoint import load_run_model

    model, _, _ = load_run_model(run_dir, device=device)
    tokenizer = Tokenizer.load(Path(run_dir) / "tokenizer.json")
    return Server(model, tokenizer, cfg)


def serve(server: Server, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    import uvicorn

    uvicorn.run(server.app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
