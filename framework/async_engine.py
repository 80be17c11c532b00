"""The async front end: one thread drives :class:`~framework.engine.LLMEngine`, asyncio code talks to it.

The engine is not thread-safe, so exactly one background thread owns it. That thread runs the
step loop for as long as there is work and sleeps on a condition variable when there is none.
asyncio callers never touch the engine: :meth:`AsyncEngine.add_request` and
:meth:`AsyncEngine.abort` post *commands* that the engine thread applies between two steps, and
outputs travel back with ``loop.call_soon_threadsafe`` (one call per step for every request that
progressed) into a per-request :class:`RequestStream`::

    aengine = AsyncEngine(engine, max_queue=256, request_timeout=600)
    aengine.start()                                   # from a running event loop
    stream = await aengine.add_request("r1", "Once upon a time", SamplingParams(max_tokens=32))
    async for delta in stream:                        # RequestOutput deltas
        print(delta.outputs[0].text, end="")
    await aengine.shutdown()

Guarantees:

* a bad request raises :class:`~framework.errors.InvalidRequestError` from ``add_request`` (the
  engine validates before it changes any state), so it never disturbs the running batch;
* every request ends: finished, aborted by :meth:`~AsyncEngine.abort` (from any thread), timed
  out, or aborted at shutdown; in every case :meth:`LLMEngine.abort_request` or the engine's own
  finishing path returns its KV blocks to the pool;
* the waiting queue is bounded: a full one raises :class:`QueueFullError` at once;
* an unexpected exception in a step (a plugin bug) fails the requests in flight with
  :class:`EngineStepError` and the loop carries on; it never kills the thread;
* a request the engine accepted but could not run (``RequestOutput.error``: its constraint did
  not compile) ends its stream with :class:`RequestFailedError`.

Streams and errors live in :mod:`framework.request_stream` (re-exported here).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from framework.errors import InvalidRequestError
from framework.outputs import RequestOutput
from framework.request_stream import (
    END,
    EngineOverloadedError,
    EngineShutdownError,
    EngineStepError,
    QueueFullError,
    RequestAbortedError,
    RequestFailedError,
    RequestStream,
    RequestTimeoutError,
)

if TYPE_CHECKING:  # pragma: no cover
    from framework.engine import LLMEngine, PromptType
    from framework.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

__all__ = [
    "AsyncEngine",
    "AsyncEngineConfig",
    "EngineObserver",
    "RequestStream",
    "EngineSnapshot",
    "EngineOverloadedError",
    "QueueFullError",
    "EngineShutdownError",
    "RequestTimeoutError",
    "RequestAbortedError",
    "EngineStepError",
    "RequestFailedError",
]


# ------------------------------------------------------------------------------------ engine
@dataclass(slots=True)
class EngineSnapshot:
    """Counters published by the engine thread after every step (safe to read from any thread)."""

    num_waiting: int = 0  # sequences in the scheduler's waiting queue
    num_running: int = 0  # sequences in the running batch
    num_requests: int = 0  # requests the engine holds (waiting, running or finishing)
    kv_blocks_total: int = 0
    kv_blocks_used: int = 0
    prefix_cache_hit_rate: float = 0.0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_prefill_tokens: int = 0
    num_generated_tokens: int = 0
    num_preemptions: int = 0
    steps: int = 0
    # speculative decoding's counters (``spec_*`` of ``LLMEngine.stats()``; empty without a drafter)
    speculative: dict[str, float] = field(default_factory=dict)

    @property
    def kv_blocks_free(self) -> int:
        return self.kv_blocks_total - self.kv_blocks_used


@dataclass(slots=True)
class _Tracked:
    stream: RequestStream
    loop: asyncio.AbstractEventLoop
    deadline: float | None
    last_token_time: float | None = None
    saw_first_token: bool = False


@dataclass(slots=True)
class _Command:
    kind: str  # "add" | "abort" | "abort_all"
    request_id: str = ""
    prompt: Any = None
    params: Any = None
    tracked: _Tracked | None = None
    future: asyncio.Future | None = None
    error: BaseException | None = None


class EngineObserver:
    """Hooks the engine thread calls (metrics). Keep them cheap: they run between steps."""

    def on_added(self, request_id: str, num_prompt_tokens: int) -> None: ...

    def on_first_token(self, ttft: float) -> None: ...

    def on_tokens(self, itl: float) -> None: ...

    def on_finished(self, output: RequestOutput, reason: str) -> None: ...


@dataclass(slots=True)
class AsyncEngineConfig:
    """Limits of the async front end."""

    max_queue: int = 256  # requests allowed to wait for a place in the running batch (>= 1)
    request_timeout: float | None = None  # seconds from arrival; None = no limit
    retry_after: float = 1.0  # seconds suggested to clients turned away
    observers: list[EngineObserver] = field(default_factory=list)


class AsyncEngine:
    """Serve one :class:`LLMEngine` to asyncio code from a dedicated engine thread."""

    def __init__(self, engine: "LLMEngine", config: AsyncEngineConfig | None = None, **kwargs: Any):
        self.engine = engine
        self.config = config or AsyncEngineConfig(**kwargs)
        if self.config.max_queue < 1:
            raise ValueError("max_queue must be >= 1")
        self._cond = threading.Condition()
        self._commands: list[_Command] = []
        self._tracked: dict[str, _Tracked] = {}  # engine thread only
        self._deadlines: list[tuple[float, str]] = []  # engine thread only (heap)
        self._pending_adds = 0  # posted, not yet applied (guarded by _cond)
        self._num_active = 0  # accepted streams not yet over (event loop thread)
        self._accepting = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.snapshot = EngineSnapshot()
        self._publish()

    # ------------------------------------------------------------------ life cycle
    def start(self) -> None:
        """Start the engine thread; call from the event loop that will add requests."""
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._accepting = True
        self._thread = threading.Thread(target=self._run, name="decodekit-engine", daemon=True)
        self._thread.start()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def accepting(self) -> bool:
        return self._accepting and self.is_running

    @property
    def num_active(self) -> int:
        """Requests accepted whose streams are not over yet."""
        return self._num_active

    def stop_accepting(self) -> None:
        """Refuse new requests (:class:`EngineShutdownError`); the ones in flight go on."""
        self._accepting = False

    def resume_accepting(self) -> None:
        """Take new requests again after :meth:`stop_accepting` (not after :meth:`shutdown`)."""
        if not self._stopping:
            self._accepting = True

    async def drain(self, grace: float = 30.0) -> None:
        """Stop accepting, let the requests in flight finish for up to ``grace`` seconds, then
        abort the rest: their streams end with :class:`RequestAbortedError` and their KV blocks
        return to the pool. The engine thread keeps running (see :meth:`shutdown`)."""
        self._accepting = False
        deadline = time.monotonic() + max(0.0, grace)
        while self._num_active and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self._num_active:
            self._post(_Command("abort_all", error=RequestAbortedError("the server is shutting down")))
            settle = time.monotonic() + 5.0  # the streams receive their error (next loop turn)
            while self._num_active and self.is_running and time.monotonic() < settle:
                await asyncio.sleep(0.005)

    async def shutdown(self, grace: float = 30.0) -> None:
        """:meth:`drain` (stop accepting, ``grace`` seconds to finish, abort the rest), then stop
        the engine thread and join it."""
        await self.drain(grace)
        self._post(_Command("abort_all", error=RequestAbortedError("the server is shutting down")))
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        await asyncio.sleep(0)  # let the final deliveries run

    # ------------------------------------------------------------------ requests
    def queue_length(self) -> int:
        """Requests waiting for a place in the batch (scheduler queue + not yet applied)."""
        return self.snapshot.num_waiting + self._pending_adds

    async def add_request(
        self,
        request_id: str,
        prompt: "PromptType",
        params: "SamplingParams",
        *,
        timeout: float | None = None,
    ) -> RequestStream:
        """Queue a request; returns its stream once the engine accepted it.

        Raises :class:`InvalidRequestError` (bad prompt or parameters), :class:`QueueFullError`
        (the waiting queue holds ``max_queue`` requests) or :class:`EngineShutdownError`.
        ``timeout`` (seconds) overrides the configured per-request timeout.
        """
        if not self.accepting:
            raise EngineShutdownError("the server is shutting down", self.config.retry_after)
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            raise RuntimeError("AsyncEngine.add_request must be called from the loop that started it")
        if self.queue_length() >= self.config.max_queue:
            raise QueueFullError(
                f"the waiting queue is full ({self.config.max_queue} requests); retry later",
                self.config.retry_after,
            )
        timeout = self.config.request_timeout if timeout is None else timeout
        stream = RequestStream(request_id, self.abort)
        deadline = None if timeout is None else time.perf_counter() + timeout
        fut: asyncio.Future = loop.create_future()
        tracked = _Tracked(stream, loop, deadline)
        stream._active = True
        self._num_active += 1
        with self._cond:
            self._pending_adds += 1
            self._commands.append(_Command("add", request_id, prompt, params, tracked, fut))
            self._cond.notify()
        try:
            await fut  # raises the engine's InvalidRequestError
        except BaseException:
            self._release(stream)
            if fut.cancelled():  # our caller went away: make sure the request does not run
                self.abort(request_id)
            raise
        return stream

    async def generate(self, request_id: str, prompt: "PromptType", params: "SamplingParams", **kw: Any) -> RequestOutput:
        """Run one request to the end; returns its final output (aborts it if cancelled)."""
        stream = await self.add_request(request_id, prompt, params, **kw)
        try:
            return await stream.result()
        finally:
            stream.abort()

    def abort(self, request_id: str) -> None:
        """Abort a request (from any thread); its blocks are freed before the next step."""
        self._post(_Command("abort", request_id))

    def _post(self, cmd: _Command) -> None:
        with self._cond:
            self._commands.append(cmd)
            self._cond.notify()

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        eng = self.engine
        while True:
            with self._cond:
                while not self._commands and not self._stopping and not eng.has_unfinished_requests():
                    self._cond.wait()
                cmds, self._commands = self._commands, []
                stopping = self._stopping
            deliveries: list[tuple[_Tracked, Any]] = []
            num_adds = sum(1 for cmd in cmds if cmd.kind == "add")
            for cmd in cmds:
                self._apply(cmd, deliveries)
            if stopping and self._tracked:  # stragglers added while shutdown began
                self._abort_all(RequestAbortedError("the server is shutting down"), deliveries)
            self._expire(deliveries)
            progressed = True
            if eng.has_unfinished_requests():
                before = eng.step_count
                try:
                    outputs = eng.step()
                except Exception as exc:  # noqa: BLE001 - a plugin bug must not kill the server
                    logger.exception("engine step failed; failing the requests in flight")
                    outputs = []
                    self._abort_all(EngineStepError(f"engine step failed: {type(exc).__name__}: {exc}"), deliveries)
                progressed = eng.step_count != before
                self._handle_outputs(outputs, deliveries)
            self._publish()
            if num_adds:  # counted as pending until the snapshot shows them as waiting or running
                with self._cond:
                    self._pending_adds -= num_adds
            self._deliver(deliveries)
            if stopping and not self._tracked and not eng.has_unfinished_requests():
                with self._cond:
                    if not self._commands:
                        return
            if not progressed:  # nothing could be scheduled this step: do not spin
                with self._cond:
                    if not self._commands:
                        self._cond.wait(0.002)

    def _apply(self, cmd: _Command, deliveries: list) -> None:
        eng = self.engine
        if cmd.kind == "add":
            tracked = cmd.tracked
            assert tracked is not None and cmd.future is not None
            try:
                if self._stopping or not self._accepting:
                    raise EngineShutdownError("the server is shutting down", self.config.retry_after)
                req = eng.add_request(cmd.request_id, cmd.prompt, cmd.params, stream=True)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                if not isinstance(exc, (InvalidRequestError, EngineShutdownError)):
                    logger.exception("add_request failed")
                self._resolve(tracked.loop, cmd.future, exc)
                return
            self._tracked[cmd.request_id] = tracked
            if tracked.deadline is not None:
                heapq.heappush(self._deadlines, (tracked.deadline, cmd.request_id))
            for obs in self.config.observers:
                obs.on_added(cmd.request_id, len(req.prompt_token_ids))
            self._resolve(tracked.loop, cmd.future, None)
        elif cmd.kind == "abort":
            self._abort_one(cmd.request_id, None, deliveries)
        elif cmd.kind == "abort_all":
            self._abort_all(cmd.error, deliveries)

    @staticmethod
    def _resolve(loop: asyncio.AbstractEventLoop, fut: asyncio.Future, exc: BaseException | None) -> None:
        def done() -> None:
            if fut.done():
                return
            if exc is None:
                fut.set_result(None)
            else:
                fut.set_exception(exc)

        try:
            loop.call_soon_threadsafe(done)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    def _abort_one(self, request_id: str, error: BaseException | None, deliveries: list) -> None:
        out = None
        try:
            out = self.engine.abort_request(request_id)
        except Exception:  # noqa: BLE001
            logger.exception("abort_request(%r) failed", request_id)
        tracked = self._tracked.pop(request_id, None)
        if tracked is None:
            return
        if out is not None:
            deliveries.append((tracked, out))
            self._notify_finished(out, "timeout" if isinstance(error, RequestTimeoutError) else "abort")
        deliveries.append((tracked, error if error is not None else END))

    def _abort_all(self, error: BaseException | None, deliveries: list) -> None:
        for rid in list(self._tracked):
            self._abort_one(rid, error, deliveries)
        for rid in list(getattr(self.engine, "requests", {})):  # anything not tracked (should be none)
            self.engine.abort_request(rid)

    def _expire(self, deliveries: list) -> None:
        if not self._deadlines:
            return
        now = time.perf_counter()
        while self._deadlines and self._deadlines[0][0] <= now:
            _, rid = heapq.heappop(self._deadlines)
            if rid in self._tracked:
                self._abort_one(rid, RequestTimeoutError(f"request {rid} timed out"), deliveries)

    def _handle_outputs(self, outputs: list[RequestOutput], deliveries: list) -> None:
        observers = self.config.observers
        for out in outputs:
            tracked = self._tracked.get(out.request_id)
            if tracked is None:
                continue
            m = out.metrics
            if observers and m.first_token_time is not None:
                if not tracked.saw_first_token:
                    tracked.saw_first_token = True
                    ttft = m.ttft
                    for obs in observers:
                        obs.on_first_token(ttft if ttft is not None else 0.0)
                elif tracked.last_token_time is not None and m.last_token_time is not None and m.last_token_time > tracked.last_token_time:
                    itl = m.last_token_time - tracked.last_token_time
                    for obs in observers:
                        obs.on_tokens(itl)
                tracked.last_token_time = m.last_token_time
            error = getattr(out, "error", None) if out.finished else None
            if error is not None:  # failed before its first token: the error is all there is to stream
                del self._tracked[out.request_id]
                deliveries.append((tracked, RequestFailedError(error, out)))
                self._notify_finished(out, "finished")
                continue
            deliveries.append((tracked, out))
            if out.finished:
                del self._tracked[out.request_id]
                deliveries.append((tracked, END))
                self._notify_finished(out, "finished")

    def _notify_finished(self, out: RequestOutput, reason: str) -> None:
        for obs in self.config.observers:
            try:
                obs.on_finished(out, reason)
            except Exception:  # noqa: BLE001
                logger.exception("observer failed")

    def _deliver(self, deliveries: list[tuple[_Tracked, Any]]) -> None:
        if not deliveries:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Tracked, Any]]] = {}
        for tracked, item in deliveries:
            by_loop.setdefault(tracked.loop, []).append((tracked, item))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(self._deliver_on_loop, items)
            except RuntimeError:  # loop closed
                pass

    def _deliver_on_loop(self, items: list[tuple[_Tracked, Any]]) -> None:
        for tracked, item in items:
            tracked.stream._put(item)
            if item is END or isinstance(item, BaseException):
                self._release(tracked.stream)

    def _release(self, stream: RequestStream) -> None:
        if stream._active:
            stream._active = False
            self._num_active -= 1

    def _publish(self) -> None:
        s = self.engine.stats()
        self.snapshot = EngineSnapshot(
            num_waiting=int(s["num_waiting"]),
            num_running=int(s["num_running"]),
            num_requests=len(self._tracked),
            kv_blocks_total=int(s["kv_blocks_total"]),
            kv_blocks_used=int(s["kv_blocks_used"]),
            prefix_cache_hit_rate=float(s["prefix_cache_hit_rate"]),
            prefix_cache_queries=int(s["prefix_cache_queries"]),
            prefix_cache_hits=int(s["prefix_cache_hits"]),
            num_prefill_tokens=int(s["num_prefill_tokens"]),
            num_generated_tokens=int(s["num_generated_tokens"]),
            num_preemptions=int(s["num_preemptions"]),
            steps=int(s["steps"]),
            speculative={k: float(v) for k, v in s.items() if k.startswith("spec_")},
        )
