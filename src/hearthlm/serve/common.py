"""What every dialect shares: parsing bodies, running a request, deltas, usage, metrics and the request log."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from ..engine.async_engine import RequestStream
from ..engine.engine import LLMEngine
from ..engine.sequence import RequestOutput
from ..errors import HearthError, InvalidRequestError
from ..sampling import SamplingParams, renamed
from .errors import as_hearth_error
from .metrics import Metrics
from .models import Loaded, ModelManager, ServeConfig

log = logging.getLogger("hearthlm.serve")
M = TypeVar("M", bound=BaseModel)


@dataclass
class Server:
    cfg: ServeConfig
    manager: ModelManager
    metrics: Metrics
    started_at: float


def server(request: Request) -> Server:
    return request.app.state.hearth


OFF_LOOP_BYTES = 64 * 1024  # bodies larger than this are decoded and validated on a worker thread
R = TypeVar("R")


def _lower_priority() -> None:
    """Worker threads run at a lower CPU priority (nice +10) than the engine thread: a big prompt being
    tokenized takes the cores the steps leave idle, not theirs."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):  # not Linux, or not allowed: same priority then
        pass


_workers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="hearth-prep", initializer=_lower_priority)


async def off_loop(fn: Callable[..., R], *args: Any) -> R:
    """Run fn(*args) on a low-priority worker thread (parsing, templating, tokenizing), never on the event loop."""
    return await asyncio.get_running_loop().run_in_executor(_workers, fn, *args)


_SURROGATE = re.compile("[\ud800-\udfff]")


async def parse(request: Request, model: type[M]) -> M:
    """JSON body -> pydantic model (serve/security.py has already required Content-Type: application/json and
    capped the size). Large bodies are decoded on a worker thread so the event loop keeps serving others."""
    raw = await request.body()
    if len(raw) > OFF_LOOP_BYTES:
        return await off_loop(decode_body, raw, model)
    return decode_body(raw, model)


def decode_body(raw: bytes, model: type[M]) -> M:
    """Bytes -> JSON object (every string valid Unicode) -> pydantic model; InvalidRequestError otherwise."""
    try:
        data = json.loads(raw or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidRequestError(f"request body is not valid JSON: {e}") from None
    except ValueError:  # an integer literal past Python's digit limit
        raise InvalidRequestError("request body holds a number with too many digits (over 4,300)") from None
    except RecursionError:
        raise InvalidRequestError("request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise InvalidRequestError("request body must be a JSON object")
    check_unicode(data)
    try:
        obj = model.model_validate(data)
    except ValidationError as e:
        raise as_hearth_error(e) from None
    refuse_unknown(obj)
    return obj


def refuse_unknown(obj: BaseModel, prefix: str = "") -> None:
    """A body model with extra="allow" keeps the fields it does not declare: any of them that is set (not null,
    which clients send for unset fields) is a 400 naming it, never silently ignored."""
    for name, value in (obj.model_extra or {}).items():
        if value is not None:
            raise InvalidRequestError(f"unknown field {prefix}{name}: this server does not implement it (it is "
                                      "refused rather than ignored); see the README's table of request fields",
                                      param=f"{prefix}{name}")


def check_unicode(data: Any) -> None:
    """Reject lone surrogates (JSON escapes like \\ud800 that are no Unicode character) in any string or key of
    decoded JSON, naming the path of the first one; tokenizers and encoders cannot handle them."""
    stack: list[tuple[Any, str]] = [(data, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                raise InvalidRequestError(f"{path or 'body'}: the string holds a lone surrogate (an escape "
                                          "\\ud800-\\udfff that is not half of a pair), which is not valid Unicode: "
                                          "send valid UTF-8 text", param=path or None)
        elif isinstance(value, dict):
            for k, v in value.items():
                where = f"{path}.{k}" if path else str(k)
                if _SURROGATE.search(k):
                    raise InvalidRequestError(f"{path or 'body'}: a key holds a lone surrogate, which is not valid "
                                              "Unicode: send valid UTF-8 text", param=path or None)
                stack.append((v, where))
        elif isinstance(value, list):
            stack.extend((v, f"{path}[{i}]") for i, v in enumerate(value) if isinstance(v, (str, dict, list)))


@dataclass
class Delta:
    """What one step added to one of a request's n outputs."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None


def usage(out: RequestOutput) -> dict[str, Any]:
    prompt, completion = len(out.prompt_token_ids), sum(len(c.token_ids) for c in out.outputs)
    u: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                         "prompt_tokens_details": {"cached_tokens": out.num_cached_tokens}}
    if out.truncated_tokens:
        u["truncated_tokens"] = out.truncated_tokens
    return u


class ClientGone(HearthError):
    http_status = 499
    code = "client_closed_request"


class Generation:
    """One request running in the engine. Iterate deltas() or await result(); always aclose() (idempotent)."""

    def __init__(self, srv: Server, model: Loaded, stream: RequestStream, dialect: str, endpoint: str,
                 arrival: float, load_s: float, request: Request | None):
        self.srv, self.model, self.stream, self.dialect, self.endpoint = srv, model, stream, dialect, endpoint
        self.arrival, self.load_s, self.request = arrival, load_s, request
        self.last: RequestOutput | None = None
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.error: HearthError | None = None
        self._sent_text: dict[int, str] = {}
        self._sent_tokens: dict[int, int] = {}
        self._finished: set[int] = set()
        self._closed = False

    @property
    def request_id(self) -> str:
        return self.stream.request_id

    async def deltas(self, watch_disconnect: bool = False) -> AsyncIterator[list[Delta]]:
        try:
            async for out in self.stream:
                self.last = out
                now = time.monotonic()
                batch = []
                for c in out.outputs:
                    sent_text, sent_n = self._sent_text.get(c.index, ""), self._sent_tokens.get(c.index, 0)
                    new_ids = c.token_ids[sent_n:]
                    text = c.text[len(sent_text):] if c.text.startswith(sent_text) else ""
                    finish = c.finish_reason if c.finished and c.index not in self._finished else None
                    if not new_ids and not text and finish is None:
                        continue
                    if new_ids and self.first_token_at is None:
                        self.first_token_at = now
                    self._sent_text[c.index], self._sent_tokens[c.index] = sent_text + text, len(c.token_ids)
                    if finish is not None:
                        self._finished.add(c.index)
                    lps = c.logprobs[sent_n:] if c.logprobs is not None else None
                    batch.append(Delta(c.index, text, new_ids, lps, finish))
                if out.finished:
                    self.finished_at = now
                if batch:
                    yield batch
                if watch_disconnect and self.request is not None and not out.finished \
                        and await self.request.is_disconnected():
                    break
        except HearthError as e:
            self.error = e
            raise
        except Exception as e:
            self.error = as_hearth_error(e)
            raise self.error from e

    async def result(self) -> RequestOutput:
        """Run to completion (non-streaming); the request is aborted if the client goes away."""
        try:
            async for _ in self.deltas(watch_disconnect=True):
                pass
        except HearthError as e:
            e.counted = True  # type: ignore[attr-defined]  # metrics recorded by aclose()
            raise
        finally:
            await self.aclose()
        if self.last is None or not self.last.finished:
            err = ClientGone("the client disconnected before the request finished")
            err.counted = True  # type: ignore[attr-defined]
            raise err
        return self.last

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self.stream.aclose()
        self.srv.manager.release(self.model)
        self._record()

    def _record(self) -> None:
        out, m = self.last, self.srv.metrics
        status = "500" if self.error else ("200" if out is not None and out.finished else "499")
        if self.error:
            status = str(self.error.http_status)
        m.requests.labels(self.dialect, status).inc()
        end = self.finished_at or time.monotonic()
        prompt = len(out.prompt_token_ids) if out else 0
        completion = sum(len(c.token_ids) for c in out.outputs) if out else 0
        m.prompt_tokens.inc(prompt)
        m.generation_tokens.inc(completion)
        ttft = (self.first_token_at - self.arrival) if self.first_token_at else None
        if ttft is not None:
            m.ttft.observe(ttft)
            m.e2e.observe(end - self.arrival)
            per_seq = completion / max(1, len(out.outputs)) if out else 0
            if per_seq > 1:
                m.tpot.observe((end - self.first_token_at) / (per_seq - 1))
        gen_s = end - self.first_token_at if self.first_token_at else 0.0
        log.info("request id=%s dialect=%s endpoint=%s model=%s status=%s prompt_tokens=%d completion_tokens=%d "
                 "cached_tokens=%d truncated_tokens=%d ttft_ms=%s e2e_ms=%.1f tok_s=%.1f finish=%s",
                 self.request_id, self.dialect, self.endpoint, self.model.name, status, prompt, completion,
                 out.num_cached_tokens if out else 0, out.truncated_tokens if out else 0,
                 f"{ttft * 1000:.1f}" if ttft is not None else "-", (end - self.arrival) * 1000,
                 completion / gen_s if gen_s > 0 else 0.0,
                 ",".join(c.finish_reason or "abort" for c in out.outputs) if out else "abort")


Builder = Callable[[LLMEngine, SamplingParams], tuple["str | list[int]", int, int]]


async def start(request: Request, dialect: str, model: str | None, params: SamplingParams, *,
                prompt: str | list[int] | None = None, messages: list[dict] | None = None,
                build: Builder | None = None, keep_alive: float | None | str = "default",
                names: dict[str, str] | None = None) -> Generation:
    """Acquire the model, build the prompt and submit; typed errors (400/404/429...) are raised here.

    Give prompt (text or ids), messages (chat template), or build(engine, params) -> (prompt, keep, dropped).
    Templating, tokenization and build run on a worker thread (never on the event loop), and the engine thread
    gets token ids that already fit. names: SamplingParams field -> the dialect's name, for error messages."""
    srv = server(request)
    arrival = time.monotonic()
    loaded, load_s = await srv.manager.acquire(model, keep_alive)
    try:
        eng = loaded.engine

        def prepare() -> tuple[list[int], int, int]:
            try:
                params.validate(vocab_size=eng.model_config.vocab_size)
                if params.structured is not None:  # compiled here (cached), so a bad grammar is a 400 naming it
                    eng.grammars.compile(params.structured)
            except InvalidRequestError as e:
                raise wire_error(e, names or {}) from None
            if isinstance(prompt, str):
                eng.refuse_unfittable(len(prompt), params)
            p, keep, dropped = prompt, 0, 0
            if build is not None:
                p, keep, dropped = build(eng, params)
            elif messages is not None:
                p, keep, dropped = eng.chat_prompt(messages, params)
            assert p is not None
            ids = eng.tokenize_prompt(p)
            ids, cut = eng.fit_context(ids, params, keep)
            return ids, keep, dropped + cut

        ids, keep, dropped = await off_loop(prepare)
        try:
            stream = await loaded.aengine.submit(ids, params, keep_prefix=keep, truncated=dropped)
        except InvalidRequestError as e:  # e.g. a grammar that does not compile: param structured -> format
            raise wire_error(e, names or {}) from None
    except BaseException:
        srv.manager.release(loaded)
        raise
    return Generation(srv, loaded, stream, dialect, request.url.path, arrival, load_s, request)


def wire_error(err: InvalidRequestError, names: dict[str, str]) -> InvalidRequestError:
    """`renamed`, and a structured-output error ("structured.json could not be compiled: ...") named by the
    dialect's field as a whole (response_format, format, tools)."""
    wire = names.get("structured")
    if err.param == "structured" and wire is not None:
        return InvalidRequestError(re.sub(r"^structured(\.\w+)?", wire, str(err)), param=wire)
    return renamed(err, names)


def token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def token_bytes(tokenizer, token_id: int) -> list[int]:
    """A token's own bytes (OpenAI logprobs' `bytes`): a token holding part of a UTF-8 character decodes alone to
    U+FFFD, but its bytes are the real ones. Tokenizers without token_bytes fall back to the decoded text."""
    own = getattr(tokenizer, "token_bytes", None)
    return list(own(token_id) if own is not None else token_text(tokenizer, token_id).encode("utf-8"))
