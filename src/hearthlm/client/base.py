"""Where the server is (HEARTH_HOST), whether it is up, backoff delays, and errors from HTTP responses."""
from __future__ import annotations

import json
import os
import random
import urllib.request
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlparse

from ..errors import EngineDeadError, HearthError, InvalidRequestError, ModelNotFoundError, QueueFullError

DEFAULT_HOST = "127.0.0.1:11435"
DEFAULT_PORT = 11435
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


class ServerError(HearthError):
    """The server answered with an error the client cannot map more precisely."""

    def __init__(self, message: str, status: int = 500):
        super().__init__(message)
        self.http_status = status


class ServerUnavailableError(HearthError, ConnectionError):
    code = "server_unavailable"


class StreamInterruptedError(HearthError):
    """A stream broke after tokens had arrived (retrying would repeat them)."""

    code = "stream_interrupted"


def server_url(host: str | None = None) -> str:
    """`host` or $HEARTH_HOST ("host:port", "http://host:port", a bare host) as a base URL; 0.0.0.0 -> loopback."""
    raw = (host or os.environ.get("HEARTH_HOST") or DEFAULT_HOST).strip().rstrip("/")
    u = urlparse(raw if "://" in raw else f"http://{raw}")
    name = u.hostname or "127.0.0.1"
    name = "127.0.0.1" if name in ("0.0.0.0", "::") else name
    port = u.port or (DEFAULT_PORT if u.scheme == "http" else None)
    netloc = (f"[{name}]" if ":" in name else name) + (f":{port}" if port else "")
    return f"{u.scheme}://{netloc}{u.path}"


def is_loopback(base_url: str) -> bool:
    return (urlparse(base_url).hostname or "") in ("127.0.0.1", "localhost", "::1")


def server_alive(base_url: str | None = None, timeout: float = 0.5) -> bool:
    """True when GET /health answers 2xx within `timeout` seconds (no retries)."""
    url = server_url(base_url)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({})) if is_loopback(url) \
        else urllib.request.build_opener()
    try:
        with opener.open(f"{url}/health", timeout=timeout) as r:
            return 200 <= r.status < 300
    except (OSError, ValueError):
        return False


def retry_after(headers: Any) -> float | None:
    """Seconds from a Retry-After header (delta-seconds, fractional accepted, or an HTTP date)."""
    value = headers.get("retry-after") if headers is not None else None
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        from datetime import datetime, timezone

        return max(0.0, (parsedate_to_datetime(value) - datetime.now(timezone.utc)).total_seconds())
    except (TypeError, ValueError):
        return None


def backoff(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff with full jitter: uniform(0, min(cap, base * 2**attempt))."""
    return random.uniform(0.0, min(cap, base * 2**attempt))


def error_from_response(status: int, body: bytes, url: str) -> HearthError:
    """Map an error response (OpenAI, Ollama, TGI or FastAPI shape) to a typed error."""
    try:
        data = json.loads(body or b"{}")
    except ValueError:
        data = {"error": body.decode("utf-8", "replace")[:500]}
    err = data.get("error", data.get("detail", data)) if isinstance(data, dict) else data
    message = err.get("message", err) if isinstance(err, dict) else err
    text = f"server at {url} answered HTTP {status}: {message}"
    if status == 404:
        return ModelNotFoundError(text)
    if status == 429:
        return QueueFullError(text + " (retries exhausted: try again later or raise --max-retries)")
    if status == 503:
        return EngineDeadError(text)
    if 400 <= status < 500:
        return InvalidRequestError(text, param=err.get("param") if isinstance(err, dict) else None)
    return ServerError(text, status)
