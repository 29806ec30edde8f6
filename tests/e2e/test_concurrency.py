"""32 concurrent streaming clients; a client that disconnects mid-stream frees its KV blocks."""
from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx

PROMPTS = [f"Write a short poem about {topic}." for topic in
           ("the sea", "autumn", "a cat", "mountains", "coffee", "the moon", "trains", "rain")]


def stream_chat(url: str, prompt: str, max_tokens: int = 24, **extra) -> str:
    body = {"model": "smollm2", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, **extra}
    text = []
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                text.extend(c["delta"].get("content", "") for c in chunk["choices"])
    return "".join(text)


def test_32_concurrent_streams_match_alone(server):
    distinct = PROMPTS[:4]  # each alone first, one at a time (most of this test's time), then 8 streams of each
    alone = {p: stream_chat(server.url, p) for p in distinct}
    assert len(set(alone.values())) > 1
    work = distinct * 8
    peak = [0.0]
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], server.metric("hearth_num_requests_running"))
            stop.wait(0.1)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(len(work)) as pool:
            results = list(pool.map(lambda p: stream_chat(server.url, p), work))
    finally:
        stop.set()
        watcher.join()
    for prompt, text in zip(work, results):
        assert text == alone[prompt], prompt
    assert peak[0] > 1, "requests were not batched"
    server.wait_idle()


def test_disconnect_mid_stream_frees_blocks(server):
    server.wait_idle()
    aborted_before = _count(server, "499")
    expected = stream_chat(server.url, PROMPTS[0])
    with ThreadPoolExecutor(2) as pool:
        others = [pool.submit(stream_chat, server.url, p, 24) for p in PROMPTS[:2]]
        body = {"model": "smollm2", "prompt": "Count to a thousand: 1, 2, 3,", "max_tokens": 1500,
                "ignore_eos": True, "temperature": 0, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as r:
            lines = 0
            for line in r.iter_lines():
                lines += line.startswith("data: ")
                if lines == 5:
                    break
            assert server.metric("hearth_kv_cache_usage_ratio") > 0
        # the connection is closed here, long before 1,500 tokens
        assert others[0].result() == expected
        others[1].result()
    server.wait_idle(timeout=5)
    assert _count(server, "499") == aborted_before + 1


def test_ollama_disconnect_frees_blocks(server):
    server.wait_idle()
    body = {"model": "smollm2", "prompt": "Count to a thousand.", "options": {"num_predict": 1500, "temperature": 0}}
    with httpx.stream("POST", server.url + "/api/generate", json=body, timeout=120) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i == 3:
                break
    server.wait_idle(timeout=5)


def _count(server, status: str) -> float:
    text = server.get("/metrics").text
    key = f'hearth_requests_total{{dialect="openai",status="{status}"}} '
    return next((float(line.split()[-1]) for line in text.splitlines() if line.startswith(key)), 0.0)


def test_non_streaming_client_timeout_aborts(server):
    server.wait_idle()
    body = {"model": "smollm2", "prompt": "Count to a thousand: 1, 2, 3,", "max_tokens": 1500, "ignore_eos": True}
    try:
        httpx.post(server.url + "/v1/completions", json=body, timeout=1.0)
        raise AssertionError("1,500 tokens in under a second?")
    except httpx.TimeoutException:
        pass
    server.wait_idle(timeout=5)
