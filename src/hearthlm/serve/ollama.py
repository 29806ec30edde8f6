"""Ollama dialect: /api/generate, /api/chat (NDJSON), /api/tags, /api/show, /api/ps, /api/pull, /api/delete,
/api/version, keep_alive."""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from .. import __version__
from ..engine.engine import LLMEngine
from ..errors import ContextLengthError, HearthError, InvalidRequestError
from ..sampling import SamplingParams, renamed
from . import store_api
from .common import Generation, parse, server, start
from .errors import as_hearth_error, error_body
from .models import parse_keep_alive
from .security import require_admin
from .sse import ndjson, stream_response
from .tools import ToolChoice, ToolSetup, ollama_format, parse_tools

router = APIRouter(prefix="/api")
NS = 1_000_000_000
OLLAMA_DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.9}
# SamplingParams field -> how an Ollama request names it (errors say options.top_k, not top_k)
OLLAMA_NAMES = {f: f"options.{f}" for f in ("temperature", "top_k", "top_p", "min_p", "seed", "stop",
                                            "presence_penalty", "frequency_penalty", "truncate")}
OLLAMA_NAMES.update(repetition_penalty="options.repeat_penalty", max_tokens="options.num_predict",
                    structured="format")


class _Base(BaseModel):
    model_config = ConfigDict(extra="allow")  # an unknown field is a 400 (common.refuse_unknown)
    model: str | None = None
    stream: bool = True
    options: dict[str, Any] | None = None
    keep_alive: float | str | None = None
    format: Any = None
    think: Any = None  # refused when asked for: no thinking mode here (Ollama's 400 for models without one)

    def keep(self) -> float | None | str:
        return "default" if self.keep_alive is None else parse_keep_alive(self.keep_alive)

    def params(self) -> tuple[SamplingParams, int | None]:
        """options -> SamplingParams (format -> its structured output) and num_ctx."""
        if self.think not in (None, False):
            raise InvalidRequestError("think: this server has no thinking mode for its models: drop think (or "
                                      "set it to false)", param="think")
        if getattr(self, "template", None):
            raise InvalidRequestError("template: per-request prompt templates are not supported: send raw=true "
                                      "with the prompt already formatted, or use /api/chat", param="template")
        structured = ollama_format(self.format)
        params, num_ctx = sampling(self.options)
        params.structured = structured
        return params, num_ctx


class GenerateBody(_Base):
    prompt: str | None = None
    suffix: str | None = None
    system: str | None = None
    context: list[int] | None = None
    raw: bool = False
    images: list[Any] | None = None
    template: str | None = None  # refused when set (params)


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str = ""
    images: list[Any] | None = None
    tool_calls: list[Any] | None = None  # assistant: earlier calls [{"function": {"name", "arguments": {...}}}]
    tool_name: str | None = None  # tool: which function produced this result

    def as_dict(self, i: int) -> dict[str, Any]:
        """The message as chat templates read it (tool_calls as OpenAI-shaped objects, the tool's name)."""
        m: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_name is not None:
            m["name"] = self.tool_name
        if self.tool_calls:
            calls = []
            for j, c in enumerate(self.tool_calls):
                fn = c.get("function") if isinstance(c, dict) else None
                args = fn.get("arguments", {}) if isinstance(fn, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(args, dict):
                    raise InvalidRequestError(f"messages[{i}].tool_calls[{j}] must be {{\"function\": {{\"name\", "
                                              "\"arguments\": {...}}}", param="messages")
                calls.append({"type": "function", "function": {"name": fn["name"], "arguments": args}})
            m["tool_calls"] = calls
        return m


class ChatBody(_Base):
    messages: list[Message] = Field(default_factory=list)
    tools: list[Any] | None = None


class NameBody(BaseModel):
    model_config = ConfigDict(extra="allow")  # an unknown field is a 400 (common.refuse_unknown)
    model: str | None = None
    name: str | None = None
    stream: bool = True
    insecure: bool | None = None  # /api/pull: accepted without effect (pulls are HTTPS from the Hugging Face Hub)
    verbose: bool | None = None  # /api/show: accepted; the answer has no per-tensor listing either way

    @property
    def target(self) -> str:
        if not (self.model or self.name):
            raise InvalidRequestError("model is required", param="model")
        return (self.model or self.name or "").strip()


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


# options honoured (sampling below); options that only tune how Ollama runs a model (threads, GPU layers, batch,
# memory mapping), accepted without effect on the output; options that change the output and are not implemented,
# accepted only at the value that means "off"
HONOURED = frozenset({"temperature", "top_k", "top_p", "min_p", "seed", "stop", "repeat_penalty", "presence_penalty",
                      "frequency_penalty", "num_predict", "num_ctx", "truncate"})
RUNTIME_ONLY = frozenset({"num_thread", "num_gpu", "main_gpu", "num_batch", "use_mmap", "use_mlock", "low_vram",
                          "numa", "f16_kv", "vocab_only", "logits_all", "embedding_only", "num_keep"})
OFF_ONLY = {"mirostat": (0,), "typical_p": (1, 1.0), "tfs_z": (1, 1.0), "penalize_newline": (False,)}


def check_options(o: dict[str, Any]) -> None:
    """A 400 naming options.<name> for an option this server would otherwise ignore while it changes the output:
    unknown names (typos included), mirostat / typical_p / tfs_z away from "off", and repeat_last_n other than -1
    (the whole context) while repeat_penalty is on."""
    for name, value in o.items():
        if name in HONOURED or name in RUNTIME_ONLY or value is None:
            continue
        if name in OFF_ONLY:
            if value not in OFF_ONLY[name] or isinstance(value, bool) != isinstance(OFF_ONLY[name][0], bool):
                raise InvalidRequestError(f"options.{name} is not supported: leave it out (or at "
                                          f"{OFF_ONLY[name][0]!r}, off)", param=f"options.{name}")
            continue
        if name == "repeat_last_n":
            if value != -1 and o.get("repeat_penalty") not in (None, 0, 1, 1.0):
                raise InvalidRequestError("options.repeat_last_n: the repetition penalty covers the whole context "
                                          "here; set repeat_last_n to -1 or leave it out", param="options.repeat_last_n")
            continue
        raise InvalidRequestError(f"unknown option options.{name}: supported are {', '.join(sorted(HONOURED))}",
                                  param=f"options.{name}")


def sampling(options: dict[str, Any] | None) -> tuple[SamplingParams, int | None]:
    """Ollama options -> SamplingParams (and num_ctx, a per-request context cap)."""
    if options is not None and not isinstance(options, dict):
        raise InvalidRequestError("options must be an object", param="options")
    check_options(options or {})
    o = {**OLLAMA_DEFAULTS, **(options or {})}
    num_predict = o.get("num_predict")
    if num_predict is not None and (not isinstance(num_predict, int) or isinstance(num_predict, bool)
                                    or num_predict == 0 or not -2 <= num_predict < 2**31):
        raise InvalidRequestError(f"options.num_predict must be -1 (no limit) or a positive integer below 2**31, "
                                  f"got {_show(num_predict)}", param="options.num_predict")
    num_ctx = o.get("num_ctx")
    if num_ctx is not None and (not isinstance(num_ctx, int) or isinstance(num_ctx, bool) or num_ctx < 1):
        raise InvalidRequestError(f"options.num_ctx must be a positive integer, got {_show(num_ctx)}",
                                  param="options.num_ctx")
    truncate = o.get("truncate")
    if truncate not in (None, True, False, "left"):
        raise InvalidRequestError(f"options.truncate must be true, false or 'left', got {_show(truncate)}",
                                  param="options.truncate")

    def number(name: str, off: float) -> object:
        v = o.get(name)
        return off if v is None or (v == 0 and not isinstance(v, bool) and isinstance(v, (int, float))) else v

    try:
        params = SamplingParams(
            temperature=o["temperature"], top_k=number("top_k", -1), top_p=o["top_p"], min_p=number("min_p", 0.0),
            seed=o.get("seed"), stop=o.get("stop"), repetition_penalty=number("repeat_penalty", 1.0),
            presence_penalty=number("presence_penalty", 0.0), frequency_penalty=number("frequency_penalty", 0.0),
            max_tokens=num_predict if num_predict and num_predict > 0 else None,
            truncate="left" if truncate in (True, "left") else None)
    except InvalidRequestError as e:
        raise renamed(e, OLLAMA_NAMES) from None
    return params, num_ctx


def _show(v: object) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:60] + "..."


def cap_context(engine: LLMEngine, params: SamplingParams, ids: list[int], num_ctx: int | None) -> None:
    """num_ctx below the server's max_model_len caps prompt + generation for this request."""
    if num_ctx is None or num_ctx >= engine.max_model_len:
        return
    if len(ids) >= num_ctx:
        raise ContextLengthError(len(ids), params.max_tokens or 1, num_ctx)
    room = num_ctx - len(ids)
    params.max_tokens = min(params.max_tokens or room, room)


def _stats(gen: Generation) -> dict[str, Any]:
    out = gen.last
    end = gen.finished_at or time.monotonic()
    first = gen.first_token_at or end
    reason = next((c.finish_reason for c in out.outputs), "stop") if out else "stop"
    return {"done": True, "done_reason": "stop" if reason == "stop" else reason,
            "total_duration": int((end - gen.arrival) * NS), "load_duration": int(gen.load_s * NS),
            "prompt_eval_count": len(out.prompt_token_ids) if out else 0,
            "prompt_eval_duration": int(max(0.0, first - gen.arrival - gen.load_s) * NS),
            "eval_count": sum(len(c.token_ids) for c in out.outputs) if out else 0,
            "eval_duration": int((end - first) * NS)}


def _headers(gen: Generation) -> dict[str, str]:
    t = gen.last.truncated_tokens if gen.last else 0
    return {"X-Request-Id": gen.request_id, **({"X-Truncated-Tokens": str(t)} if t else {})}


async def _respond(gen: Generation, stream: bool, chunk, final) -> Response:
    """chunk(text) -> dict for a streamed delta; final(text) -> the done object (text = all, non-streaming)."""
    if not stream:
        out = await gen.result()
        return JSONResponse(final(out.outputs[0].text), headers=_headers(gen))

    async def body() -> AsyncIterator[bytes]:
        try:
            async for deltas in gen.deltas():
                text = "".join(d.text for d in deltas)
                if text:
                    yield ndjson(chunk(text))
            yield ndjson(final(""))
        except HearthError as e:
            yield ndjson(error_body("ollama", e))
        finally:
            await gen.aclose()

    return stream_response(body(), kind="ndjson", headers={"X-Request-Id": gen.request_id})


async def _load_or_unload(request: Request, name: str | None, keep: float | None | str, key: str) -> Response:
    srv = server(request)
    if keep == 0:
        require_admin(request)  # unloading is an admin action, as /api/delete
        await srv.manager.unload(name)
        reason, shown = "unload", srv.manager.resolve(name)[0]
    else:
        m, _ = await srv.manager.acquire(name, keep)
        srv.manager.release(m)
        reason, shown = "load", m.name
    body: dict[str, Any] = {"model": shown, "created_at": now_iso(), "done": True, "done_reason": reason}
    body.update({"response": ""} if key == "response" else {"message": {"role": "assistant", "content": ""}})
    return JSONResponse(body)


@router.post("/generate")
async def generate(request: Request) -> Response:
    body = await parse(request, GenerateBody)
    if body.images:
        raise InvalidRequestError("images are not supported: this server runs text-only models", param="images")
    if body.suffix:
        raise InvalidRequestError("suffix (fill-in-the-middle) is not supported", param="suffix")
    keep = body.keep()
    if not body.prompt and not body.context:
        return await _load_or_unload(request, body.model, keep, "response")
    params, num_ctx = body.params()

    def build(engine: LLMEngine, p: SamplingParams) -> tuple[list[int], int, int]:
        tok = engine.tokenizer
        text = body.prompt or ""
        if body.raw or not tok.chat_template:
            engine.refuse_unfittable(len(text), p)
            ids = engine.encode(text, add_special_tokens=not body.context)
            keep_n = dropped = 0
        else:
            msgs = ([{"role": "system", "content": body.system}] if body.system else []) + \
                [{"role": "user", "content": text}]
            ids, keep_n, dropped = engine.chat_prompt(msgs, p) if text else ([], 0, 0)
        if body.context:
            vocab = engine.model_config.vocab_size
            if any(not 0 <= t < vocab for t in body.context):
                raise InvalidRequestError(f"context must hold token ids in [0, {vocab}) from an earlier response",
                                          param="context")
            ids, keep_n = list(body.context) + ids, 0
        cap_context(engine, p, ids, num_ctx)
        return ids, keep_n, dropped

    gen = await start(request, "ollama", body.model, params, build=build, keep_alive=keep, names=OLLAMA_NAMES)
    name = gen.model.name

    def final(text: str) -> dict[str, Any]:
        ctx = (gen.last.prompt_token_ids + gen.last.outputs[0].token_ids) if gen.last else []
        return {"model": name, "created_at": now_iso(), "response": text, **_stats(gen), "context": ctx}

    return await _respond(gen, body.stream, lambda t: {"model": name, "created_at": now_iso(), "response": t,
                                                       "done": False}, final)


@router.post("/chat")
async def chat(request: Request) -> Response:
    body = await parse(request, ChatBody)
    keep = body.keep()
    if not body.messages:
        if body.keep_alive is not None:  # Ollama's load/unload idiom: empty messages with keep_alive
            return await _load_or_unload(request, body.model, keep, "message")
        raise InvalidRequestError("messages must be a non-empty list of {role, content} objects (to only load or "
                                  "unload a model, send keep_alive with no messages)", param="messages")
    if any(m.images for m in body.messages):
        raise InvalidRequestError("images are not supported: this server runs text-only models", param="messages")
    tools = parse_tools(body.tools)
    params, num_ctx = body.params()
    messages = [m.as_dict(i) for i, m in enumerate(body.messages)]
    # Ollama has no tool_choice: with tools the model may call them (auto)
    setup = ToolSetup(tools, ToolChoice("auto" if tools else "none")) \
        if tools or any(m.tool_calls or m.role == "tool" for m in body.messages) else None

    def build(engine: LLMEngine, p: SamplingParams) -> tuple[list[int], int, int]:
        ids, keep_n, dropped = setup.prepare(engine, messages, p) if setup is not None \
            else engine.chat_prompt(messages, p)
        cap_context(engine, p, ids, num_ctx)
        return ids, keep_n, dropped

    gen = await start(request, "ollama", body.model, params, build=build, keep_alive=keep, names=OLLAMA_NAMES)
    name = gen.model.name

    def msg(text: str, calls: list | None = None) -> dict[str, Any]:
        m: dict[str, Any] = {"role": "assistant", "content": text}
        if calls:
            m["tool_calls"] = [c.ollama() for c in calls]
        return m

    if setup is None or not setup.parsing:
        return await _respond(gen, body.stream, lambda t: {"model": name, "created_at": now_iso(),
                                                           "message": msg(t), "done": False},
                              lambda t: {"model": name, "created_at": now_iso(), "message": msg(t), **_stats(gen)})
    if not body.stream:
        out = await gen.result()
        content, calls = setup.parse(out.outputs[0].text)
        return JSONResponse({"model": name, "created_at": now_iso(), "message": msg(content or "", calls),
                             **_stats(gen)}, headers=_headers(gen))

    async def events() -> AsyncIterator[bytes]:
        ts = setup.stream()  # as Ollama: content streams, a parsed call comes in a chunk of its own
        try:
            async for deltas in gen.deltas():
                for d in deltas:
                    text = ts.feed(d.text)
                    if text:
                        yield ndjson({"model": name, "created_at": now_iso(), "message": msg(text), "done": False})
            rest, calls = ts.finish()
            if rest or calls:
                yield ndjson({"model": name, "created_at": now_iso(), "message": msg(rest, calls), "done": False})
            yield ndjson({"model": name, "created_at": now_iso(), "message": msg(""), **_stats(gen)})
        except HearthError as e:
            yield ndjson(error_body("ollama", e))
        finally:
            await gen.aclose()

    return stream_response(events(), kind="ndjson", headers={"X-Request-Id": gen.request_id})


@router.get("/tags")
async def tags(request: Request) -> dict[str, Any]:
    return await asyncio.to_thread(store_api.tags, server(request))


@router.post("/show")
async def show(request: Request) -> dict[str, Any]:
    body = await parse(request, NameBody)
    return await asyncio.to_thread(store_api.show, server(request), body.target)


@router.get("/ps")
async def ps(request: Request) -> dict[str, Any]:
    m = server(request).manager.current
    if m is None:
        return {"models": []}
    exp = m.expires_wall()
    cfg = m.engine.model_config
    info = {"architecture": cfg.architecture, "format": "gguf" if m.path.is_file() else "safetensors",
            "quantization": m.engine.loaded.quantization, "parameter_size": f"{cfg.num_params / 1e6:.0f}M"
            if cfg.num_params < 1e9 else f"{cfg.num_params / 1e9:.1f}B"}
    size = m.size_bytes
    return {"models": [{"name": m.name, "model": m.name, "size": size, "digest": "",
                        "details": store_api.details(info),
                        "expires_at": store_api.iso(exp if exp is not None else time.time() + 100 * 365 * 86400),
                        "size_vram": size if m.engine.device.type == "cuda" else 0,
                        "context_length": m.engine.max_model_len}]}


@router.get("/version")
async def version() -> dict[str, str]:
    return {"version": __version__}


@router.delete("/delete")
async def delete(request: Request) -> Response:
    body = await parse(request, NameBody)
    srv = server(request)
    name = body.target
    cur = srv.manager.current
    if cur is not None and name.removesuffix(":latest") in (cur.name, str(cur.path)):
        await srv.manager.unload(name)
        if srv.manager.current is cur:
            raise InvalidRequestError(f"model {name!r} is running requests: retry when they finish")
    await asyncio.to_thread(store_api.remove, name.removesuffix(":latest"))
    return Response(status_code=200)


@router.post("/pull")
async def pull(request: Request) -> Response:
    body = await parse(request, NameBody)
    name = body.target
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def progress(fname: str, done: int, total: int | None) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, {"status": f"pulling {fname}", "digest": fname,
                                                     "total": total or 0, "completed": done})

    async def run() -> None:
        try:
            await asyncio.to_thread(store_api.pull, name, progress, server(request))
            await queue.put({"status": "success"})
        except Exception as e:  # noqa: BLE001 - reported in the stream / as the response
            await queue.put(as_hearth_error(e))

    task = loop.create_task(run())
    if not body.stream:
        while True:
            item = await queue.get()
            if isinstance(item, HearthError):
                raise item
            if item.get("status") == "success":
                return JSONResponse(item)

    async def events() -> AsyncIterator[bytes]:
        yield ndjson({"status": "pulling manifest"})
        while True:
            item = await queue.get()
            if isinstance(item, HearthError):
                yield ndjson(error_body("ollama", item))
                return
            yield ndjson(item)
            if item.get("status") == "success":
                await task
                return

    return stream_response(events(), kind="ndjson")

