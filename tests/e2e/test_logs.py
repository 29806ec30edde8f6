"""Structured logs: one line per request with its dialect; periodic engine stats."""
from __future__ import annotations

import time


def test_request_and_stats_lines(server):
    rid = server.post("/api/generate", json={"model": "smollm2", "prompt": "Hi", "stream": False,
                                             "options": {"num_predict": 3}}).headers["x-request-id"]
    server.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 3}})
    deadline = time.monotonic() + 10
    while True:
        text = server.log.read_text()
        lines = [line for line in text.splitlines() if "request id=" in line]
        if any("dialect=tgi" in line for line in lines) and "engine running=" in text:
            break
        assert time.monotonic() < deadline, text[-3000:]
        time.sleep(0.2)
    assert all("dialect=" in line for line in lines), "the engine's own request line should be replaced"
    line = next(line for line in lines if f"id={rid} " in line)
    assert "dialect=ollama" in line and "endpoint=/api/generate" in line
    for key in ("status=200", "prompt_tokens=", "completion_tokens=3", "ttft_ms=", "tok_s=", "finish=length"):
        assert key in line
    assert "kv_usage=" in text and "prefix_hit=" in text
