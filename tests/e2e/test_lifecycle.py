"""Lifecycle: the port answers 503 + Retry-After while the model loads; a busy port fails before loading; SIGTERM
drains (running requests finish, those past --drain-timeout get an error event and [DONE]) and exits 0."""
from __future__ import annotations

import json
import signal
import subprocess
import threading
import time

import httpx
import pytest

from .conftest import free_port, serve_cmd, start_server

CHAT = "/v1/chat/completions"


def _sse(url: str, body: dict, out: dict) -> None:
    """Stream body to url; out gets the data lines and the time each arrived."""
    out["events"] = []
    try:
        with httpx.stream("POST", url + CHAT, json=body, timeout=60) as r:
            out["status"] = r.status_code
            for line in r.iter_lines():
                if line.startswith("data: "):
                    out["events"].append(line[6:])
    except httpx.HTTPError as e:
        out["error"] = repr(e)


def test_busy_port_fails_before_loading(tmp_path):
    port = free_port()
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        t0 = time.monotonic()
        r = subprocess.run(serve_cmd(port), capture_output=True, text=True, timeout=120,
                           env={**__import__("os").environ, "HEARTH_HOME": str(tmp_path)})
    assert r.returncode != 0
    assert "address already in use" in (r.stdout + r.stderr)
    assert "loaded" not in r.stdout + r.stderr, "the model was loaded before the port was bound"
    assert time.monotonic() - t0 < 60


def test_503_while_loading_then_sigterm_drain(tmp_path):
    p = start_server(tmp_path, "--drain-timeout", "3", ready=False)
    try:
        seen: list[tuple[int, str | None]] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert p.proc.poll() is None, p.srv.log.read_text()
            try:
                r = httpx.post(p.srv.url + CHAT, json={"messages": [{"role": "user", "content": "hi"}],
                                                       "max_tokens": 1}, timeout=30)
            except httpx.TransportError:
                time.sleep(0.02)
                continue
            seen.append((r.status_code, r.headers.get("retry-after")))
            if r.status_code == 200:
                break
            assert r.status_code == 503, r.text
            assert "loading" in r.json()["error"]["message"]
            time.sleep(0.02)
        assert seen and seen[-1][0] == 200
        assert any(s == 503 and ra for s, ra in seen), f"no 503 + Retry-After while loading: {seen}"

        # SIGTERM with one short and one long stream running
        short, long_ = {}, {}
        msgs = [{"role": "user", "content": "Count from 1 to 1000."}]
        threads = [threading.Thread(target=_sse, args=(p.srv.url, {"messages": msgs, "max_tokens": 4,
                                                                    "temperature": 0, "stream": True}, short)),
                   threading.Thread(target=_sse, args=(p.srv.url, {"messages": msgs, "max_tokens": 1900,
                                                                    "ignore_eos": True, "temperature": 0,
                                                                    "stream": True}, long_))]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while len(long_.get("events", [])) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(long_.get("events", [])) >= 3, long_
        t_term = time.monotonic()
        p.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(httpx.TransportError):  # no longer accepting
            httpx.post(p.srv.url + CHAT, json={"messages": msgs, "max_tokens": 1}, timeout=5)
        rc = p.proc.wait(30)
        for t in threads:
            t.join(10)
        assert rc == 0, p.srv.log.read_text()
        assert time.monotonic() - t_term < 3 + 10
        assert short["status"] == 200 and short["events"][-1] == "[DONE]", short
        assert json.loads(short["events"][-2])["choices"][0]["finish_reason"] == "length"
        assert long_["status"] == 200 and long_["events"][-1] == "[DONE]", long_["events"][-3:]
        err = json.loads(long_["events"][-2])
        assert "shutting down" in err["error"]["message"], err
        log = p.srv.log.read_text()
        assert "Traceback" not in log, log
    finally:
        p.stop()
