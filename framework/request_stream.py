"""Streams and errors of the async front end (:mod:`framework.async_engine`).

A :class:`RequestStream` is what ``AsyncEngine.add_request`` returns: an async iterator of
:class:`~framework.outputs.RequestOutput` deltas, fed from the engine thread through the event
loop. The errors are what a request can end with after it was accepted, or why it was not.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any, AsyncIterator, Callable

from framework.errors import DecodekitError
from framework.outputs import CompletionOutput, RequestOutput

__all__ = [
    "RequestStream",
    "EngineOverloadedError",
    "QueueFullError",
    "EngineShutdownError",
    "RequestTimeoutError",
    "RequestAbortedError",
    "EngineStepError",
    "RequestFailedError",
]


# ------------------------------------------------------------------------------------ errors
class EngineOverloadedError(DecodekitError):
    """The engine cannot take the request now; retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class QueueFullError(EngineOverloadedError):
    """The bounded waiting queue is full (HTTP 429 with ``Retry-After``)."""


class EngineShutdownError(EngineOverloadedError):
    """The engine is shutting down or stopped (HTTP 503)."""


class RequestTimeoutError(DecodekitError):
    """A request ran past its timeout and was aborted (its KV blocks are free again)."""


class RequestAbortedError(DecodekitError):
    """A request was aborted by the server (shutdown), not by its own consumer."""


class EngineStepError(DecodekitError):
    """An engine step raised; the requests in flight at that moment were failed and aborted."""


class RequestFailedError(DecodekitError):
    """The engine accepted the request but could not run it (``RequestOutput.error``), e.g. its
    constraint failed to compile or did not compile in time. It never held KV blocks;
    ``output`` is its final output (completions with finish reason ``"error"``)."""

    def __init__(self, message: str, output: Any = None):
        super().__init__(message)
        self.output = output


# ------------------------------------------------------------------------------------ streams
END = object()


def _merge(a: RequestOutput, b: RequestOutput) -> RequestOutput:
    """Delta ``a`` followed by delta ``b`` as one delta (outputs that piled up)."""
    by_index = {c.index: c for c in a.outputs}
    for c in b.outputs:
        p = by_index.get(c.index)
        if p is None:
            by_index[c.index] = c
            continue
        lps = None if p.logprobs is None or c.logprobs is None else [*p.logprobs, *c.logprobs]
        by_index[c.index] = replace(c, text=p.text + c.text, token_ids=[*p.token_ids, *c.token_ids], logprobs=lps)
    return replace(b, outputs=sorted(by_index.values(), key=lambda c: c.index))  # sentinel: the stream is over


class RequestStream:
    """The outputs of one request, as an async iterator of :class:`RequestOutput` *deltas*.

    Each delta carries, for every completion that changed since the previous delta, only the new
    ``text``, ``token_ids`` and ``logprobs`` (``finish_reason`` is set on the completion's last
    delta). When the consumer is slower than the engine, the outputs that piled up are merged
    into one delta. The engine hands streaming requests deltas already (``RequestOutput.delta``:
O(new tokens) per step) and its final output cumulative; ``final`` holds that last cumulative
output once the stream is over.
    Iterating raises :class:`RequestTimeoutError`, :class:`RequestAbortedError`,
    :class:`EngineStepError` or :class:`RequestFailedError` when the request ended that way.
    """

    def __init__(self, request_id: str, abort: Callable[[str], None]):
        self.request_id = request_id
        self._abort = abort
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._sent_chars: dict[int, int] = {}
        self._sent_tokens: dict[int, int] = {}
        self._finished: set[int] = set()
        self.final: RequestOutput | None = None
        self.done = False  # the engine has nothing more for this stream
        self._active = False  # counted in AsyncEngine.num_active (event loop thread only)

    # called on the event loop thread (through call_soon_threadsafe)
    def _put(self, item: Any) -> None:
        self._queue.put_nowait(item)

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RequestOutput]:
        while not self.done:
            items = [await self._queue.get()]
            while not self._queue.empty():  # coalesce what piled up
                items.append(self._queue.get_nowait())
            merged: RequestOutput | None = None
            error: BaseException | None = None
            for item in items:
                if item is END:
                    self.done = True
                elif isinstance(item, BaseException):
                    error = item
                    self.done = True
                else:
                    if not item.delta:
                        self.final = item
                    delta = self._delta(item)
                    if delta is not None:
                        merged = delta if merged is None else _merge(merged, delta)
            if merged is not None:
                yield merged
            if error is not None:
                raise error

    def _delta(self, out: RequestOutput) -> RequestOutput | None:
        """The part of ``out`` not yet sent: engine deltas (``out.delta``) as they are, cumulative
        outputs (a request's final one) sliced past what was sent."""
        changed: list[CompletionOutput] = []
        for c in out.outputs:
            i = c.index
            if i in self._finished:
                continue
            a, t = self._sent_chars.get(i, 0), self._sent_tokens.get(i, 0)
            if out.delta:
                if not c.text and not c.token_ids and c.finish_reason is None:
                    continue
                d = c
                self._sent_chars[i], self._sent_tokens[i] = a + len(c.text), t + len(c.token_ids)
            else:
                n_tok = len(c.token_ids)
                if len(c.text) == a and n_tok == t and c.finish_reason is None:
                    continue
                lps = None if c.logprobs is None else list(c.logprobs[t:n_tok])
                d = replace(c, text=c.text[a:], token_ids=c.token_ids[t:], logprobs=lps)
                self._sent_chars[i], self._sent_tokens[i] = len(c.text), n_tok
            changed.append(d)
            if c.finish_reason is not None:
                self._finished.add(i)
        if not changed and not out.finished:
            return None
        return replace(out, outputs=changed, delta=True)

    def abort(self) -> None:
        """Abort this request (no-op once it is over). Safe to call from a ``finally``."""
        if not self.done:
            self._abort(self.request_id)

    async def result(self) -> RequestOutput:
        """Wait for the end and return the final, cumulative output."""
        async for _ in self:
            pass
        assert self.final is not None
        return self.final
