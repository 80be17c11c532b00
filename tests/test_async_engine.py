"""The async front end: one engine thread, asyncio streams, aborts, timeouts, a bounded queue."""

from __future__ import annotations

import asyncio
import time

import pytest

from framework import LLMEngine, SamplingParams
from framework.async_engine import (
    AsyncEngine,
    EngineShutdownError,
    EngineStepError,
    QueueFullError,
    RequestAbortedError,
    RequestFailedError,
    RequestTimeoutError,
)
from framework.errors import InvalidRequestError

LONG = SamplingParams(max_tokens=300, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(text_model) -> LLMEngine:
    return LLMEngine(str(text_model), kv_cache_memory="8MiB", max_num_seqs=4)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def assert_clean(engine: LLMEngine) -> None:
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.check_all_free()


async def started(engine: LLMEngine, **kw) -> AsyncEngine:
    ae = AsyncEngine(engine, **kw)
    ae.start()
    return ae


def test_streams_match_offline_and_concatenate(engine):
    params = [SamplingParams(max_tokens=12, temperature=0.8, seed=i, ignore_eos=True) for i in range(6)]
    prompts = [f"prompt {i} once upon" for i in range(6)]
    offline = {}
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(f"off{i}", p, sp)
    while engine.has_unfinished_requests():
        for out in engine.step():
            offline[out.request_id] = out.outputs[0].text

    async def main():
        ae = await started(engine)
        streams = [await ae.add_request(f"r{i}", p, sp) for i, (p, sp) in enumerate(zip(prompts, params))]

        async def consume(s):
            text, tokens, n_deltas = "", [], 0
            async for delta in s:
                n_deltas += 1
                for c in delta.outputs:
                    text += c.text
                    tokens += c.token_ids
            return text, tokens, n_deltas

        results = await asyncio.gather(*(consume(s) for s in streams))
        await ae.shutdown()
        return results, streams

    results, streams = run(main())
    for i, ((text, tokens, n_deltas), s) in enumerate(zip(results, streams)):
        assert text == offline[f"off{i}"] == s.final.outputs[0].text
        assert tokens == s.final.outputs[0].token_ids and len(tokens) == 12
        assert n_deltas >= 1
    assert_clean(engine)


def test_bad_request_raises_and_others_continue(engine):
    async def main():
        ae = await started(engine)
        good = await ae.add_request("good", "Hello", SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
        with pytest.raises(InvalidRequestError):
            await ae.add_request("bad", [10**9], SamplingParams())
        with pytest.raises(InvalidRequestError):
            await ae.add_request("good", "dup id", SamplingParams())
        out = await good.result()
        await ae.shutdown()
        return out

    out = run(main())
    assert out.finished and len(out.outputs[0].token_ids) == 20
    assert_clean(engine)


def test_abort_from_another_thread_frees_blocks(engine):
    async def main():
        ae = await started(engine)
        s = await ae.add_request("a", "Hello", LONG)
        it = s.__aiter__()
        await it.__anext__()
        await asyncio.to_thread(ae.abort, "a")
        rest = [d async for d in it]
        await ae.shutdown()
        return s, rest

    s, rest = run(main())
    assert s.final.outputs[0].finish_reason == "abort"
    assert len(s.final.outputs[0].token_ids) < 300
    assert_clean(engine)


def test_timeout_aborts(engine):
    async def main():
        ae = await started(engine, request_timeout=0.05)
        s = await ae.add_request("t", "Hello", SamplingParams(max_tokens=400, temperature=0, ignore_eos=True))
        with pytest.raises(RequestTimeoutError):
            await s.result()
        await ae.shutdown()

    run(main())
    assert_clean(engine)


def test_queue_bound(engine):
    async def main():
        ae = await started(engine, max_queue=2)
        streams, rejected = [], 0
        for i in range(12):
            try:
                streams.append(await ae.add_request(f"q{i}", "Hello", LONG))
            except QueueFullError as exc:
                rejected += 1
                assert exc.retry_after > 0
        for s in streams:
            s.abort()
        for s in streams:
            await s.result()
        await ae.shutdown()
        return len(streams), rejected

    accepted, rejected = run(main())
    assert rejected > 0 and accepted >= 4  # 4 run (max_num_seqs), up to 2 wait
    assert accepted <= 4 + 2
    assert_clean(engine)


def test_shutdown_aborts_after_grace_and_refuses_new(engine):
    async def main():
        ae = await started(engine)
        s = await ae.add_request("s", "Hello", SamplingParams(max_tokens=450, temperature=0, ignore_eos=True))
        await s.__aiter__().__anext__()
        await ae.shutdown(grace=0.0)
        with pytest.raises(EngineShutdownError):
            await ae.add_request("late", "Hello", SamplingParams())
        with pytest.raises(RequestAbortedError):
            await s.result()
        return ae

    ae = run(main())
    assert not ae.is_running
    assert_clean(engine)


def test_step_error_fails_in_flight_and_engine_survives(engine, monkeypatch):
    real_step = engine.step
    calls = {"n": 0}

    def flaky_step():
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("plugin exploded")
        return real_step()

    async def main():
        ae = await started(engine)
        monkeypatch.setattr(engine, "step", flaky_step)
        s = await ae.add_request("x", "Hello", LONG)
        with pytest.raises(EngineStepError):
            await s.result()
        ok = await ae.generate("y", "Hello", SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
        await ae.shutdown()
        return ok

    ok = run(main())
    assert len(ok.outputs[0].token_ids) == 5
    assert_clean(engine)


def test_cancelled_caller_does_not_leave_its_request_running(engine):
    async def main():
        ae = await started(engine)
        task = asyncio.ensure_future(ae.generate("c", "Hello", LONG))
        await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.05)
        active = ae.num_active
        await ae.shutdown()
        return active

    assert run(main()) == 0
    assert_clean(engine)


def test_constraint_that_fails_to_compile_ends_the_stream_with_its_error(engine):
    async def main():
        ae = await started(engine)
        ok = await ae.add_request("ok", "Hello", SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
        bad = await ae.add_request("bad", "Hello", SamplingParams(max_tokens=8, grammar="start: undefined_rule"))
        deltas = []
        with pytest.raises(RequestFailedError) as ei:
            async for delta in bad:
                deltas.append(delta)
        out = await ok.result()
        await ae.shutdown()
        return deltas, ei.value, out

    deltas, err, out = run(main())
    assert deltas == []  # nothing streamed before the error
    assert "undefined_rule" in str(err) and err.output.outputs[0].finish_reason == "error"
    assert len(out.outputs[0].token_ids) == 8  # the other request was not disturbed
    assert_clean(engine)


def test_drain_finishes_short_requests_and_aborts_long_ones(engine, monkeypatch):
    real_step = engine.step

    def slow_step():  # 450 tokens take >= 2 s: far beyond the grace
        time.sleep(0.005)
        return real_step()

    monkeypatch.setattr(engine, "step", slow_step)

    async def main():
        ae = await started(engine)
        short = await ae.add_request("short", "Hello", SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
        long = await ae.add_request("long", "Hello", SamplingParams(max_tokens=450, temperature=0, ignore_eos=True))
        await long.__aiter__().__anext__()
        await ae.drain(grace=0.3)
        alive = ae.is_running  # the engine thread outlives a drain
        with pytest.raises(EngineShutdownError):
            await ae.add_request("late", "Hello", SamplingParams())
        with pytest.raises(RequestAbortedError):
            await long.result()
        out = await short.result()
        await ae.shutdown()
        return alive, out

    alive, out = run(main())
    assert alive and len(out.outputs[0].token_ids) == 5 and out.outputs[0].finish_reason == "length"
    assert_clean(engine)
