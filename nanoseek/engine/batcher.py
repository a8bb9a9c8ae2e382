"""Continuous batching over a slot-based MLA latent cache (what `nanoseek serve` decodes with).

Orca-style iteration-level scheduling (Yu et al., OSDI 2022), the idea vLLM and SGLang serve with: requests
join and leave the running batch between decode steps instead of waiting for a whole batch to drain.

* The cache is preallocated once: (n_layers, max_slots, max_seq_len, kv_lora_rank + qk_rope_head_dim).
  Row r of it belongs to the r-th active request; active requests always fill rows [0, n_active) (a finishing
  row is replaced by the last one, copying only that row's valid prefix), so every forward runs on a
  contiguous `cache[:, :B]` view and never on idle rows.
* Each row has its own length. Rows keep their tokens at positions 0..len-1 (no left padding): rope uses
  per-row positions, a decode writes each row's new latent at its own length (`write_pos`) and a key mask
  (B, 1, 1, S) hides every row's keys beyond its length.
* `step()` = drop cancelled rows, admit waiting requests into free rows and prefill them in one right-padded
  forward (naive attention, causal mask; padding sits after a row's prompt, so no real token sees it, and
  decodes overwrite it), then decode one token for every active row in ONE batched forward with
  weight-absorbed attention straight on the latent cache.
* Admission is fair: waiting requests are queued per client and, within a client, per group (all choices of
  one HTTP request share a group); free rows go round-robin over clients, then over each client's groups, so
  a request with many choices cannot starve a later one. The last `reserve_slots` free rows only go to
  the first choice of a request whose client holds fewer than `reserve_slots` rows, or whose token budget is
  at most `express_tokens` (an express lane: a short request leaves its row soon, so the reserve turns over
  even when every request comes from one address): a light client's newcomer, or any short request, starts
  at the next step even while a big request, or a flood of long requests from one client, holds the rest.
* Sampling is per row (each request has its own temperature / top-p / top-k and its own seeded generator),
  so a request's output does not depend on its neighbours; greedy equals `Engine.generate` on the same prompt.
* `start()` runs the loop in one background thread (torch releases the GIL inside ops). Tokens leave through
  each request's `on_token` callback on that thread; the HTTP server hands them to asyncio queues, so a slow
  or vanished client never stalls the loop. `cancel()` frees the row at the next step.

* Decode steps run on the lean decode step (engine/decode.py, where `decode.supported`; `lean_decode=False` or
  other models: `Transformer.hidden`): its two cache layouts (latents and transposed keys) replace the cache
  above, each row writes at its own slot and attends to its own slots (`LeanDecoder.step(pos=...)`); a
  prefill runs `Transformer.hidden` on a temporary cache whose rows are then copied in.

Simplifications: no chunked prefill (a prefill batch is capped by `prefill_tokens` padded tokens instead),
no prefix caching, no preemption (a request holds its row until it finishes), and the routed experts use
the stacked inference path for the batcher's whole life (weights never change while serving).
"""
from __future__ import annotations

import contextlib
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from nanoseek.engine import decode
from nanoseek.engine.sampling import SamplingParams, mask_vocab, sample
from nanoseek.model import Transformer

TokenCallback = Callable[[int | None, str | None], None]  # (token or None on error, finish reason or None)


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the model's raw distribution (temperature 1, before
    top-k/top-p; what vLLM reports by default) and the `k` most likely tokens with theirs."""

    logprob: float
    top: list[tuple[int, float]]


@dataclass(eq=False)
class Request:
    """One sequence to generate. `on_token(token, finish)` is called on the batcher thread for each token;
    `finish` is "stop" (eos), "length" (max_new_tokens) or "error" (token None) on the last call."""

    prompt: list[int]
    max_new_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None
    on_token: TokenCallback | None = None
    ignore_eos: bool = False  # run to max_new_tokens (benchmarks), as vLLM's `ignore_eos`
    client: object = None  # who asked (fair share between clients)
    group: object = None  # requests of one group (the choices of one HTTP request) share a turn
    logprobs: int | None = None  # report each token's TokenLogprob with this many alternatives
    tokens: list[int] = field(default_factory=list)
    token_logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None  # set when done: stop / length / cancelled / error
    cancelled: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    cached: int = 0  # tokens of this request currently in its cache row
    generator: torch.Generator | None = None


@dataclass
class BatcherStats:
    steps: int = 0
    prefills: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    busy_s: float = 0.0
    max_batch: int = 0
    cancelled: int = 0


class FairQueue:
    """Waiting requests by client, then by group, each level in round-robin order (dicts keep insertion order:
    a served client or group moves to the back)."""

    def __init__(self):
        self.clients: dict[object, dict[object, deque[Request]]] = {}
        self.n = 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        for groups in self.clients.values():
            for q in groups.values():
                yield from q

    def append(self, req: Request) -> None:
        groups = self.clients.setdefault(req.client, {})
        key = req.group if req.group is not None else id(req)
        groups.setdefault(key, deque()).append(req)
        self.n += 1

    def peek(self, eligible: Callable[[object, object], bool]) -> tuple[object, object] | None:
        """(client, group) of the next request in turn for which `eligible(client, group)`, or None."""
        for client, groups in self.clients.items():
            for key in groups:
                if eligible(client, key):
                    return client, key
        return None

    def pop(self, client: object, key: object) -> Request:
        groups = self.clients.pop(client)
        q = groups.pop(key)
        req = q.popleft()
        if q:
            groups[key] = q  # to the back of this client's groups
        if groups:
            self.clients[client] = groups  # to the back of the clients
        self.n -= 1
        return req

    def drop_cancelled(self) -> list[Request]:
        """Remove every cancelled request (they would count against the queue bounds until their turn)."""
        dropped = [r for r in self if r.cancelled]
        if dropped:
            keep = [r for r in self if not r.cancelled]
            self.clients, self.n = {}, 0
            for r in keep:  # the round-robin order of clients and groups survives (dicts keep insertion order)
                self.append(r)
        return dropped

    def waiting_groups(self, client: object) -> int:
        """How many groups (HTTP requests) of this client wait for a row (read from any thread: a snapshot)."""
        return len(self.clients.get(client, ()))


class Batcher:
    def __init__(self, model: Transformer, eos_id: int | Iterable[int], max_slots: int = 32,
                 max_seq_len: int | None = None, cache_dtype: torch.dtype | None = None, prefill_tokens: int = 4096,
                 reserve_slots: int | None = None, express_tokens: int = 256, sample_vocab: int | None = None,
                 lean_decode: bool = True):
        """eos_id: one id or several (an imported checkpoint's eos ids); sample_vocab: ids at or past it are
        never sampled (an imported checkpoint's padded embedding rows; engine/sampling.mask_vocab);
        lean_decode: decode steps on engine/decode.py's lean step where the model allows it (same tokens and
        log-probs up to float rounding), else through `Transformer.hidden`."""
        if max_slots < 1:
            raise ValueError(f"max_slots must be >= 1, got {max_slots}")
        self.reserve_slots = max_slots // 4 if reserve_slots is None else reserve_slots
        self.express_tokens = express_tokens
        self.model = model.eval()
        self.cfg = model.cfg
        self.stop_ids = frozenset([eos_id] if isinstance(eos_id, int) else eos_id)
        self.eos_id = eos_id if isinstance(eos_id, int) else min(self.stop_ids)
        self.sample_vocab = sample_vocab
        self.max_slots = max_slots
        self.max_seq_len = min(max_seq_len or self.cfg.max_seq_len, self.cfg.max_seq_len)
        self.prefill_tokens = prefill_tokens
        p = next(model.parameters())
        self.device = p.device
        model.prepare_inference(True)  # weights are frozen while serving: fuse them once
        dtype = cache_dtype or p.dtype
        shape = (self.cfg.n_layers, max_slots, self.max_seq_len, self.cfg.kv_cache_numbers_per_token_layer)
        self.lean: decode.LeanDecoder | None = None
        if lean_decode and decode.supported(model, dtype):  # its caches replace self.cache
            self.cache = None
            self.lean = decode.LeanDecoder(model, decode.build_layers(model), torch.zeros(*shape[:2], 0, shape[3],
                                           dtype=dtype, device=self.device), None, self.max_seq_len, None, None)
            self.lean.lat.zero_()  # a row attends over slots other rows filled: masked, but they must not be NaN
            self.lean.keys.zero_()
        else:
            self.cache = torch.zeros(*shape, dtype=dtype, device=self.device)
        self.rows: list[Request] = []  # row i of the cache belongs to rows[i]; touched by the loop thread only
        self.pending = FairQueue()
        self.group_rows: dict[object, int] = {}  # rows held per group (loop thread only)
        self.client_rows: dict[object, int] = {}  # rows held per client (loop thread only)
        self.stats = BatcherStats()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._purge = False  # some request was cancelled: drop the waiting ones at the next admission

    # ---- submission (any thread) ---------------------------------------------------------------------
    def submit(self, req: Request) -> Request:
        """Validate and queue a request; it joins the batch at the next step."""
        if not req.prompt:
            raise ValueError("empty prompt: give at least one token")
        if min(req.prompt) < 0 or max(req.prompt) >= self.cfg.vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {self.cfg.vocab_size})")
        if req.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {req.max_new_tokens}")
        if len(req.prompt) + req.max_new_tokens > self.max_seq_len:
            raise ValueError(f"prompt ({len(req.prompt)} tokens) + max_new_tokens ({req.max_new_tokens}) exceeds "
                             f"the context of {self.max_seq_len} tokens")
        req.params.validate()
        if not req.params.greedy:
            seed = req.seed if req.seed is not None else random.SystemRandom().getrandbits(63)
            req.generator = torch.Generator(device=self.device).manual_seed(seed)
        with self._cv:
            self.pending.append(req)
            self._cv.notify()
        return req

    def cancel(self, req: Request) -> None:
        """Stop generating for `req`; its row is freed at the next step (a no-op once it has finished)."""
        req.cancelled = True
        with self._cv:
            self._purge = True
            self._cv.notify()

    @property
    def n_active(self) -> int:
        return len(self.rows)

    @property
    def n_pending(self) -> int:
        return len(self.pending)

    # ---- the scheduler iteration ----------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> int:
        """Admit + prefill waiting requests, then decode one token for every active row. Returns the number
        of tokens generated this step."""
        t0 = time.perf_counter()
        self._retire()
        made = 0
        new = self._admit()
        if new:
            made += self._prefill(new)
            self._retire()
        if self.rows:
            made += self._decode()
            self._retire()
        self.stats.steps += 1
        self.stats.busy_s += time.perf_counter() - t0
        return made

    @staticmethod
    def _key(req: Request) -> object:
        return req.group if req.group is not None else id(req)

    def _admit(self) -> list[Request]:
        new: list[Request] = []
        longest = 0
        with self._cv:
            if self._purge:
                self._purge = False
                for req in self.pending.drop_cancelled():
                    self._finish(req, "cancelled")
                    self.stats.cancelled += 1
            while self.pending and len(self.rows) + len(new) < self.max_slots:
                free = self.max_slots - len(self.rows) - len(new)
                if free > self.reserve_slots:
                    turn = self.pending.peek(lambda client, key: True)
                else:  # the reserve: a first row for a request of a client that holds few rows, or a short one
                    turn = self.pending.peek(lambda client, key: self.group_rows.get(key, 0) == 0 and (
                        self.client_rows.get(client, 0) < self.reserve_slots
                        or self.pending.clients[client][key][0].max_new_tokens <= self.express_tokens))
                if turn is None:
                    break
                req = self.pending.clients[turn[0]][turn[1]][0]
                if req.cancelled:
                    self.pending.pop(*turn)
                    self._finish(req, "cancelled")
                    self.stats.cancelled += 1
                    continue
                longest_if = max(longest, len(req.prompt))
                if new and longest_if * (len(new) + 1) > self.prefill_tokens:
                    break  # the rest waits for the next step: bounds one step's latency
                longest = longest_if
                new.append(self.pending.pop(*turn))
                key = self._key(req)
                self.group_rows[key] = self.group_rows.get(key, 0) + 1
                self.client_rows[req.client] = self.client_rows.get(req.client, 0) + 1
        return new

    def _prefill(self, new: list[Request]) -> int:
        n0, k = len(self.rows), len(new)
        P = max(len(r.prompt) for r in new)
        ids = torch.zeros(k, P, dtype=torch.long, device=self.device)
        for i, r in enumerate(new):
            ids[i, :len(r.prompt)] = torch.tensor(r.prompt, device=self.device)
        causal = torch.ones(P, P, dtype=torch.bool, device=self.device).tril()[None, None]
        cache = self.cache[:, n0:n0 + k] if self.lean is None else torch.zeros(
            self.cfg.n_layers, k, P, self.cfg.kv_cache_numbers_per_token_layer, dtype=self.lean.lat.dtype,
            device=self.device)
        h = self.model.hidden(ids, None, causal, cache, 0, absorb=False)
        if self.lean is not None:
            self.lean.load_rows(n0, cache)
        last = torch.tensor([len(r.prompt) - 1 for r in new], device=self.device)
        logits = mask_vocab(self.model.logits(h[torch.arange(k, device=self.device), last]), self.sample_vocab)
        for r in new:
            r.cached = len(r.prompt)
        self.rows.extend(new)
        self.stats.prefills += 1
        self.stats.prefill_tokens += sum(len(r.prompt) for r in new)
        self._sample_and_emit(new, logits)
        return k

    def _decode(self) -> int:
        rows = self.rows
        B = len(rows)
        self.stats.max_batch = max(self.stats.max_batch, B)
        last = torch.tensor([[r.tokens[-1]] for r in rows], device=self.device)
        pos = torch.tensor([r.cached for r in rows], device=self.device)
        start = int(pos.max())
        if self.lean is not None:
            logits = mask_vocab(self.lean.step(last.view(B), start, pos=pos), self.sample_vocab)
        else:
            mask = torch.arange(start + 1, device=self.device)[None, :] <= pos[:, None]  # (B, S): own keys only
            h = self.model.hidden(last, pos[:, None], mask[:, None, None], self.cache[:, :B], start, absorb=True,
                                  write_pos=pos)
            logits = mask_vocab(self.model.logits(h[:, -1]), self.sample_vocab)
        for r in rows:
            r.cached += 1
        self.stats.decode_tokens += B
        self._sample_and_emit(rows, logits)
        return B

    def _sample_and_emit(self, rows: list[Request], logits: torch.Tensor) -> None:
        greedy = logits.argmax(dim=-1).tolist()
        for i, r in enumerate(rows):
            if r.cancelled:
                continue
            tok = greedy[i] if r.params.greedy else int(sample(logits[i:i + 1], r.params, r.generator)[0])
            r.tokens.append(tok)
            if r.logprobs is not None:
                logp = logits[i].float().log_softmax(-1)
                top = logp.topk(min(r.logprobs, logp.numel())) if r.logprobs > 0 else None
                r.token_logprobs.append(TokenLogprob(float(logp[tok]), [] if top is None else list(
                    zip(top.indices.tolist(), top.values.tolist()))))
            reason = "stop" if tok in self.stop_ids and not r.ignore_eos else "length" if len(r.tokens) >= r.max_new_tokens else None
            if r.on_token is not None:
                try:
                    r.on_token(tok, reason)
                except Exception:  # noqa: BLE001 -- a broken consumer (closed loop) loses its request only
                    r.cancelled = True
            if reason is not None:
                self._finish(r, reason)

    def _finish(self, r: Request, reason: str) -> None:
        r.finish_reason = reason
        r.done.set()

    def _retire(self) -> None:
        """Free the rows of finished or cancelled requests, moving the last row into each hole."""
        i = 0
        while i < len(self.rows):
            r = self.rows[i]
            if r.finish_reason is None and not r.cancelled:
                i += 1
                continue
            if r.finish_reason is None:
                self._finish(r, "cancelled")
                self.stats.cancelled += 1
            key = self._key(r)
            self.group_rows[key] -= 1
            if not self.group_rows[key]:
                del self.group_rows[key]
            self.client_rows[r.client] -= 1
            if not self.client_rows[r.client]:
                del self.client_rows[r.client]
            last = len(self.rows) - 1
            if i != last:
                moved = self.rows[last]
                if self.lean is not None:
                    self.lean.move_row(last, i, moved.cached)
                else:
                    self.cache[:, i, :moved.cached] = self.cache[:, last, :moved.cached]
                self.rows[i] = moved
            self.rows.pop()

    def _fail_all(self) -> None:
        """After an exception inside a step: end every request with "error" and start clean."""
        with self._cv:
            victims = self.rows + list(self.pending)
            self.rows, self.pending, self.group_rows, self.client_rows = [], FairQueue(), {}, {}
        for r in victims:
            if r.finish_reason is None:
                if r.on_token is not None and not r.cancelled:
                    with contextlib.suppress(Exception):  # its consumer may be gone too
                        r.on_token(None, "error")
                self._finish(r, "error")

    # ---- background loop ---------------------------------------------------------------------------------
    def start(self) -> Batcher:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="nanoseek-batcher", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self.rows and not self.pending:
                    self._cv.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as e:  # noqa: BLE001 -- keep serving; the affected requests get "error"
                import traceback
                traceback.print_exception(e)
                self._fail_all()

    # ---- synchronous use (tests, benchmarks) -----------------------------------------------------------
    def generate(self, prompts: list[list[int]], max_new_tokens: int, params: SamplingParams | None = None,
                 seed: int | None = None) -> list[Request]:
        """Submit all prompts and step until every one has finished (only without the background thread)."""
        if self._thread is not None:
            raise RuntimeError("generate() drives the loop itself; do not call it after start()")
        reqs = [self.submit(Request(list(p), max_new_tokens, params or SamplingParams(),
                                    None if seed is None else seed + i)) for i, p in enumerate(prompts)]
        while any(r.finish_reason is None for r in reqs):
            self.step()
        return reqs
