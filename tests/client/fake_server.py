"""A scriptable OpenAI-dialect server on 127.0.0.1 (http.server in a thread) for client and CLI tests."""
from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

WORDS = ["Hello", " from", " the", " fake", " server", "."]


class FakeServer:
    """`failures`: (status, headers) answered first to completion requests; `stream_mode`: ok | break_before |
    break_after | no_done (ends cleanly before any token, without [DONE]); `max_model_len` for /tokenize (which counts words); `requests` logs (path, body)."""

    def __init__(self) -> None:
        self.failures: list[tuple[int, dict[str, str]]] = []
        self.stream_mode = "ok"
        self.max_model_len = 32
        self.tokenize_status = 200
        self.token_delay = 0.0
        self.requests: list[tuple[str, Any]] = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)

    def __enter__(self) -> FakeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def paths(self) -> list[str]:
        return [p for p, _ in self.requests]


def _chunk(path: str, text: str, finish: str | None = None) -> dict[str, Any]:
    if "chat" in path:
        return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text},
                                                                 "finish_reason": finish}]}
    return {"object": "text_completion", "choices": [{"index": 0, "text": text, "finish_reason": finish}]}


def _handler(server: FakeServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def _reply(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            for k, v in {"Content-Type": "application/json", **(headers or {})}.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            server.requests.append((self.path, None))
            if self.path == "/health":
                self._reply(200, {"status": "ok"})
            elif self.path == "/v1/models":
                self._reply(200, {"object": "list", "data": [{"id": "fake-model", "object": "model"}]})
            elif self.path == "/api/ps":
                self._reply(200, {"models": [{"name": "fake-model", "size": 123456789, "size_vram": 0,
                                              "expires_at": "2030-01-01T00:00:00Z"}]})
            else:
                self._reply(404, {"error": {"message": "no route"}})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            server.requests.append((self.path, body))
            if self.path == "/tokenize":
                if server.tokenize_status != 200:
                    return self._reply(server.tokenize_status, {"detail": "Not Found"})
                text = body.get("prompt") or " ".join(m["content"] for m in body.get("messages", []))
                n = len(text.split())
                return self._reply(200, {"tokens": list(range(n)), "count": n, "max_model_len": server.max_model_len})
            if self.path not in ("/v1/chat/completions", "/v1/completions"):
                return self._reply(404, {"error": {"message": "no route"}})
            if server.failures:
                status, headers = server.failures.pop(0)
                return self._reply(status, {"error": {"message": f"try later ({status})"}}, headers)
            if body.get("max_tokens", 1) < 1:
                return self._reply(400, {"error": {"message": "max_tokens must be at least 1", "param": "max_tokens"}})
            if body.get("stream"):
                return self._stream(body)
            text = "".join(WORDS)
            choice = {"index": 0, "finish_reason": "stop"}
            if "chat" in self.path:
                full = {"object": "chat.completion", "choices": [dict(choice, message={"role": "assistant",
                                                                                     "content": text})]}
            else:
                full = {"object": "text_completion", "choices": [dict(choice, text=text)]}
            self._reply(200, dict(full, usage={"prompt_tokens": 3, "completion_tokens": len(WORDS)}))

        def _stream(self, body: dict[str, Any]) -> None:
            mode = server.stream_mode
            events = [_chunk(self.path, "")] if "chat" in self.path else []
            if mode not in ("break_before", "no_done"):
                events += [_chunk(self.path, w) for w in WORDS[: 2 if mode == "break_after" else None]]
            parts = [f"data: {json.dumps(e)}\n\n".encode() for e in events]
            if mode == "ok":
                parts.append(b"data: [DONE]\n\n")
            declared = sum(map(len, parts)) + (0 if mode in ("ok", "no_done") else 4096)
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Content-Length", str(declared))
            self.end_headers()
            for p in parts:
                self.wfile.write(p)
                self.wfile.flush()
                time.sleep(server.token_delay)
            if mode in ("break_before", "break_after"):  # close with the body incomplete
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True

    return Handler


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
