"""Python client for a running `hearth serve`: retries with backoff, stream fallback, context-window guard.

`HearthClient` needs httpx (`pip install hearthlm[serve]`); it is imported on first use so that
`server_alive`/`server_url` work without it.
"""
from typing import Any

from .base import ServerError, ServerUnavailableError, StreamInterruptedError, server_alive, server_url

__all__ = ["HearthClient", "text_of", "server_url", "server_alive", "ServerError", "ServerUnavailableError",
           "StreamInterruptedError"]


def __getattr__(name: str) -> Any:
    if name in ("HearthClient", "text_of"):
        from . import client

        return getattr(client, name)
    raise AttributeError(name)
