"""OpenAI dialect: /v1/completions, /v1/chat/completions (SSE), /v1/models."""
from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from ..engine.sequence import RequestOutput
from ..errors import HearthError, InvalidRequestError
from ..sampling import SamplingParams, StructuredOutput, renamed
from .common import Delta, Generation, parse, server, start, token_bytes, token_text, usage
from .errors import error_body
from .sse import DONE, sse, stream_response
from .store_api import list_model_names
from .tools import ToolSetup, forced_schema, parse_tool_choice, parse_tools, response_format

router = APIRouter(prefix="/v1")


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")  # an unknown field is a 400 (common.refuse_unknown)
    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # OpenAI fields that do not change the answer: accepted without effect
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None  # (the prefix cache is automatic)
    safety_identifier: str | None = None
    # extras (vLLM-style extra_body)
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    truncate: Literal["left"] | None = None
    logit_bias: dict[str, Any] | None = None  # token id (a string, as JSON keys are) -> [-100, 100]
    response_format: Any = None  # text | json_object | json_schema -> SamplingParams.structured (serve/tools.py)
    tools: Any = None  # chat only (serve/tools.py validates them)
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    # OpenAI fields not implemented: rejected when set, never ignored (reject_unimplemented)
    functions: list[Any] | None = None  # the deprecated form of tools
    function_call: Any = None
    best_of: int | None = None

    def reject_unimplemented(self) -> None:
        """400 for an OpenAI field this server does not implement, when it asks for something."""
        asked = {"functions": bool(self.functions),
                 "function_call": self.function_call not in (None, "none", "auto"),
                 "best_of": self.best_of not in (None, 1)}
        for name, on in asked.items():
            if on:
                hint = " (send tools and tool_choice instead)" if name.startswith("function") else ""
                raise InvalidRequestError(f"{name} is not supported by this server{hint}: drop it from the request "
                                          "(it is refused rather than ignored)", param=name)

    def params(self, max_tokens: int | None, logprobs: int | None,
               names: dict[str, str] | None = None) -> SamplingParams:
        """The request's SamplingParams; a bad value is an InvalidRequestError naming the field as sent."""
        self.reject_unimplemented()
        structured = response_format(self.response_format)
        try:
            params = self._params(max_tokens, logprobs)
            params.structured = structured
            params.validate()
            return params
        except InvalidRequestError as e:
            raise renamed(e, {"structured": "response_format", **(names or {})}) from None

    def _params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        return SamplingParams(
            n=self.n, temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k or -1, min_p=self.min_p or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0, presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0, seed=self.seed, stop=self.stop,
            stop_token_ids=self.stop_token_ids or [], include_stop_str_in_output=self.include_stop_str_in_output,
            max_tokens=max_tokens, min_tokens=self.min_tokens, ignore_eos=self.ignore_eos, logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens, truncate=self.truncate, logit_bias=self.logit_bias)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[Any] | None = None  # assistant: earlier calls [{id, type, function: {name, arguments}}]
    tool_call_id: str | None = None  # tool: the call this is the result of

    def as_dict(self, i: int = 0) -> dict[str, Any]:
        """The message as chat templates read it: text content, tool_calls' arguments as objects."""
        content = self.content
        if isinstance(content, list):
            bad = [p.type for p in content if p.type != "text"]
            if bad:
                raise InvalidRequestError(f"content parts of type {bad[0]!r} are not supported: send text only",
                                          param="messages")
            content = "".join(p.text or "" for p in content)
        m: dict[str, Any] = {"role": self.role, "content": content or ""}
        if self.name is not None:
            m["name"] = self.name
        if self.tool_call_id is not None:
            m["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            m["tool_calls"] = [_history_call(c, f"messages[{i}].tool_calls[{j}]")
                               for j, c in enumerate(self.tool_calls)]
        return m


def _history_call(c: Any, where: str) -> dict[str, Any]:
    """An assistant message's earlier call, with arguments (JSON text on the wire) as an object."""
    fn = c.get("function") if isinstance(c, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise InvalidRequestError(f"{where} must be {{\"id\", \"type\": \"function\", \"function\": "
                                  "{\"name\", \"arguments\"}}", param="messages")
    args = fn.get("arguments")
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            raise InvalidRequestError(f"{where}.function.arguments is not valid JSON", param="messages") from None
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise InvalidRequestError(f"{where}.function.arguments must be a JSON object", param="messages")
    return {"id": c.get("id"), "type": "function", "function": {"name": fn["name"], "arguments": args}}


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(default_factory=list)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


def _chunked(request_id: str, kind: str, model: str, created: int) -> dict[str, Any]:
    return {"id": request_id, "object": kind, "created": created, "model": model}


# ---------------- logprobs ----------------
def chat_logprobs(tok, ids: list[int], lps: list[dict[int, float]] | None, top_n: int) -> dict | None:
    if lps is None:
        return None

    def entry(t: int, v: float) -> dict[str, Any]:
        return {"token": token_text(tok, t), "logprob": v, "bytes": token_bytes(tok, t)}

    return {"content": [{**entry(t, d[t]), "top_logprobs": [entry(k, v) for k, v in
                                                            sorted(d.items(), key=lambda kv: -kv[1])[:top_n]]}
                        for t, d in zip(ids, lps)]}


def completion_logprobs(tok, ids: list[int], lps: list[dict[int, float]] | None, top_n: int,
                        offset: int) -> dict | None:
    if lps is None:
        return None
    tokens = [token_text(tok, t) for t in ids]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": [d[t] for t, d in zip(ids, lps)],
            "top_logprobs": [{token_text(tok, k): v for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top_n]}
                             for d in lps], "text_offset": offsets}


# ---------------- endpoints ----------------
@router.get("/models")
async def models(request: Request) -> dict[str, Any]:
    srv = server(request)
    names = list_model_names(srv)
    cur = srv.manager.current
    return {"object": "list", "data": [
        {"id": n, "object": "model", "created": int(srv.started_at), "owned_by": "hearthlm",
         **({"max_model_len": cur.engine.max_model_len} if cur is not None and cur.name == n else {})}
        for n in names]}


@router.post("/completions")
async def completions(request: Request):
    body = await parse(request, CompletionRequest)
    if body.suffix:
        raise InvalidRequestError("suffix is not supported", param="suffix")
    for name in ("tools", "tool_choice", "parallel_tool_calls"):
        if getattr(body, name) is not None:
            raise InvalidRequestError(f"{name} belongs to /v1/chat/completions: completions take no tools",
                                      param=name)
    prompts: list[str | list[int]]
    p = body.prompt
    if isinstance(p, str) or (p and isinstance(p[0], int)):
        prompts = [p]  # type: ignore[list-item]
    else:
        prompts = list(p)  # type: ignore[arg-type]
    if not prompts:
        raise InvalidRequestError("prompt must not be empty", param="prompt")
    params = body.params(body.max_tokens, body.logprobs)
    gens: list[Generation] = []
    try:
        for prompt in prompts:
            gens.append(await start(request, "openai", body.model, replace(params), prompt=prompt,
                                    names={"structured": "response_format"}))
    except BaseException:
        for g in gens:
            await g.aclose()
        raise
    rid, created = f"cmpl-{gens[0].request_id}", int(time.time())
    model, tok = gens[0].model.name, gens[0].model.engine.tokenizer
    top_n = body.logprobs or 0

    def echo_text(out: RequestOutput | None, i: int) -> str:
        if not body.echo:
            return ""
        prompt = prompts[i]
        return prompt if isinstance(prompt, str) else tok.decode(prompt)

    if not body.stream:
        try:
            outs = [await g.result() for g in gens]
        finally:
            for g in gens:
                await g.aclose()
        choices = []
        for i, out in enumerate(outs):
            for c in out.outputs:
                pre = echo_text(out, i)
                choices.append({"index": i * body.n + c.index, "text": pre + c.text, "finish_reason": c.finish_reason,
                                "logprobs": completion_logprobs(tok, c.token_ids, c.logprobs, top_n, len(pre))})
        return JSONResponse({**_chunked(rid, "text_completion", model, created), "choices": choices,
                             "usage": _sum_usage(outs)}, headers=_headers(gens[0], outs))

    async def body_iter() -> AsyncIterator[bytes]:
        try:
            outs = []
            for i, g in enumerate(gens):
                offsets: dict[int, int] = {}
                if body.echo:
                    for j in range(body.n):
                        offsets[j] = len(echo_text(None, i))
                        yield sse({**_chunked(rid, "text_completion", model, created), "choices": [
                            {"index": i * body.n + j, "text": echo_text(None, i), "logprobs": None,
                             "finish_reason": None}]})
                async for deltas in g.deltas():
                    choices = []
                    for d in deltas:
                        lp = completion_logprobs(tok, d.token_ids, d.logprobs, top_n, offsets.get(d.index, 0))
                        offsets[d.index] = offsets.get(d.index, 0) + len(d.text)
                        choices.append({"index": i * body.n + d.index, "text": d.text, "logprobs": lp,
                                        "finish_reason": d.finish_reason})
                    yield sse({**_chunked(rid, "text_completion", model, created), "choices": choices,
                               **({"usage": None} if body.include_usage else {})})
                outs.append(g.last)
            if body.include_usage:
                yield sse({**_chunked(rid, "text_completion", model, created), "choices": [],
                           "usage": _sum_usage(outs)})
            yield DONE
        except HearthError as e:
            yield sse(error_body("openai", e))
            yield DONE  # clients stop reading at [DONE] whatever came before
        finally:
            for g in gens:
                await g.aclose()

    return stream_response(body_iter(), headers={"X-Request-Id": rid})


@router.post("/chat/completions")
async def chat_completions(request: Request):
    body = await parse(request, ChatRequest)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidRequestError("top_logprobs needs logprobs: true", param="top_logprobs")
    top_n = body.top_logprobs or 0
    names = {"logprobs": "top_logprobs", "structured": "response_format",
             **({"max_tokens": "max_completion_tokens"} if body.max_completion_tokens is not None else {})}
    params = body.params(max_tokens, top_n if body.logprobs else None, names)
    messages = [m.as_dict(i) for i, m in enumerate(body.messages)]
    setup = _tool_setup(body, params, names)
    parallel = body.parallel_tool_calls is not False
    if setup is None:
        gen = await start(request, "openai", body.model, params, messages=messages, names=names)
    else:
        gen = await start(request, "openai", body.model, params, names=names,
                          build=lambda eng, p: setup.prepare(eng, messages, p))
    rid, created, model = f"chatcmpl-{gen.request_id}", int(time.time()), gen.model.name
    tok = gen.model.engine.tokenizer

    if not body.stream:
        out = await gen.result()
        choices = []
        for c in out.outputs:
            content, calls = setup.parse(c.text) if setup is not None else (c.text, [])
            calls = calls if parallel else calls[:1]
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if calls:
                message["tool_calls"] = [call.openai() for call in calls]
            choices.append({"index": c.index, "message": message,
                            "logprobs": chat_logprobs(tok, c.token_ids, c.logprobs, top_n),
                            "finish_reason": "tool_calls" if calls else c.finish_reason})
        return JSONResponse({**_chunked(rid, "chat.completion", model, created), "choices": choices,
                             "usage": usage(out)}, headers=_headers(gen, [out]))

    streams = {i: setup.stream() for i in range(body.n)} if setup is not None and setup.parsing else {}

    def entries(d: Delta) -> list[dict[str, Any]]:
        """A delta's choice entries, in order: content (held back while it may start a call), tool_calls deltas
        (each call as it is written: its header, then argument chunks), the finish reason."""
        ts = streams.get(d.index)
        if ts is None:
            return [_chat_delta(tok, d, top_n)]
        text, reason = ts.feed(d.text), None
        if d.finish_reason:
            rest, calls = ts.finish()
            text += rest
            reason = "tool_calls" if calls else d.finish_reason
        calls_due = ts.call_deltas(None if parallel else 1)
        out: list[dict[str, Any]] = []
        if text:
            out.append({"index": d.index, "delta": {"content": text}, "logprobs": None, "finish_reason": None})
        if calls_due:
            out.append({"index": d.index, "delta": {"tool_calls": calls_due}, "logprobs": None,
                        "finish_reason": None})
        if reason:
            out.append({"index": d.index, "delta": {}, "logprobs": None, "finish_reason": reason})
        return out

    async def body_iter() -> AsyncIterator[bytes]:
        head = _chunked(rid, "chat.completion.chunk", model, created)
        extra = {"usage": None} if body.include_usage else {}
        try:
            yield sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None} for i in range(body.n)],
                       **extra})
            async for deltas in gen.deltas():
                per = [entries(d) for d in deltas]
                for k in range(max(map(len, per), default=0)):  # one chunk per round: an index once per chunk
                    yield sse({**head, "choices": [e[k] for e in per if k < len(e)], **extra})
            if body.include_usage and gen.last is not None:
                yield sse({**head, "choices": [], "usage": usage(gen.last)})
            yield DONE
        except HearthError as e:
            yield sse(error_body("openai", e))
            yield DONE  # clients stop reading at [DONE] whatever came before
        finally:
            await gen.aclose()

    return stream_response(body_iter(), headers={"X-Request-Id": rid})


def _tool_setup(body: ChatRequest, params: SamplingParams, names: dict[str, str]) -> ToolSetup | None:
    """tools, tool_choice and parallel_tool_calls -> a ToolSetup (None when the chat involves no tools); a forced
    choice (required, a named function) puts the calls' schema into params.structured."""
    tools = parse_tools(body.tools)
    choice = parse_tool_choice(body.tool_choice, tools)
    if body.parallel_tool_calls is not None and not tools:
        raise InvalidRequestError("parallel_tool_calls needs tools", param="parallel_tool_calls")
    history = any(m.tool_calls or m.role == "tool" for m in body.messages)
    if not tools and not history:
        return None
    setup = ToolSetup(tools, choice)
    if setup.parsing and body.logprobs and body.stream:
        raise InvalidRequestError("logprobs cannot be streamed with tools (text that may start a call is held "
                                  "back): drop logprobs, set stream false, or tool_choice 'none'", param="logprobs")
    if setup.forced is not None:
        if params.structured is not None:
            raise InvalidRequestError("response_format cannot be combined with tool_choice 'required' or a named "
                                      "function: the calls' schema shapes the output", param="response_format")
        try:
            params.structured = StructuredOutput(json=forced_schema(tools, choice, body.parallel_tool_calls
                                                                    is not False))
            params.validate()
        except InvalidRequestError as e:
            raise renamed(e, {"structured": "tools"}) from None
        names["structured"] = "tools"  # a schema the grammar engine cannot compile comes from the tools' parameters
    return setup


def _chat_delta(tok, d: Delta, top_n: int) -> dict[str, Any]:
    return {"index": d.index, "delta": {"content": d.text} if d.text or not d.finish_reason else {},
            "logprobs": chat_logprobs(tok, d.token_ids, d.logprobs, top_n), "finish_reason": d.finish_reason}


def _sum_usage(outs: list[RequestOutput]) -> dict[str, Any]:
    total: dict[str, Any] = {}
    for out in outs:
        for k, v in usage(out).items():
            if isinstance(v, dict):
                total[k] = {kk: total.get(k, {}).get(kk, 0) + vv for kk, vv in v.items()}
            else:
                total[k] = total.get(k, 0) + v
    return total


def _headers(gen: Generation, outs: list[RequestOutput]) -> dict[str, str]:
    h = {"X-Request-Id": gen.request_id}
    truncated = sum(o.truncated_tokens for o in outs)
    if truncated:
        h["X-Truncated-Tokens"] = str(truncated)
    return h
