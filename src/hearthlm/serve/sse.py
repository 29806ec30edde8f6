"""Streaming helpers: SSE and NDJSON framing, and a response that always closes its iterator (-> abort)."""
from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Send

DONE = b"data: [DONE]\n\n"


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def sse(obj: Any) -> bytes:
    return f"data: {dumps(obj)}\n\n".encode()


def ndjson(obj: Any) -> bytes:
    return (dumps(obj) + "\n").encode()


class ClosingStreamingResponse(StreamingResponse):
    """Closes the body iterator however streaming ends (done, client gone, cancelled), so requests get aborted."""

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


def stream_response(body: AsyncIterator[bytes], kind: str = "sse", headers: dict[str, str] | None = None):
    media = "text/event-stream" if kind == "sse" else "application/x-ndjson"
    return ClosingStreamingResponse(body, media_type=media,
                                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})
