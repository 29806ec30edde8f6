"""Embeddings endpoints: OpenAI /v1/embeddings, Ollama /api/embed and the legacy /api/embeddings.

A decoder's inputs are pooling requests that its engine's scheduler batches beside generation (AsyncEngine.pool).
A BERT-family encoder has no scheduler: rows of concurrent requests are gathered into shared forwards
(EmbedBatcher), length-sorted groups within a row and token budget, run on the encoder's own worker thread. What each field does: README, "Embeddings"."""
from __future__ import annotations

import asyncio
import base64
import logging
import time
import uuid
from typing import Any, Literal

import torch
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, StrictInt

from ..embed import DecoderEmbedder, Embedder, Inputs, batches, embedder_of
from ..errors import InvalidRequestError
from .common import Server, off_loop, parse, server
from .models import Loaded, parse_keep_alive
from .ollama import HONOURED, OFF_ONLY, RUNTIME_ONLY

log = logging.getLogger("hearthlm.serve")
router = APIRouter()
MAX_INPUTS = 2048  # OpenAI's limit on inputs per request
MAX_BATCH_ROWS = 64  # rows per forward
MAX_BATCH_TOKENS = 16384  # tokens per forward (an encoder's padded rows x longest; a decoder's packed sum)
NS = 1_000_000_000


class OpenAIEmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input: Any = None  # a string, a list of strings, token ids, or a list of token-id lists (checked below)
    model: str | None = None
    encoding_format: Literal["float", "base64"] | None = None  # None: float
    dimensions: StrictInt | None = None
    user: str | None = None  # accepted, as OpenAI: it changes nothing
    truncate_prompt_tokens: StrictInt | None = None  # vLLM's extension: N or -1 (the model's limit)


class OllamaEmbedBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    input: Any = None  # a string or a list of strings
    truncate: bool | None = None  # None: true, as Ollama
    dimensions: StrictInt | None = None
    options: dict[str, Any] | None = None
    keep_alive: float | str | None = None


class OllamaEmbeddingsBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | None = None
    options: dict[str, Any] | None = None
    keep_alive: float | str | None = None


class EmbedBatcher:
    """Gathers the rows of concurrent requests to one model into shared forwards: rows waiting while a forward runs
    go together into the next round, each round split by `batches` (sorted by length, bounded rows and tokens)."""

    def __init__(self, loaded: Loaded, embedder: Embedder):
        self.loaded, self.embedder = loaded, embedder
        self.pending: list[tuple[list[int], asyncio.Future]] = []
        self.task: asyncio.Task | None = None

    async def embed(self, rows: list[list[int]]) -> torch.Tensor:
        """Vectors [len(rows), dimension] float32."""
        loop = asyncio.get_running_loop()
        futs = [loop.create_future() for _ in rows]
        self.pending.extend(zip(rows, futs))
        if self.task is None or self.task.done():
            self.task = loop.create_task(self._drain())
        try:
            return torch.stack(await asyncio.gather(*futs))
        except BaseException:
            for f in futs:
                f.cancel()  # a cancelled row is skipped by rounds not yet run
            raise

    async def _drain(self) -> None:
        emb, run = self.embedder, self.loaded.aengine.run
        while self.pending:
            await asyncio.sleep(0)  # requests parsed in this loop tick join the round
            items = [(r, f) for r, f in self.pending if not f.done()]
            self.pending = []
            for group in batches([r for r, _ in items], MAX_BATCH_ROWS, MAX_BATCH_TOKENS, emb.padded):
                live = [items[i] for i in group if not items[i][1].done()]
                if not live:
                    continue
                rows = [r for r, _ in live]
                try:
                    vecs = await run(lambda _eng, rows=rows: emb.embed_ids(rows))
                except Exception as e:  # noqa: BLE001 - handed to every request of the group
                    for _, f in live:
                        if not f.done():
                            f.set_exception(e)
                    continue
                for (_, f), v in zip(live, vecs):
                    if not f.done():
                        f.set_result(v)


def _batcher(m: Loaded, emb: Embedder) -> EmbedBatcher:
    b = m.embed_batcher
    if not isinstance(b, EmbedBatcher) or b.embedder is not emb:
        b = m.embed_batcher = EmbedBatcher(m, emb)
    return b


def openai_inputs(value: Any) -> list[str] | list[list[int]]:
    """OpenAI `input` -> texts or token-id lists; a 400 naming input for empty or mixed shapes."""
    shape = ("input must be a non-empty string, a list of strings, a list of token ids, or a list of lists of "
             "token ids")

    def is_id(x: Any) -> bool:
        return type(x) is int

    if isinstance(value, str):
        if not value:
            raise InvalidRequestError("input is an empty string: send text to embed", param="input")
        return [value]
    if not isinstance(value, list) or not value:
        raise InvalidRequestError(shape, param="input")
    if len(value) > MAX_INPUTS:
        raise InvalidRequestError(f"input holds {len(value):,} items; at most {MAX_INPUTS:,} per request",
                                  param="input")
    if all(isinstance(x, str) for x in value):
        empty = next((i for i, x in enumerate(value) if not x), None)
        if empty is not None:
            raise InvalidRequestError(f"input[{empty}] is an empty string: send text to embed", param="input")
        return value
    if all(is_id(x) for x in value):
        return [value]
    if all(isinstance(x, list) for x in value):
        for i, x in enumerate(value):
            if not x or not all(is_id(t) for t in x):
                raise InvalidRequestError(f"input[{i}] must be a non-empty list of token ids", param="input")
        return value
    raise InvalidRequestError(shape, param="input")


def ollama_inputs(value: Any) -> list[str]:
    """Ollama `input` -> texts; an empty string or list means "load the model" (as Ollama), so []."""
    if value is None or value == "" or value == []:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise InvalidRequestError("input must be a string or a list of strings", param="input")
    empty = next((i for i, x in enumerate(value) if not x), None)
    if empty is not None:
        raise InvalidRequestError(f"input[{empty}] is an empty string: send text to embed", param="input")
    if len(value) > MAX_INPUTS:
        raise InvalidRequestError(f"input holds {len(value):,} items; at most {MAX_INPUTS:,} per request",
                                  param="input")
    return value


def ollama_limit(options: dict[str, Any] | None) -> int | None:
    """options.num_ctx (the token limit per input; Ollama truncates to it) or None. Sampling and runtime options
    change no embedding and are accepted; unknown names are a 400 naming options.<name>."""
    known = HONOURED | RUNTIME_ONLY | set(OFF_ONLY) | {"repeat_last_n"}
    for name in options or {}:
        if name not in known:
            raise InvalidRequestError(f"unknown option options.{name}", param=f"options.{name}")
    n = (options or {}).get("num_ctx")
    if n is None:
        return None
    if type(n) is not int or n < 1:
        raise InvalidRequestError(f"options.num_ctx must be a positive integer, got {n!r}", param="options.num_ctx")
    return n


async def run_embed(request: Request, model: str | None, items: list[str] | list[list[int]], dialect: str,
                    truncate: bool | int = False, dimensions: int | None = None,
                    keep_alive: float | None | str = "default", limit: int | None = None, param: str = "input"
                    ) -> tuple[Loaded, torch.Tensor, Inputs, float]:
    """Acquire the model, tokenize off the loop, embed (an encoder through the model's batcher, a decoder through
    the engine's scheduler): (model, vectors, inputs,
    load seconds). limit: a token cap that errors like the model's own unless truncating."""
    srv: Server = server(request)
    m, load_s = await srv.manager.acquire(model, keep_alive, purpose="embed")
    try:
        def prepare() -> tuple[Embedder, int | None, Inputs]:
            emb = embedder_of(m.engine, m.name)
            dims = emb.check_dimensions(dimensions)
            cap = truncate
            if limit is not None:
                cap = limit if truncate is True or truncate is False else min(limit, truncate)
                if truncate is False:  # num_ctx without truncation: over it is an error
                    inputs = emb.tokenize(items, False, param)
                    long = next((i for i, r in enumerate(inputs.rows) if len(r) > limit), None)
                    if long is not None:
                        raise InvalidRequestError(f"{param}[{long}] is {len(inputs.rows[long]):,} tokens, over "
                                                  f"options.num_ctx {limit:,}: shorten it, or set truncate",
                                                  param=param)
                    return emb, dims, inputs
            return emb, dims, emb.tokenize(items, cap, param)

        emb, dims, inputs = await off_loop(prepare)
        if not inputs.rows:
            vectors = torch.empty(0, 0)
        elif isinstance(emb, DecoderEmbedder):  # the engine's scheduler batches it beside generation
            vectors = emb.cut(await emb.embed_async(m.aengine, inputs.rows), dims)
        else:
            vectors = emb.cut(await _batcher(m, emb).embed(inputs.rows), dims)
    finally:
        srv.manager.release(m)
    srv.metrics.requests.labels(dialect, "200").inc()
    srv.metrics.prompt_tokens.inc(inputs.num_tokens)
    return m, vectors, inputs, load_s


def _log(rid: str, dialect: str, endpoint: str, m: Loaded, inputs: Inputs, arrival: float) -> None:
    log.info("request id=%s dialect=%s endpoint=%s model=%s status=200 inputs=%d prompt_tokens=%d "
             "truncated_tokens=%d e2e_ms=%.1f", rid, dialect, endpoint, m.name, len(inputs.rows), inputs.num_tokens,
             inputs.truncated_tokens, (time.monotonic() - arrival) * 1000)


@router.post("/v1/embeddings")
async def openai_embeddings(request: Request) -> JSONResponse:
    arrival = time.monotonic()
    body = await parse(request, OpenAIEmbeddingRequest)
    items = openai_inputs(body.input)
    t = body.truncate_prompt_tokens
    if t is not None and (t == 0 or t < -1):
        raise InvalidRequestError(f"truncate_prompt_tokens must be a positive token count or -1 (the model's "
                                  f"limit), got {t}", param="truncate_prompt_tokens")
    truncate: bool | int = False if t is None else True if t == -1 else t
    m, vectors, inputs, _ = await run_embed(request, body.model, items, "openai", truncate, body.dimensions)
    if body.encoding_format == "base64":  # little-endian float32 bytes, as OpenAI sends them
        arr = vectors.numpy().astype("<f4")
        data: list[Any] = [base64.b64encode(row.tobytes()).decode("ascii") for row in arr]
    else:
        data = vectors.tolist()
    _log(f"embd-{uuid.uuid4().hex[:16]}", "openai", "/v1/embeddings", m, inputs, arrival)
    return JSONResponse({"object": "list", "model": m.name,
                         "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)],
                         "usage": {"prompt_tokens": inputs.num_tokens, "total_tokens": inputs.num_tokens}})


@router.post("/api/embed")
async def ollama_embed(request: Request) -> JSONResponse:
    arrival = time.monotonic()
    body = await parse(request, OllamaEmbedBody)
    items = ollama_inputs(body.input)
    limit = ollama_limit(body.options)
    keep = "default" if body.keep_alive is None else parse_keep_alive(body.keep_alive)
    truncate = body.truncate is not False
    m, vectors, inputs, load_s = await run_embed(request, body.model, items, "ollama", truncate,
                                                 body.dimensions, keep, limit)
    _log(f"embd-{uuid.uuid4().hex[:16]}", "ollama", "/api/embed", m, inputs, arrival)
    return JSONResponse({"model": body.model or m.name, "embeddings": vectors.tolist() if items else [],
                         "total_duration": int((time.monotonic() - arrival) * NS), "load_duration": int(load_s * NS),
                         "prompt_eval_count": inputs.num_tokens})


@router.post("/api/embeddings")
async def ollama_embeddings(request: Request) -> JSONResponse:
    """Ollama's legacy endpoint: one prompt, {"embedding": [...]}; an empty prompt loads the model (as Ollama)."""
    arrival = time.monotonic()
    body = await parse(request, OllamaEmbeddingsBody)
    limit = ollama_limit(body.options)
    keep = "default" if body.keep_alive is None else parse_keep_alive(body.keep_alive)
    items = [body.prompt] if body.prompt else []
    m, vectors, inputs, _ = await run_embed(request, body.model, items, "ollama", True, None, keep, limit,
                                            "prompt")
    _log(f"embd-{uuid.uuid4().hex[:16]}", "ollama", "/api/embeddings", m, inputs, arrival)
    return JSONResponse({"embedding": vectors[0].tolist() if items else []})
