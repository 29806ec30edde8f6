"""AsyncEngine: one engine thread, streaming, cancellation frees blocks, bounded queue, failures never hang."""
from __future__ import annotations

import asyncio

import pytest

from hearthlm.config import CacheConfig, EngineConfig, SchedulerConfig
from hearthlm.engine.async_engine import AsyncEngine, EngineStepError
from hearthlm.engine.engine import LLMEngine
from hearthlm.errors import ContextLengthError, EngineDeadError, InvalidRequestError, QueueFullError
from hearthlm.sampling import SamplingParams

PROMPT = list(range(10, 30))


def make(tiny, max_num_seqs: int = 8, max_queue: int = 16) -> AsyncEngine:
    cfg = EngineConfig(model=tiny.path("llama"), dtype="float32", device="cpu", cache=CacheConfig(num_blocks=64),
                       scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_model_len=256))
    return AsyncEngine(LLMEngine(cfg), max_queue=max_queue, stats_interval_s=0.5)


async def collect(ae: AsyncEngine, prompt, params) -> list:
    return [out async for out in ae.generate(prompt, params)]


async def wait_free(ae: AsyncEngine, timeout: float = 5.0) -> None:
    async def poll():
        while ae.engine.has_unfinished() or not ae.engine.kv.all_free():
            await asyncio.sleep(0.01)
    await asyncio.wait_for(poll(), timeout)


def test_stream_matches_reference(tiny):
    ae = make(tiny)
    try:
        outs = asyncio.run(collect(ae, PROMPT, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)))
        assert outs[-1].finished and len(outs) == 12
        assert [len(o.outputs[0].token_ids) for o in outs] == list(range(1, 13))  # cumulative
        assert outs[-1].outputs[0].token_ids == tiny.reference("llama", PROMPT, 12)
    finally:
        ae.shutdown()


def test_cancel_aborts_and_frees_blocks(tiny):
    ae = make(tiny)

    async def main():
        got = []

        async def consume():
            async for out in ae.generate(PROMPT, SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)):
                got.append(out)

        task = asyncio.create_task(consume())
        while len(got) < 2:
            await asyncio.sleep(0.005)
        assert not ae.engine.kv.all_free()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_free(ae)
        assert len(got[-1].outputs[0].token_ids) < 200 and ae.engine.stats.requests_aborted == 1
        # closing an abandoned generator aborts too
        gen = ae.generate(PROMPT, SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
        await gen.__anext__()
        await gen.aclose()
        await wait_free(ae)

    try:
        asyncio.run(main())
    finally:
        ae.shutdown()


def test_typed_errors_and_queue_full(tiny):
    ae = make(tiny, max_num_seqs=1, max_queue=0)

    async def main():
        with pytest.raises(InvalidRequestError, match="empty"):
            await collect(ae, "", SamplingParams())
        with pytest.raises(ContextLengthError):
            await collect(ae, PROMPT * 20, SamplingParams(max_tokens=16))
        stream = await ae.submit(PROMPT, SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))
        with pytest.raises(QueueFullError) as e:
            await ae.submit(PROMPT, SamplingParams())
        assert e.value.http_status == 429 and e.value.retry_after >= 1
        await stream.aclose()
        await wait_free(ae)
        assert len(await collect(ae, PROMPT, SamplingParams(max_tokens=3, ignore_eos=True))) == 3

    try:
        asyncio.run(main())
    finally:
        ae.shutdown()


def test_step_failure_fails_running_requests_only(tiny):
    ae = make(tiny, max_num_seqs=1)
    runner = ae.engine.runner
    real = runner.launch
    calls = {"n": 0}

    def flaky(batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return real(batch)

    runner.launch = flaky

    async def main():
        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        first = asyncio.create_task(collect(ae, PROMPT, params))
        await asyncio.sleep(0)
        second = asyncio.create_task(collect(ae, PROMPT[:10], params))
        with pytest.raises(EngineStepError, match="boom"):
            await asyncio.wait_for(first, 30)
        outs = await asyncio.wait_for(second, 30)  # was waiting (max_num_seqs=1): unaffected
        assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 8
        await wait_free(ae)

    try:
        asyncio.run(main())
    finally:
        ae.shutdown()


def test_shutdown_fails_inflight_and_rejects_new(tiny):
    ae = make(tiny)

    async def main():
        stream = await ae.submit(PROMPT, SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
        await stream.__anext__()
        await asyncio.to_thread(ae.shutdown)
        with pytest.raises(EngineDeadError):
            async for _ in stream:
                pass
        with pytest.raises(EngineDeadError):
            await ae.submit(PROMPT, SamplingParams())

    asyncio.run(main())
    assert ae.engine.kv.all_free()


def test_build_makes_the_engine_on_its_own_thread(tiny):
    """AsyncEngine.build: the engine is built on the thread that steps it (one OpenMP team for both), serves, and a
    build failure reaches the caller instead of a dead engine."""
    import threading

    cfg = EngineConfig(model=tiny.path("llama"), dtype="float32", device="cpu", cache=CacheConfig(num_blocks=64),
                       scheduler=SchedulerConfig(max_num_seqs=4, max_model_len=256))
    where = []

    def build() -> LLMEngine:
        where.append(threading.current_thread())
        return LLMEngine(cfg)

    ae = AsyncEngine.build(build, max_queue=4, stats_interval_s=0.5)
    try:
        assert where == [ae._thread] and where[0] is not threading.current_thread()
        outs = asyncio.run(collect(ae, PROMPT, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)))
        assert outs[-1].outputs[0].token_ids == tiny.reference("llama", PROMPT, 4)
    finally:
        ae.shutdown()

    def broken() -> LLMEngine:
        raise InvalidRequestError("no such model")

    with pytest.raises(InvalidRequestError, match="no such model"):
        AsyncEngine.build(broken)
