"""`hearth run`: through a running server, and in-process in a pseudo-terminal (REPL, streaming, /bye)."""
from __future__ import annotations

import os
import select
import subprocess
import sys
import time

import pytest

from tests.client.fake_server import WORDS, FakeServer, unused_port
from tests.conftest import needs_default_model

HEARTH = [sys.executable, "-m", "hearthlm.cli.main"]


@pytest.fixture
def env(tmp_path):
    return dict(os.environ, HEARTH_HOME=str(tmp_path), HEARTH_HOST=f"127.0.0.1:{unused_port()}", TERM="dumb",
                PYTHONUNBUFFERED="1")


def test_run_uses_running_server(env):
    with FakeServer() as server:
        out = subprocess.run([*HEARTH, "run", "Why is the sky blue?", "--max-tokens", "8", "--seed", "3"],
                             env=dict(env, HEARTH_HOST=server.url), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "".join(WORDS) + "\n"
    assert server.paths()[0] == "/health" and "/v1/chat/completions" in server.paths()
    body = next(b for p, b in server.requests if p == "/v1/chat/completions")
    assert body["stream"] and body["max_tokens"] == 8 and body["seed"] == 3
    assert body["messages"] == [{"role": "user", "content": "Why is the sky blue?"}]


class Pty:
    """A child process on a pseudo-terminal; reads are timestamped so streaming can be observed."""

    def __init__(self, argv: list[str], env: dict):
        self.master, slave = os.openpty()
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
        os.close(slave)
        self.reads: list[tuple[float, bytes, bool]] = []  # (time, data, child still running)

    def text(self) -> str:
        return b"".join(d for _, d, _ in self.reads).decode(errors="replace")

    def read_until(self, needle: str, start: int, deadline: float) -> int:
        """Read until `needle` occurs in the output after character `start`; returns its end position."""
        while time.monotonic() < deadline:
            pos = self.text().find(needle, start)
            if pos >= 0:
                return pos + len(needle)
            ready, _, _ = select.select([self.master], [], [], 0.05)
            if ready:
                try:
                    data = os.read(self.master, 4096)
                except OSError:
                    break
                self.reads.append((time.monotonic(), data, self.proc.poll() is None))
        raise AssertionError(f"{needle!r} did not appear; output so far: {self.text()!r}")

    def send(self, line: str) -> None:
        os.write(self.master, line.encode() + b"\n")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)
        os.close(self.master)


@needs_default_model
def test_run_repl_streams_in_a_pty(env):
    deadline = time.monotonic() + 60
    pty = Pty([*HEARTH, "run", "--max-tokens", "16", "--temperature", "0", "--device", "cpu"], env)
    try:
        pos = pty.read_until(">>> ", 0, deadline)
        assert "/bye to quit" in pty.text() and "server" not in pty.text()  # no server: loaded in-process
        pty.send("Why is the sky blue?")
        pos = pty.read_until("Why is the sky blue?", pos, deadline)  # the terminal's echo
        n_before = len(pty.reads)
        end = pty.read_until(">>> ", pos, deadline)  # the reply, then the next prompt
        reply = pty.text()[pos:end - 4].strip()
        reply_reads = [r for r in pty.reads[n_before:] if r[1].strip(b"\r\n> ")]
        assert len(reply.split()) >= 3, reply
        assert len(reply_reads) >= 2, f"the reply came in one piece, not streamed: {pty.reads[n_before:]}"
        assert all(alive for _, _, alive in reply_reads)  # it streamed while the REPL was running
        pty.send("/clear")
        pos = pty.read_until(">>> ", end, deadline)
        pty.send("/bye")
        assert pty.proc.wait(max(1.0, deadline - time.monotonic())) == 0
    finally:
        pty.close()


def test_server_backend_drops_oldest_turns_to_fit(monkeypatch):
    import argparse

    from hearthlm.cli.run_cmd import _server_backend

    args = argparse.Namespace(max_tokens=8, temperature=0.0, top_p=1.0, seed=None)
    with FakeServer() as server:
        server.max_model_len = 19  # /tokenize counts words: 12 + 8 does not fit
        monkeypatch.setenv("HEARTH_HOST", server.url)
        stream = _server_backend(args, "m")
        history = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "one two three four five"},
                   {"role": "assistant", "content": "six seven eight"}, {"role": "user", "content": "nine ten"}]
        assert "".join(stream(history)) == "".join(WORDS)
        sent = [b for p, b in server.requests if p == "/v1/chat/completions"][-1]["messages"]
        assert [m["content"] for m in sent] == ["be brief", "six seven eight", "nine ten"]
        monkeypatch.setenv("HEARTH_HOST", f"127.0.0.1:{unused_port()}")
        assert _server_backend(args, "m") is None
