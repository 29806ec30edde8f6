"""HearthClient against a fake server on 127.0.0.1: retries, Retry-After, stream fallback, context guard."""
from __future__ import annotations

import time

import pytest

from hearthlm.client import (HearthClient, ServerUnavailableError, StreamInterruptedError, server_alive, server_url,
                             text_of)
from hearthlm.errors import ContextLengthError, EngineDeadError, InvalidRequestError, QueueFullError

from .fake_server import WORDS, FakeServer, unused_port

MSGS = [{"role": "user", "content": "hi there"}]


@pytest.fixture
def server():
    with FakeServer() as s:
        yield s


def client_for(server: FakeServer, **kw) -> tuple[HearthClient, list[float]]:
    c = HearthClient(server.url, timeout=5, backoff_base=0.01, backoff_max=0.05, **kw)
    delays: list[float] = []
    c.sleep = lambda s: (delays.append(s), time.sleep(min(s, 0.05)))
    return c, delays


def test_retries_honour_retry_after_then_succeed(server):
    server.failures = [(503, {"Retry-After": "0"}), (429, {"Retry-After": "1.5"}), (500, {}), (502, {})]
    c, delays = client_for(server)
    out = c.chat(MSGS, max_tokens=8)
    assert text_of(out) == "".join(WORDS)
    assert delays[:2] == [0.0, 1.5] and all(0 <= d <= 0.05 for d in delays[2:]) and len(delays) == 4
    assert server.paths().count("/v1/chat/completions") == 5


def test_retry_after_really_waits(server):
    server.failures = [(503, {"Retry-After": "1"})]
    c = HearthClient(server.url, timeout=5, model="m")
    start = time.monotonic()
    assert text_of(c.completions("a b", max_tokens=4)) == "".join(WORDS)
    assert 1.0 <= time.monotonic() - start < 3.0


def test_retries_are_bounded(server):
    server.failures = [(503, {})] * 10 + [(429, {"Retry-After": "0"})] * 10
    c, delays = client_for(server, max_retries=2)
    with pytest.raises(EngineDeadError, match="503"):
        c.chat(MSGS, model="m")
    assert len(delays) == 2 and server.paths().count("/v1/chat/completions") == 3
    server.failures = [(429, {"Retry-After": "0"})] * 10
    with pytest.raises(QueueFullError, match="429"):
        c.chat(MSGS, model="m")


def test_client_errors_are_not_retried(server):
    c, delays = client_for(server, model="m")
    with pytest.raises(InvalidRequestError, match="max_tokens must be at least 1"):
        c.chat(MSGS, max_tokens=0)
    assert delays == [] and server.paths().count("/v1/chat/completions") == 1


def test_connection_refused_is_bounded():
    c = HearthClient(f"127.0.0.1:{unused_port()}", timeout=1, max_retries=3, backoff_base=0.01, model="m")
    start = time.monotonic()
    with pytest.raises(ServerUnavailableError, match="after 4 attempts.*hearth serve"):
        c.chat(MSGS)
    assert time.monotonic() - start < 3


def test_stream_ok(server):
    server.token_delay = 0.01
    c, _ = client_for(server)
    chunks = list(c.chat(MSGS, stream=True, max_tokens=8))
    assert [text_of(ch) for ch in chunks] == [""] + WORDS
    assert server.requests[-1][1]["stream"] is True and server.requests[-1][1]["model"] == "fake-model"


@pytest.mark.parametrize("mode", ["break_before", "no_done"])
def test_stream_broken_before_first_token_falls_back(server, mode):
    server.stream_mode = mode
    c, _ = client_for(server)
    for call in (lambda: c.chat(MSGS, stream=True, max_tokens=8), lambda: c.completions("x", stream=True)):
        chunks = list(call())
        assert "".join(text_of(ch) for ch in chunks) == "".join(WORDS) and chunks[-1]["fallback"]
        assert "stream" not in server.requests[-1][1]  # the replay is not streamed
    if mode == "break_before":
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_stream_broken_after_tokens_raises(server):
    server.stream_mode = "break_after"
    c, _ = client_for(server, model="m")
    got = []
    with pytest.raises(StreamInterruptedError, match="after tokens arrived"):
        for ch in c.chat(MSGS, stream=True):
            got.append(text_of(ch))
    assert "".join(got) == "".join(WORDS[:2])


def test_context_guard(server):
    c, _ = client_for(server, model="m")
    with pytest.raises(ContextLengthError) as e:
        c.completions(" ".join(["w"] * 30), max_tokens=8)
    assert (e.value.prompt_tokens, e.value.max_tokens, e.value.max_model_len) == (30, 8, 32)
    assert "30 tokens" in str(e.value) and "32" in str(e.value)
    assert "/v1/completions" not in server.paths()
    assert text_of(c.completions(" ".join(["w"] * 24), max_tokens=8)) == "".join(WORDS)
    assert c.tokenize(messages=MSGS) == {"tokens": [0, 1], "count": 2, "max_model_len": 32}
    server.tokenize_status = 404  # a server without /tokenize: the guard steps aside
    assert text_of(c.completions(" ".join(["w"] * 40), max_tokens=8)) == "".join(WORDS)


def test_models_health_and_urls(server, monkeypatch):
    c, _ = client_for(server)
    assert [m["id"] for m in c.models()] == ["fake-model"] and c.health() and server_alive(server.url)
    assert not server_alive(f"127.0.0.1:{unused_port()}", timeout=0.2)
    monkeypatch.setenv("HEARTH_HOST", "0.0.0.0:9999")
    assert server_url() == "http://127.0.0.1:9999"
    monkeypatch.delenv("HEARTH_HOST")
    assert server_url() == "http://127.0.0.1:11435" and server_url("[::1]") == "http://[::1]:11435"
    assert server_url("https://example.org/hearth") == "https://example.org/hearth"
