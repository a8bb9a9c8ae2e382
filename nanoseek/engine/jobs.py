"""The HTTP server's requests on the batcher (nanoseek.engine.server): every choice of a request is one
`batcher.Request`; `Job` holds them with their token queue and cancels them together; `Mailbox` carries the
batcher thread's tokens into asyncio queues with one event-loop wake-up per burst. The queue is unbounded, so a
slow reader only delays itself.
"""
from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

from nanoseek.engine.batcher import Batcher, Request
from nanoseek.engine.protocol import ChoiceStream


@dataclass(eq=False)
class Choice:
    req: Request
    stream: ChoiceStream
    prompt_tokens: int
    lp_sent: int = 0  # logprob entries already streamed


class Job:
    """All choices of one HTTP request, their token queue, and cancellation."""

    def __init__(self, batcher: Batcher, choices: list[Choice], queue: asyncio.Queue, prompt_tokens: int):
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
            for i, tok, fin, lp in batch:
                c = self.choices[i]
                if c.stream.finish_reason is not None:
                    continue
                if tok is None:  # the batcher failed this request
                    c.stream.finish_reason = "error"
                    self.live -= 1
                    out.append((i, {}, "error"))
                    continue
                deltas = c.stream.feed(tok, fin, lp)
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


class Mailbox:
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
