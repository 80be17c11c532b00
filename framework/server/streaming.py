"""Server-Sent Events for streamed completions and chat completions.

For a constrained request the route first waits for the first delta (:func:`prime`), so that a
constraint that fails to compile after admission still gets a proper HTTP status (400). Each
generator turns :class:`~framework.request_stream.RequestStream`
deltas into OpenAI stream chunks, ends with ``data: [DONE]`` and, in its ``finally``, aborts the
requests it streams (a no-op when they finished): a client that disconnects cancels the
generator, so its requests stop and their KV blocks return to the pool.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any, AsyncIterator, TypeVar

from framework.outputs import RequestOutput
from framework.request_stream import (
    EngineStepError,
    RequestAbortedError,
    RequestFailedError,
    RequestStream,
    RequestTimeoutError,
)
from framework.sampling_params import SamplingParams
from framework.server.errors import APIError, bad_request, internal, overloaded
from framework.server.responses import (
    SSE_DONE,
    chat_logprobs,
    completion_logprobs,
    finish_reason,
    join_logprobs,
    prompt_logprobs,
    sse,
    usage,
)

if TYPE_CHECKING:  # pragma: no cover
    from framework.server.app import ServerState

STREAM_ERRORS = (RequestTimeoutError, RequestAbortedError, EngineStepError, RequestFailedError)
"""How an accepted request can end badly."""

T = TypeVar("T")


def stream_error(exc: BaseException, param: str | None = None) -> APIError:
    """The API error for a request that ended badly after it was accepted (``param``: the
    request field a :class:`RequestFailedError` is blamed on, its constraint's)."""
    if isinstance(exc, RequestTimeoutError):
        return APIError(504, "the request timed out and was aborted", type="timeout_error", code="request_timeout")
    if isinstance(exc, RequestAbortedError):
        return overloaded(503, str(exc), 1.0)
    if isinstance(exc, RequestFailedError):  # e.g. a constraint that does not compile: the request's fault
        return bad_request(str(exc), param=param)
    return internal(str(exc))


async def prime(events: AsyncIterator[T]) -> AsyncIterator[T]:
    """Wait for the first item of ``events`` (raising what it raises) and return an iterator
    over all of them, that one included."""
    try:
        first = await events.__anext__()
    except StopAsyncIteration:
        first = None

    async def chained() -> AsyncIterator[T]:
        if first is None:
            return
        yield first
        async for item in events:
            yield item

    return chained()


async def merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Deltas of several streams as they come: ``(stream index, delta)``."""
    if len(streams) == 1:
        async for delta in streams[0]:
            yield 0, delta
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | None, BaseException | None]] = asyncio.Queue()

    async def pump(i: int, s: RequestStream) -> None:
        try:
            async for delta in s:
                queue.put_nowait((i, delta, None))
            queue.put_nowait((i, None, None))
        except Exception as exc:  # noqa: BLE001 - re-raised by the consumer
            queue.put_nowait((i, None, exc))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, delta, exc = await queue.get()
            if exc is not None:
                raise exc
            if delta is None:
                remaining -= 1
                continue
            yield i, delta
    finally:
        for t in tasks:
            t.cancel()


async def completion_events(state: "ServerState", rid: str, events: AsyncIterator[tuple[int, RequestOutput]],
                            streams: list[RequestStream], params: SamplingParams, echo: list[str],
                            include_usage: bool, error_param: str | None = None) -> AsyncIterator[str]:
    """Chunks of ``/v1/completions`` from ``events`` (:func:`merge` of ``streams``)."""
    created, name, k, n = int(time.time()), state.model_name, params.logprobs or 0, params.n
    offsets: dict[int, int] = {}
    extra = {"usage": None} if include_usage else {}
    try:
        async for i, delta in events:
            choices = []
            for c in delta.outputs:
                idx = i * n + c.index
                text = c.text
                first = idx not in offsets
                if first:
                    text = echo[i] + text
                    offsets[idx] = len(echo[i])
                lp = completion_logprobs(c, state.token_text, k, offsets[idx])
                if first and lp is not None and echo[i]:  # the echoed prompt's tokens lead the first chunk
                    lp = join_logprobs(prompt_logprobs(delta, state.token_text, k), lp)
                if lp is not None and lp["tokens"]:
                    offsets[idx] = lp["text_offset"][-1] + len(lp["tokens"][-1])
                reason = finish_reason(c)
                if not text and lp is None and reason is None:
                    continue
                choices.append({"index": idx, "text": text, "logprobs": lp, "finish_reason": reason})
            if choices:
                yield sse({"id": rid, "object": "text_completion", "created": created, "model": name,
                           "choices": choices, **extra})
        if include_usage:
            finals = [s.final for s in streams if s.final is not None]
            yield sse({"id": rid, "object": "text_completion", "created": created, "model": name,
                       "choices": [], "usage": usage(finals)})
    except STREAM_ERRORS as exc:
        yield sse(stream_error(exc, error_param).body())
    finally:
        for s in streams:
            s.abort()
    yield SSE_DONE


async def chat_events(state: "ServerState", rid: str, events: AsyncIterator[tuple[int, RequestOutput]],
                      stream: RequestStream, params: SamplingParams, include_usage: bool,
                      error_param: str | None = None) -> AsyncIterator[str]:
    """Chunks of ``/v1/chat/completions`` from ``events`` (:func:`merge` of ``[stream]``)."""
    created, name, k = int(time.time()), state.model_name, params.logprobs or 0
    started: set[int] = set()
    extra = {"usage": None} if include_usage else {}

    def chunk(choices: list[dict[str, Any]]) -> str:
        return sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": name,
                    "choices": choices, **extra})

    try:
        async for _, delta in events:
            choices = []
            for c in delta.outputs:
                if c.index not in started:
                    started.add(c.index)
                    choices.append({"index": c.index, "delta": {"role": "assistant", "content": ""},
                                    "logprobs": None, "finish_reason": None})
                lp = chat_logprobs(c, state.token_text, k)
                if c.text or (lp is not None and lp["content"]):
                    choices.append({"index": c.index, "delta": {"content": c.text}, "logprobs": lp, "finish_reason": None})
                if finish_reason(c) is not None:
                    choices.append({"index": c.index, "delta": {}, "logprobs": None, "finish_reason": finish_reason(c)})
            for choice in choices:  # one choice per chunk, as OpenAI sends them
                yield chunk([choice])
        if include_usage and stream.final is not None:
            yield sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": name,
                       "choices": [], "usage": usage([stream.final])})
    except STREAM_ERRORS as exc:
        yield sse(stream_error(exc, error_param).body())
    finally:
        stream.abort()
    yield SSE_DONE
