"""`hearth run` through a running server: the request it sends, no silent truncation, Ctrl-C closes the stream
(the server stops generating) and keeps the session. The in-process session is tested in test_run_repl.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.client.fake_server import WORDS, FakeServer, unused_port

HEARTH = [sys.executable, "-m", "hearthlm.cli.main"]


@pytest.fixture
def env(tmp_path):
    return dict(os.environ, HEARTH_HOME=str(tmp_path), HEARTH_HOST=f"127.0.0.1:{unused_port()}", TERM="dumb",
                PYTHONUNBUFFERED="1")


def test_run_uses_running_server(env):
    with FakeServer() as server:
        out = subprocess.run([*HEARTH, "run", "smollm2", "Why is the sky blue?", "--max-tokens", "8", "--seed", "3"],
                             env=dict(env, HEARTH_HOST=server.url), capture_output=True, text=True, timeout=60,
                             stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "".join(WORDS) + "\n"
    assert server.paths()[0] == "/health" and "/v1/chat/completions" in server.paths()
    body = next(b for p, b in server.requests if p == "/v1/chat/completions")
    assert body["stream"] and body["max_tokens"] == 8 and body["seed"] == 3
    assert body["messages"] == [{"role": "user", "content": "Why is the sky blue?"}]


def test_server_backend_refuses_what_does_not_fit(monkeypatch):
    from hearthlm.cli.repl import Timings
    from hearthlm.cli.run_cmd import ServerBackend
    from hearthlm.errors import ContextLengthError
    from hearthlm.sampling import SamplingParams

    with FakeServer() as server:
        server.max_model_len = 19  # /tokenize counts words: 12 + 8 does not fit
        backend = ServerBackend(server.url, "m")
        history = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "one two three four five"},
                   {"role": "assistant", "content": "six seven eight"}, {"role": "user", "content": "nine ten"}]
        with pytest.raises(ContextLengthError) as e:
            "".join(backend.stream(history, SamplingParams(max_tokens=8), Timings()))
        assert (e.value.prompt_tokens, e.value.max_tokens, e.value.max_model_len) == (12, 8, 19)
        assert "/v1/chat/completions" not in server.paths()  # refused, not truncated and sent
        assert "".join(backend.stream(history[-1:], SamplingParams(max_tokens=8), Timings())) == "".join(WORDS)


class EndlessStream:
    """An OpenAI-dialect server whose chat stream never ends by itself: it records when the client hangs up."""

    def __init__(self) -> None:
        self.sent = 0
        self.hung_up = threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _json(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._json(200, {"status": "ok"} if self.path == "/health" else {"data": [{"id": "endless"}]})

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path != "/v1/chat/completions":
                    return self._json(404, {"detail": "Not Found"})  # no /tokenize: the client skips its check
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()  # HTTP/1.0: the body ends when the connection closes
                chunk = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "tok "}}]}
                try:
                    for _ in range(3000):
                        self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                        self.wfile.flush()
                        owner.sent += 1
                        time.sleep(0.02)
                except OSError:  # the client closed the connection
                    owner.hung_up.set()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_ctrl_c_closes_the_server_stream_and_keeps_the_session(env):
    from tests.cli.test_run_repl import Pty

    server = EndlessStream()
    deadline = time.monotonic() + 30
    pty = Pty([*HEARTH, "run"], dict(env, HEARTH_HOST=server.url), deadline)
    try:
        assert f"Using the hearth server at {server.url}" in pty.expect(">>> ")
        pty.line("hello")
        pty.expect("tok tok tok")
        pty.send("\x03")
        assert pty.expect(">>> ", timeout=5).endswith("\n>>> ")
        assert server.hung_up.wait(5), "the stream was not closed"
        assert server.sent < 1000
        assert pty.proc.poll() is None
        pty.send("\x04")  # Ctrl-D at the prompt: exit 0
        assert pty.proc.wait(max(1.0, deadline - time.monotonic())) == 0
    finally:
        pty.close()
        server.close()


def test_ctrl_c_ends_a_one_shot_answer_with_a_newline_and_130(env):
    from tests.cli.test_run_repl import Pty

    server = EndlessStream()
    pty = Pty([*HEARTH, "run", "--", "hello"], dict(env, HEARTH_HOST=server.url), time.monotonic() + 30)
    try:
        pty.expect("tok tok tok")
        pty.send("\x03")
        assert pty.proc.wait(10) == 130
        assert server.hung_up.wait(5)
        assert pty.drain().endswith("\n"), pty.out[-80:]  # the cut answer ends its line
    finally:
        pty.close()
        server.close()
