"""HearthClient: OpenAI-dialect calls to a hearth server with retries, stream fallback and a context guard."""
from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx

from ..errors import ContextLengthError, HearthError
from .base import (RETRY_STATUS, ServerError, ServerUnavailableError, StreamInterruptedError, backoff, error_from_response,
                   is_loopback, retry_after, server_url)

Chunk = dict[str, Any]


class _StreamEnded(Exception):
    """The event stream closed without `data: [DONE]`."""


def text_of(chunk: Chunk) -> str:
    """The text of choice 0 in a chat or completion chunk (or full response)."""
    choices = chunk.get("choices") or [{}]
    c = choices[0]
    return (c.get("delta") or c.get("message") or {}).get("content") or c.get("text") or ""


class HearthClient:
    """Retries connection errors, 5xx and 429 with exponential backoff and full jitter (Retry-After wins),
    at most `max_retries` times; a stream that breaks before its first token is replayed without streaming;
    prompts are counted with the server's /tokenize and rejected with ContextLengthError before sending."""

    def __init__(self, base_url: str | None = None, timeout: float = 120.0, max_retries: int = 5, *,
                 model: str | None = None, api_key: str | None = None, backoff_base: float = 0.5,
                 backoff_max: float = 20.0, max_retry_after: float = 60.0, check_context: bool = True):
        self.base_url = server_url(base_url)
        self.max_retries, self.model, self.check_context = max_retries, model, check_context
        self.backoff_base, self.backoff_max, self.max_retry_after = backoff_base, backoff_max, max_retry_after
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.base_url, timeout=timeout, headers=headers,
                                 trust_env=not is_loopback(self.base_url))
        self.sleep = time.sleep  # replaceable in tests

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> HearthClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport -------------------------------------------------------------------------------------------
    def _send(self, method: str, path: str, body: Any = None, stream: bool = False) -> httpx.Response:
        last: Exception | None = None
        for attempt in range(self.max_retries + 1):
            try:
                resp = self.http.send(self.http.build_request(method, path, json=body), stream=stream)
            except httpx.TransportError as e:  # refused, reset, timeouts
                last = e
                if attempt < self.max_retries:
                    self.sleep(backoff(attempt, self.backoff_base, self.backoff_max))
                continue
            if resp.status_code in RETRY_STATUS and attempt < self.max_retries:
                wait = retry_after(resp.headers)
                resp.close()
                self.sleep(min(wait, self.max_retry_after) if wait is not None
                           else backoff(attempt, self.backoff_base, self.backoff_max))
                continue
            if resp.status_code >= 400:
                content = resp.read()
                resp.close()
                raise error_from_response(resp.status_code, content, self.base_url)
            return resp
        raise ServerUnavailableError(f"cannot reach the hearth server at {self.base_url} after {self.max_retries + 1} "
                                     f"attempts ({type(last).__name__}: {last}): start it with `hearth serve` or "
                                     "point HEARTH_HOST at it") from last

    def _json(self, method: str, path: str, body: Any = None) -> Any:
        resp = self._send(method, path, body)
        try:
            return resp.json()
        except ValueError:
            raise HearthError(f"{self.base_url}{path} answered with non-JSON: {resp.text[:200]!r}") from None

    # -- API -------------------------------------------------------------------------------------------------
    def health(self, timeout: float = 1.0) -> bool:
        try:
            return self.http.get("/health", timeout=timeout).is_success
        except httpx.HTTPError:
            return False

    def models(self) -> list[dict[str, Any]]:
        return list(self._json("GET", "/v1/models").get("data", []))

    def tokenize(self, prompt: str | None = None, messages: list[dict] | None = None,
                 model: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"prompt": prompt} if messages is None else {"messages": messages}
        if model or self.model:
            body["model"] = model or self.model
        return self._json("POST", "/tokenize", body)

    def completions(self, prompt: str, *, model: str | None = None, max_tokens: int | None = 16,
                    stream: bool = False, **params: Any) -> Chunk | Iterator[Chunk]:
        return self._call("/v1/completions", {"prompt": prompt}, model, max_tokens, stream, params)

    def chat(self, messages: list[dict[str, Any]], *, model: str | None = None, max_tokens: int | None = None,
             stream: bool = False, **params: Any) -> Chunk | Iterator[Chunk]:
        return self._call("/v1/chat/completions", {"messages": messages}, model, max_tokens, stream, params)

    def _model(self, model: str | None) -> str:
        if model or self.model:
            return model or self.model  # type: ignore[return-value]
        try:  # the server's first (loaded) model
            self.model = next((m["id"] for m in self.models() if m.get("id")), "default")
        except HearthError:
            self.model = "default"
        return self.model

    def _call(self, path: str, body: dict[str, Any], model: str | None, max_tokens: int | None, stream: bool,
              params: dict[str, Any]) -> Chunk | Iterator[Chunk]:
        body = {"model": self._model(model), **body, **params}
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        self._guard(body, max_tokens)
        if not stream:
            return self._json("POST", path, body)
        return self._stream(path, dict(body, stream=True))

    def _guard(self, body: dict[str, Any], max_tokens: int | None) -> None:
        if not self.check_context:
            return
        try:
            info = self.tokenize(body.get("prompt"), body.get("messages"), body["model"])
        except HearthError as e:
            if getattr(e, "http_status", 0) in (404, 405):  # a server without /tokenize: let it check
                return
            raise
        limit, count = info.get("max_model_len"), int(info.get("count", len(info.get("tokens", []))))
        want = max_tokens or 1
        if limit and count + want > int(limit):
            raise ContextLengthError(count, want, int(limit))

    def _stream(self, path: str, body: dict[str, Any]) -> Iterator[Chunk]:
        resp = self._send("POST", path, body, stream=True)
        got_text = False
        try:
            for chunk in _events(resp):
                got_text = got_text or bool(text_of(chunk))
                yield chunk
            return
        except (httpx.TransportError, httpx.StreamError, _StreamEnded, json.JSONDecodeError) as e:
            if got_text:
                raise StreamInterruptedError(f"the stream from {self.base_url}{path} broke after tokens arrived "
                                             f"({type(e).__name__}: {e}); send the request again") from None
        finally:
            resp.close()
        # broke before the first token: the same request without streaming
        body = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
        yield _as_chunk(self._json("POST", path, body))


def _events(resp: httpx.Response) -> Iterator[Chunk]:
    for line in resp.iter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        chunk = json.loads(data)
        if isinstance(chunk, dict) and "error" in chunk:
            err = chunk["error"]
            raise ServerError(f"{resp.url} failed mid-stream: {err.get('message', err) if isinstance(err, dict) else err}")
        yield chunk
    raise _StreamEnded("the event stream ended without data: [DONE]")


def _as_chunk(full: Chunk) -> Chunk:
    """A non-streaming response in the shape of one stream chunk (marked fallback=True)."""
    choices = []
    for c in full.get("choices", []):
        if "message" in c:
            choices.append({"index": c.get("index", 0), "delta": c["message"], "finish_reason": c.get("finish_reason")})
        else:
            choices.append({"index": c.get("index", 0), "text": c.get("text", ""),
                            "finish_reason": c.get("finish_reason")})
    obj = "chat.completion.chunk" if full.get("object") == "chat.completion" else full.get("object")
    return dict(full, object=obj, choices=choices, fallback=True)
