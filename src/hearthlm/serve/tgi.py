"""TGI dialect: POST /generate, /generate_stream (SSE token events), POST / (by "stream"), GET /info."""
from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from .. import __version__
from ..engine.engine import LLMEngine
from ..engine.sequence import CompletionOutput
from ..errors import HearthError, InvalidRequestError
from ..sampling import SamplingParams, StructuredOutput, renamed
from .common import Generation, parse, server, start
from .errors import error_body
from .sse import sse, stream_response

router = APIRouter()
# SamplingParams field -> how a TGI request names it
TGI_NAMES = {f: f"parameters.{f}" for f in ("temperature", "top_k", "top_p", "seed", "stop", "repetition_penalty",
                                            "frequency_penalty")}
TGI_NAMES.update(max_tokens="parameters.max_new_tokens", logprobs="parameters.top_n_tokens",
                 structured="parameters.grammar")


class Parameters(BaseModel):
    model_config = ConfigDict(extra="allow")  # checked in sampling(): an unknown parameter is a 400, not ignored
    max_new_tokens: int | None = 100
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    do_sample: bool | None = False
    seed: int | None = None
    stop: list[str] | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    details: bool | None = False
    return_full_text: bool | None = False
    truncate: int | None = None
    top_n_tokens: int | None = None
    best_of: int | None = None

    grammar: Any = None  # {"type": "json", "value": schema} | {"type": "regex", "value": "..."}

    # TGI parameters that change the answer and are not implemented: refused unless at their off value
    typical_p: float | None = None
    watermark: bool | None = False
    decoder_input_details: bool | None = False
    adapter_id: str | None = None

    def refuse_unimplemented(self) -> None:
        """A 400 naming parameters.<name> for an unknown parameter or one this server does not implement."""
        for name, value in (self.model_extra or {}).items():
            if value is None:  # clients send every parameter they know, unset ones as null
                continue
            raise InvalidRequestError(f"unknown parameter parameters.{name}", param=f"parameters.{name}")
        asked = {"typical_p": self.typical_p not in (None, 1, 1.0), "watermark": bool(self.watermark),
                 "decoder_input_details": bool(self.decoder_input_details), "adapter_id": bool(self.adapter_id)}
        for name, on in asked.items():
            if on:
                raise InvalidRequestError(f"parameters.{name} is not supported by this server yet: drop it from the "
                                          "request (it is refused rather than ignored)", param=f"parameters.{name}")

    def sampling(self) -> SamplingParams:
        self.refuse_unimplemented()
        if self.best_of not in (None, 1):
            raise InvalidRequestError("best_of > 1 is not supported: send several requests", param="best_of")
        if self.truncate is not None and self.truncate < 1:
            raise InvalidRequestError(f"parameters.truncate must be a positive number of tokens, got {self.truncate}",
                                      param="parameters.truncate")
        sample = bool(self.do_sample) or any(v is not None for v in (self.temperature, self.top_k, self.top_p))
        try:
            return self._sampling(sample)
        except InvalidRequestError as e:
            raise renamed(e, TGI_NAMES) from None

    def _sampling(self, sample: bool) -> SamplingParams:
        return SamplingParams(
            temperature=(1.0 if self.temperature is None else self.temperature) if sample else 0.0,
            top_k=self.top_k or -1, top_p=1.0 if self.top_p is None else self.top_p, seed=self.seed, stop=self.stop,
            repetition_penalty=self.repetition_penalty or 1.0, frequency_penalty=self.frequency_penalty or 0.0,
            max_tokens=self.max_new_tokens, logprobs=self.top_n_tokens or 0, structured=self.structured())

    def structured(self) -> StructuredOutput | None:
        """TGI's grammar: {"type": "json" | "json_object", "value": a JSON schema (object or text)} or
        {"type": "regex", "value": "..."}."""
        g = self.grammar
        if g is None:
            return None
        if not isinstance(g, dict) or set(g) - {"type", "value"} or "type" not in g or "value" not in g:
            raise InvalidRequestError('parameters.grammar must be {"type": "json" or "regex", "value": ...}',
                                      param="parameters.grammar")
        kind, value = g["type"], g["value"]
        if kind in ("json", "json_object"):
            return StructuredOutput(json=value if value not in ({}, None) else True)
        if kind == "regex":
            if not isinstance(value, str):
                raise InvalidRequestError("parameters.grammar.value must be a regular expression string for type "
                                          "regex", param="parameters.grammar")
            return StructuredOutput(regex=value)
        raise InvalidRequestError(f"parameters.grammar.type must be 'json' or 'regex', got {kind!r}",
                                  param="parameters.grammar")


class Body(BaseModel):
    model_config = ConfigDict(extra="allow")  # an unknown field is a 400 (common.refuse_unknown)
    inputs: str
    parameters: Parameters = Field(default_factory=Parameters)
    stream: bool = False


def finish_reason(c: CompletionOutput) -> str:
    if c.finish_reason == "length":
        return "length"
    return "stop_sequence" if isinstance(c.stop_reason, str) else "eos_token"


def _token(engine: LLMEngine, token_id: int, lp: dict[int, float] | None, text: str | None = None) -> dict[str, Any]:
    tok = engine.tokenizer
    return {"id": token_id, "text": tok.decode([token_id], skip_special_tokens=False) if text is None else text,
            "logprob": lp.get(token_id) if lp else None, "special": token_id in tok.all_special_ids}


def _top(engine: LLMEngine, lp: dict[int, float] | None, n: int | None) -> list[dict[str, Any]] | None:
    if not n or not lp:
        return None
    return [_token(engine, k, lp) for k, _ in sorted(lp.items(), key=lambda kv: -kv[1])[:n]]


async def _start(request: Request, body: Body) -> Generation:
    p = body.parameters
    params = p.sampling()

    def build(engine: LLMEngine, params: SamplingParams) -> tuple[list[int], int, int]:
        if p.truncate is None:  # TGI's truncate keeps the last tokens of any prompt
            engine.refuse_unfittable(len(body.inputs), params)
        ids = engine.tokenize_prompt(body.inputs)
        if p.truncate is not None and len(ids) > p.truncate:  # TGI: keep the last `truncate` input tokens
            return ids[-p.truncate:], 0, len(ids) - p.truncate
        return ids, 0, 0

    return await start(request, "tgi", None, params, build=build, names=TGI_NAMES)


@router.post("/generate")
async def generate(request: Request) -> Response:
    body = await parse(request, Body)
    gen = await _start(request, body)
    out = await gen.result()
    c, p, eng = out.outputs[0], body.parameters, gen.model.engine
    resp: dict[str, Any] = {"generated_text": (body.inputs if p.return_full_text else "") + c.text}
    if p.details:
        lps = c.logprobs or [None] * len(c.token_ids)
        resp["details"] = {"finish_reason": finish_reason(c), "generated_tokens": len(c.token_ids),
                           "seed": p.seed, "prefill": [],
                           "tokens": [_token(eng, t, lp) for t, lp in zip(c.token_ids, lps)],
                           **({"top_tokens": [_top(eng, lp, p.top_n_tokens) for lp in lps]} if p.top_n_tokens else {})}
    headers = {"X-Request-Id": gen.request_id, "x-generated-tokens": str(len(c.token_ids)),
               "x-prompt-tokens": str(len(out.prompt_token_ids))}
    if out.truncated_tokens:
        headers["X-Truncated-Tokens"] = str(out.truncated_tokens)
    return JSONResponse(resp, headers=headers)


@router.post("/generate_stream")
async def generate_stream(request: Request) -> Response:
    return await _stream(request, await parse(request, Body))


async def _stream(request: Request, body: Body) -> Response:
    gen = await _start(request, body)
    p, eng = body.parameters, gen.model.engine

    async def events() -> AsyncIterator[bytes]:
        n = 0
        try:
            async for deltas in gen.deltas():
                d = deltas[0]
                for i, t in enumerate(d.token_ids):
                    lp = d.logprobs[i] if d.logprobs else None
                    last = d.finish_reason is not None and i == len(d.token_ids) - 1
                    ev: dict[str, Any] = {"index": n, "token": _token(eng, t, lp, d.text if i == 0 else ""),
                                          "top_tokens": _top(eng, lp, p.top_n_tokens), "generated_text": None,
                                          "details": None}
                    if last and gen.last is not None:
                        c = gen.last.outputs[0]
                        ev["generated_text"] = (body.inputs if p.return_full_text else "") + c.text
                        ev["details"] = {"finish_reason": finish_reason(c), "generated_tokens": len(c.token_ids),
                                         "input_length": len(gen.last.prompt_token_ids), "seed": p.seed}
                    n += 1
                    yield sse(ev)
        except HearthError as e:
            yield sse(error_body("tgi", e))
        finally:
            await gen.aclose()

    return stream_response(events(), headers={"X-Request-Id": gen.request_id})


@router.post("/")
async def compat(request: Request) -> Response:
    """TGI's compat route (what InferenceClient(base_url).text_generation posts to): dispatch on "stream"."""
    body = await parse(request, Body)
    if body.stream:
        return await _stream(request, body)
    return await generate(request)


@router.get("/info")
async def info(request: Request) -> dict[str, Any]:
    srv = server(request)
    m, cfg = srv.manager.current, srv.cfg
    max_len = m.engine.max_model_len if m else cfg.max_model_len
    return {"model_id": m.name if m else cfg.model_name, "model_sha": None,
            "model_dtype": str(m.engine.runner.dtype).replace("torch.", "") if m else cfg.dtype,
            "model_device_type": m.engine.device.type if m else cfg.device, "model_pipeline_tag": "text-generation",
            "max_concurrent_requests": (m.engine.config.scheduler.max_num_seqs if m else cfg.max_num_seqs or 0)
            + cfg.max_queue, "max_best_of": 1, "max_stop_sequences": 16,
            "max_input_tokens": max_len - 1, "max_total_tokens": max_len, "max_input_length": max_len - 1,
            "max_batch_total_tokens": m.engine.kv_capacity_tokens if m else None,
            "max_client_batch_size": 1, "router": "hearthlm", "version": __version__, "sha": None,
            "docker_label": None, "validation_workers": 1}
