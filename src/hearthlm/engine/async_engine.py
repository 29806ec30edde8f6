"""asyncio front of the synchronous engine: one background thread owns the LLMEngine.

Every engine call (add, abort, step) runs on that thread; asyncio callers enqueue commands and read cumulative
RequestOutputs from per-request asyncio queues. Cancelling a consumer aborts its request within one step.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from ..errors import EngineDeadError, HearthError, QueueFullError
from ..sampling import SamplingParams
from .engine import LLMEngine
from .sequence import RequestOutput

log = logging.getLogger("hearthlm")


class EngineStepError(HearthError):
    """The step loop raised while running this request; the request was aborted (HTTP 500)."""

    code = "engine_error"


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue  # RequestOutput | BaseException

    def put(self, item: RequestOutput | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the consumer's loop is closed
            pass


def _resolve(fut: asyncio.Future, exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is None:
        fut.set_result(None)
    else:
        fut.set_exception(exc)


class RequestStream:
    """Async iterator over one request's cumulative outputs; aclose() aborts it if unfinished."""

    def __init__(self, owner: AsyncEngine, request_id: str, stream: _Stream):
        self.owner, self.request_id, self._stream = owner, request_id, stream
        self.done = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.done:
            raise StopAsyncIteration
        try:
            item = await self._stream.queue.get()
        except BaseException:  # CancelledError: the client went away
            await self.aclose()
            raise
        if isinstance(item, BaseException):
            self.done = True
            raise item
        if item.finished:
            self.done = True
        return item

    async def aclose(self) -> None:
        if not self.done:
            self.done = True
            self.owner.abort(self.request_id)


class AsyncEngine:
    def __init__(self, engine: LLMEngine | Callable[[], LLMEngine], max_queue: int = 256,
                 stats_interval_s: float | None = None):
        """engine: the engine, or a function that builds it; AsyncEngine.build calls one on the engine thread."""
        self.engine: LLMEngine = engine if isinstance(engine, LLMEngine) else None
        self.max_queue = max_queue
        self._stats_interval_s = stats_interval_s
        self._make = None if isinstance(engine, LLMEngine) else engine
        self._built = threading.Event()
        self._build_error: BaseException | None = None
        if self.engine is not None:
            self._configure()
        self._cmds: deque[Callable[[], None]] = deque()
        self._cv = threading.Condition()
        self._streams: dict[str, _Stream] = {}  # owned by the engine thread
        self._pending = 0  # submitted, not yet added (guarded by _cv)
        self._stopping = False
        self._exited = False
        self.dead: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="hearth-engine", daemon=True)
        self._thread.start()

    @classmethod
    def build(cls, make: Callable[[], LLMEngine], max_queue: int = 256,
              stats_interval_s: float | None = None) -> AsyncEngine:
        """Build the engine on the thread that will step it (blocking; raises what building raised). Then one
        thread runs all of the engine's CPU parallel regions: OpenMP keeps a thread team per calling thread, and
        a loader's team next to the stepping thread's throttles both teams' spin-waits on a small machine."""
        self = cls(make, max_queue, stats_interval_s)
        self._built.wait()
        if self._build_error is not None:
            self._thread.join()
            raise self._build_error
        return self

    def _configure(self) -> None:
        if self._stats_interval_s is not None:
            self.engine.stats.interval_s = self._stats_interval_s
        self._built.set()

    def _run(self) -> None:
        if self._make is not None:
            try:
                self.engine = self._make()
            except BaseException as e:  # noqa: BLE001 -- handed to build()'s caller
                self._build_error = e
                self._exited = self._stopping = True
                self._built.set()
                return
            self._configure()
        self._loop()

    # ---- asyncio side ----
    @property
    def num_requests(self) -> int:
        return len(self._streams) + self._pending

    @property
    def num_running(self) -> int:
        return len(self.engine.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.engine.scheduler.waiting) + self._pending

    def _check_capacity(self) -> None:
        if self.dead is not None or self._stopping:
            raise EngineDeadError(f"the engine is not running ({self.dead or 'shut down'}): restart `hearth serve`")
        limit = self.engine.config.scheduler.max_num_seqs + self.max_queue
        if self.num_requests >= limit:
            err = QueueFullError(f"server busy: {self.num_requests} requests in flight and the waiting queue "
                                 f"holds {self.max_queue} (--max-queue): retry shortly")
            err.retry_after = 1  # type: ignore[attr-defined]
            raise err

    async def submit(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
                     keep_prefix: int = 0, truncated: int = 0) -> RequestStream:
        """Add a request on the engine thread; typed errors from add_request are raised here."""
        self._check_capacity()
        if params.structured is not None and self.engine is not None:  # compiling may take a while: off the engine
            await asyncio.to_thread(self.engine.grammars.compile, params.structured)  # thread (cached after)
        loop = asyncio.get_running_loop()
        rid = request_id or f"req-{uuid.uuid4().hex[:16]}"
        stream = _Stream(loop, asyncio.Queue())
        accepted: asyncio.Future = loop.create_future()

        def add() -> None:
            with self._cv:
                self._pending -= 1
            try:
                self.engine.add_request(prompt, params, rid, keep_prefix=keep_prefix, truncated=truncated)
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                loop.call_soon_threadsafe(_resolve, accepted, e)
                return
            self._streams[rid] = stream
            loop.call_soon_threadsafe(_resolve, accepted, None)

        self._call(add, pending=True)
        try:
            await accepted
        except asyncio.CancelledError:
            self.abort(rid)
            raise
        return RequestStream(self, rid, stream)

    async def pool(self, rows: list[list[int]], all_rows: bool) -> list:
        """Final hidden states of each row's prompt (LLMEngine.add_pooling_request: every token's, or the last
        one's), computed by the scheduler beside whatever else runs. The rows are queued at once; the call counts
        once against the queue limit. Cancelling it aborts the rows not yet done."""
        self._check_capacity()
        loop = asyncio.get_running_loop()
        ids = [f"embd-{uuid.uuid4().hex[:16]}" for _ in rows]
        streams = [_Stream(loop, asyncio.Queue()) for _ in rows]
        accepted: asyncio.Future = loop.create_future()

        def add() -> None:
            with self._cv:
                self._pending -= 1
            try:
                for rid, row, stream in zip(ids, rows, streams):
                    self.engine.add_pooling_request(row, all_rows, rid)
                    self._streams[rid] = stream
            except BaseException as e:  # noqa: BLE001 - handed to the caller, with the rows already queued undone
                for rid in ids:
                    if rid in self._streams:
                        self._abort(rid)
                loop.call_soon_threadsafe(_resolve, accepted, e)
                return
            loop.call_soon_threadsafe(_resolve, accepted, None)

        self._call(add, pending=True)
        try:
            await accepted
        except asyncio.CancelledError:
            for rid in ids:
                self.abort(rid)
            raise
        handles = [RequestStream(self, rid, stream) for rid, stream in zip(ids, streams)]
        try:
            out = []
            for h in handles:
                async for item in h:
                    if item.finished:
                        out.append(item.hidden_states)
            return out
        finally:
            for h in handles:
                await h.aclose()

    async def generate(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
                       keep_prefix: int = 0, truncated: int = 0) -> AsyncIterator[RequestOutput]:
        stream = await self.submit(prompt, params, request_id, keep_prefix, truncated)
        try:
            async for out in stream:
                yield out
        finally:
            await stream.aclose()

    def abort(self, request_id: str) -> None:
        try:
            self._call(lambda: self._abort(request_id))
        except EngineDeadError:
            pass  # everything was aborted on exit

    def fail_all(self, exc: HearthError) -> None:
        """Abort every request and hand each stream exc (a server drain past its timeout)."""
        def fail() -> None:
            for rid, stream in list(self._streams.items()):
                self._abort(rid)
                stream.put(exc)

        try:
            self._call(fail)
        except EngineDeadError:
            pass  # everything was aborted on exit

    async def run(self, fn: Callable[[LLMEngine], object]) -> object:
        """Run fn(engine) on the engine thread and return its result."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()

        def call() -> None:
            try:
                result = fn(self.engine)
            except BaseException as e:  # noqa: BLE001
                loop.call_soon_threadsafe(_resolve, fut, e)
                return
            loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(result))

        self._call(call)
        return await fut

    def shutdown(self, timeout: float = 30.0) -> None:
        """Abort everything, stop the thread. Safe to call from any thread, more than once."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # ---- engine thread ----
    def _call(self, fn: Callable[[], None], pending: bool = False) -> None:
        with self._cv:
            if self._exited:
                raise EngineDeadError(f"the engine is not running ({self.dead or 'shut down'})")
            self._pending += pending
            self._cmds.append(fn)
            self._cv.notify()

    def _abort(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        self.engine.abort_request(request_id)

    def _loop(self) -> None:
        eng = self.engine
        try:
            while True:
                with self._cv:
                    while not self._cmds and not self._stopping and not eng.has_unfinished():
                        self._idle_wait()
                    if self._stopping:
                        break
                    cmds = list(self._cmds)
                    self._cmds.clear()
                for fn in cmds:
                    try:
                        fn()
                    except Exception:
                        log.exception("engine command failed")
                if not eng.has_unfinished():
                    continue
                steps = eng.stats.steps
                try:
                    outputs = eng.step()
                except Exception as e:  # noqa: BLE001
                    self._fail_running(e)
                    continue
                if eng.stats.steps == steps and not outputs:  # nothing schedulable right now: don't spin
                    with self._cv:
                        if not self._cmds and not self._stopping:
                            self._cv.wait(0.005)
                for out in outputs:
                    stream = self._streams.pop(out.request_id) if out.finished else self._streams.get(out.request_id)
                    if stream is not None:
                        stream.put(out if out.error is None else out.error)
        except BaseException as e:
            log.exception("engine loop died")
            self.dead = e
        finally:
            self._stopping = True
            self._drain_on_exit()

    def _idle_wait(self) -> None:
        """Sleep until a command arrives; wake once more only to log stats of activity not yet logged."""
        st = self.engine.stats
        if (st.prompt_tokens, st.generation_tokens) == (st._last_prompt, st._last_gen):
            self._cv.wait()
            return
        remaining = st.interval_s - (time.monotonic() - st._last_log)
        if remaining > 0:
            self._cv.wait(remaining)
        else:
            st.maybe_log(self.engine)

    def _fail_running(self, exc: Exception) -> None:
        """A step raised: abort the requests that were scheduled (running), keep the waiting ones."""
        ids = {s.request_id for s in self.engine.scheduler.running}
        log.exception("engine step failed; aborting %d running request(s): %s", len(ids), exc)
        for rid in ids:
            stream = self._streams.pop(rid, None)
            self.engine.abort_request(rid)
            if stream is not None:
                stream.put(EngineStepError(f"the engine failed while generating ({type(exc).__name__}: {exc}); "
                                           "the request was aborted"))

    def _drain_on_exit(self) -> None:
        with self._cv:
            self._exited = True
            cmds = list(self._cmds)
            self._cmds.clear()
        for fn in cmds:  # pending adds must resolve (they fail on the dead engine or get aborted below)
            with contextlib.suppress(Exception):
                fn()
        for rid, stream in list(self._streams.items()):
            with contextlib.suppress(Exception):
                self.engine.abort_request(rid)
            stream.put(EngineDeadError("the model was unloaded or the engine stopped while this request ran"))
        self._streams.clear()
