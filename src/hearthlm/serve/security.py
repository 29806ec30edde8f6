"""Auth and browser safety for `hearth serve`: one pure-ASGI middleware (streams pass through untouched).

In order: body size (413), Host allow-list against DNS rebinding (403), Origin allow-list and CORS (403 / 204
preflights), API key (401), JSON content type against blind cross-site POSTs (415), admin routes (403)."""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import re
import socket
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from starlette.datastructures import Headers

from ..errors import (BodyTooLargeError, ForbiddenError, HearthError, UnauthorizedError, UnsafeBindError,
                      UnsupportedMediaTypeError)
from .errors import dialect_of, error_response
from .models import ServeConfig

log = logging.getLogger("hearthlm.serve")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# routes that change the model store or the loaded model: a key, or a loopback client that is no browser
ADMIN_ROUTES = frozenset({"/api/pull", "/api/delete", "/api/create", "/api/copy", "/api/push"})
OPEN_ROUTES = frozenset({"/health"})  # no API key needed
BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
LOCAL_ORIGIN_HOSTS = frozenset({"localhost", "127.0.0.1", "::1", "0.0.0.0"})
APP_ORIGIN_SCHEMES = frozenset({"app", "file", "tauri", "vscode-webview", "vscode-file"})  # Ollama's defaults
CORS_METHODS = "GET, POST, PUT, PATCH, DELETE, OPTIONS, HEAD"
CORS_HEADERS = "Authorization, Content-Type, Accept, X-Request-Id"
KEY_HINT = ("send `Authorization: Bearer <key>` (curl -H 'Authorization: Bearer <key>'; openai: api_key=<key>; "
            "ollama: Client(headers={'Authorization': 'Bearer <key>'}); huggingface_hub: token=<key>)")


def _too_large(limit: int) -> BodyTooLargeError:
    return BodyTooLargeError(f"request body is larger than {limit:,} bytes: send less, or start the server with a "
                             f"larger --max-body-size")


# ---------------- hosts and origins ----------------
def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.strip("[]").split("%")[0])
    except ValueError:
        return None


def _host_name(host: str) -> str:
    """Host header value -> host without port, lower case, no trailing dot; '[::1]:8080' -> '::1'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    if host.count(":") == 1:
        host = host.split(":")[0]
    return host.rstrip(".")


def _glob(pattern: str) -> re.Pattern[str]:
    """'https://*.example.com' -> regex; '*' matches within one host or port, never a '/'."""
    return re.compile("".join("[^/@?#\\s]*" if c == "*" else re.escape(c) for c in pattern.lower()) + r"\Z")


def local_names() -> set[str]:
    names = {"localhost"}
    for fn in (socket.gethostname, socket.getfqdn):
        try:
            names.add(fn().lower().rstrip("."))
        except OSError:
            pass
    return {n for n in names if n}


class Policy:
    """What the middleware and require_admin() decide, from ServeConfig."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.keys = [k.encode() for k in cfg.api_keys if k]
        self.hosts_any = "*" in cfg.allowed_hosts
        self.host_names = local_names()
        self.host_patterns = [_glob(_host_name(h)) for h in cfg.allowed_hosts if h != "*"]
        self.origins_any = "*" in cfg.allowed_origins
        self.origin_patterns = [_glob(o.rstrip("/")) for o in cfg.allowed_origins if o != "*"]

    def host_ok(self, host: str | None) -> bool:
        if host is None or self.hosts_any:
            return True
        name = _host_name(host)
        if not name or _ip(name) is not None or name in self.host_names or name.endswith(".localhost"):
            return True
        return any(p.match(name) for p in self.host_patterns)

    def origin_ok(self, origin: str) -> bool:
        if self.origins_any:
            return True
        origin = origin.strip().lower().rstrip("/")
        try:
            parts = urlsplit(origin)
            hostname = parts.hostname or ""
        except ValueError:
            return False
        if parts.scheme in APP_ORIGIN_SCHEMES:
            return True
        if parts.scheme in ("http", "https") and hostname in LOCAL_ORIGIN_HOSTS:
            return True
        return any(p.match(origin) for p in self.origin_patterns)

    def key_ok(self, authorization: str | None) -> bool:
        scheme, _, token = (authorization or "").strip().partition(" ")
        given = token.strip().encode() if scheme.lower() == "bearer" else b""
        ok = False
        for key in self.keys:  # every key, no early exit
            ok |= hmac.compare_digest(given, key)
        return ok and bool(given)

    def check_auth(self, authorization: str | None) -> None:
        if self.keys and not self.key_ok(authorization):
            what = "no API key was sent" if not authorization else "the API key is not valid"
            raise UnauthorizedError(f"{what}: this server requires an API key; {KEY_HINT}")

    def check_admin(self, path: str, client_host: str | None, origin: str | None, authorization: str | None) -> None:
        """Admin actions: a valid key when keys are configured, else a loopback client with no Origin header."""
        if self.keys:
            self.check_auth(authorization)
            return
        ip = _ip(client_host or "")
        if ip is not None and getattr(ip, "ipv4_mapped", None) is not None:
            ip = ip.ipv4_mapped  # type: ignore[union-attr]
        if origin is not None or ip is None or not ip.is_loopback:
            raise ForbiddenError(f"{path} changes the model store or the loaded model: without --api-key only a "
                                 f"client on this machine, not a web page (Origin header), may call it; start the "
                                 f"server with --api-key and {KEY_HINT}")


DISCARD_MAX_BYTES = 64 << 20  # an oversized body is read and dropped up to this, so the client sees the 413
DISCARD_IDLE_S = 1.0  # ... while it keeps arriving


async def _discard_body(receive: Receive) -> None:
    """Read and drop a refused body (bounded in bytes and idle time): a client still sending when the connection
    closes gets a reset instead of the 413, so most of it is drained first."""
    seen = 0
    while seen <= DISCARD_MAX_BYTES:
        try:
            message = await asyncio.wait_for(receive(), DISCARD_IDLE_S)
        except asyncio.TimeoutError:
            return
        if message["type"] != "http.request":
            return
        seen += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


def _media_type(content_type: str) -> str:
    return content_type.split(";")[0].strip().lower()


def _cors_headers(origin: str, request_headers: str | None = None) -> list[tuple[bytes, bytes]]:
    allow = CORS_HEADERS + (f", {request_headers}" if request_headers else "")
    return [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin"),
            (b"access-control-allow-methods", CORS_METHODS.encode()),
            (b"access-control-allow-headers", allow.encode("latin-1")),
            (b"access-control-expose-headers", b"X-Request-Id"), (b"access-control-max-age", b"600")]


class SecurityMiddleware:
    """Pure ASGI: refusals are answered here; accepted requests reach the app with a size-counting receive and,
    for allowed Origins, CORS headers added to the response start."""

    def __init__(self, app: Callable, policy: Policy, on_refuse: Callable[[str, int], None] | None = None):
        self.app, self.policy, self.on_refuse = app, policy, on_refuse

    async def refuse(self, scope: Scope, send: Send, err: HearthError,
                     extra: list[tuple[bytes, bytes]] | None = None) -> None:
        dialect = dialect_of(scope["path"])
        resp = error_response(dialect, err)
        if isinstance(err, UnauthorizedError):
            resp.headers["WWW-Authenticate"] = 'Bearer realm="hearthlm"'
        if isinstance(err, BodyTooLargeError):
            resp.headers["Connection"] = "close"  # the unread body is not worth reading
        for k, v in extra or []:
            resp.headers.append(k.decode(), v.decode("latin-1"))
        if self.on_refuse is not None:
            try:
                self.on_refuse(dialect, err.http_status)
            except Exception:  # noqa: BLE001 - metrics never block a refusal
                pass
        await resp(scope, self._drop_receive, send)

    @staticmethod
    async def _drop_receive() -> Message:
        return {"type": "http.disconnect"}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        pol, limit = self.policy, self.policy.cfg.max_body_size
        headers = Headers(scope=scope)
        method, path = scope["method"], scope["path"]
        # a. body size, before reading anything
        length = headers.get("content-length")
        if length is not None:
            try:
                too_big = int(length) > limit
            except ValueError:
                too_big = False
            if too_big:
                if "100-continue" not in headers.get("expect", "").lower():  # curl waits: nothing to discard
                    await _discard_body(receive)
                await self.refuse(scope, send, _too_large(limit))
                return
        # b. Host (DNS rebinding arrives with a DNS name)
        if not pol.host_ok(headers.get("host")):
            await self.refuse(scope, send, ForbiddenError(
                f"Host {headers.get('host')!r} is not allowed (DNS rebinding protection): use localhost or an IP "
                f"address, or start the server with --allowed-hosts {_host_name(headers['host'])}"))
            return
        # c. Origin (browsers); allowed ones get CORS headers
        origin = headers.get("origin")
        cors: list[tuple[bytes, bytes]] = []
        if origin is not None:
            if not pol.origin_ok(origin):
                await self.refuse(scope, send, ForbiddenError(
                    f"Origin {origin!r} is not allowed: start the server with --allowed-origins {origin} (or env "
                    f"HEARTH_ORIGINS) to let that web page call this API"))
                return
            if method == "OPTIONS" and "access-control-request-method" in headers:
                pre = _cors_headers(origin, headers.get("access-control-request-headers"))
                await send({"type": "http.response.start", "status": 204,
                            "headers": pre + [(b"content-length", b"0")]})
                await send({"type": "http.response.body", "body": b""})
                return
            cors = _cors_headers(origin)
        try:
            # d. API key
            if path not in OPEN_ROUTES:
                pol.check_auth(headers.get("authorization"))
            # e. JSON bodies only: text/plain, form and typeless bodies are what a blind cross-site POST can send
            if method in BODY_METHODS:
                ctype = headers.get("content-type")
                if _media_type(ctype or "") != "application/json":
                    raise UnsupportedMediaTypeError(
                        f"Content-Type must be application/json, got {ctype or 'none'}: send the header "
                        f"'Content-Type: application/json' (curl: -H 'Content-Type: application/json')")
            # f. admin routes
            if path in ADMIN_ROUTES:
                client = scope.get("client")
                pol.check_admin(path, client[0] if client else None, origin, headers.get("authorization"))
        except HearthError as e:
            await self.refuse(scope, send, e, cors)
            return
        await self._forward(scope, receive, send, cors, limit)

    async def _forward(self, scope: Scope, receive: Receive, send: Send, cors: list[tuple[bytes, bytes]],
                       limit: int) -> None:
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _too_large(limit)
            return message

        async def cors_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if cors:
                    message = {**message, "headers": [*message.get("headers", []), *cors]}
            await send(message)

        try:
            await self.app(scope, counting_receive, cors_send)
        except BodyTooLargeError as e:  # read outside a handler (the app's error handlers answer it inside)
            if started:
                raise
            await self.refuse(scope, send, e, cors)


def install_security(app: FastAPI, cfg: ServeConfig) -> None:
    """Add the middleware; app.state.hearth (Server) must exist for refusals to be counted in metrics."""
    policy = Policy(cfg)
    app.state.security = policy

    def count(dialect: str, status: int) -> None:
        app.state.hearth.metrics.requests.labels(dialect, str(status)).inc()

    app.add_middleware(SecurityMiddleware, policy=policy, on_refuse=count)


def require_admin(request: Request) -> None:
    """For handlers whose admin nature depends on the body (Ollama's unload idiom): same rule as ADMIN_ROUTES."""
    policy: Policy = getattr(request.app.state, "security", None) or Policy(request.app.state.hearth.cfg)
    policy.check_admin(request.url.path, request.client.host if request.client else None,
                       request.headers.get("origin"), request.headers.get("authorization"))


# ---------------- bind ----------------
def is_loopback_host(host: str) -> bool:
    if host.strip().lower() in ("localhost", "ip6-localhost"):
        return True
    ip = _ip(host)
    return ip is not None and ip.is_loopback


def check_bind(cfg: ServeConfig) -> None:
    """A non-loopback bind needs --api-key, or --insecure-no-auth to accept an open server knowingly."""
    if is_loopback_host(cfg.host) or cfg.api_keys:
        return
    if cfg.insecure_no_auth:
        log.warning("binding %s without an API key (--insecure-no-auth): anyone who can reach this address can use "
                    "the API and change the model store", cfg.host)
        return
    raise UnsafeBindError(f"refusing to bind {cfg.host} without an API key: anyone on the network could use this "
                          f"server. Pass --api-key KEY (or set HEARTH_API_KEY), bind 127.0.0.1, or pass "
                          f"--insecure-no-auth to run without authentication anyway")
