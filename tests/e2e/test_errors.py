"""Bad input: each a 4xx in the dialect's error shape; the server stays healthy."""
from __future__ import annotations

import ollama
import openai
import pytest

MSGS = [{"role": "user", "content": "hi"}]
HUGE = "hello " * 3000  # > max_model_len 2048

CASES = [
    # (path, body: bytes | dict, status, words in the message)
    ("/v1/chat/completions", b'{"model": "smollm2", "messages": [', 400, "not valid JSON"),
    ("/v1/chat/completions", {"model": "smollm2", "messages": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
    ("/v1/chat/completions", {"model": "no-such-model", "messages": MSGS}, 404, "no-such-model"),
    ("/v1/chat/completions", {"model": "smollm2", "messages": MSGS, "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/chat/completions", {"model": "smollm2", "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": "smollm2", "messages": [{"role": "wizard", "content": "x"}]}, 400, "wizard"),
    ("/v1/chat/completions", {"model": "smollm2", "messages": MSGS, "temperature": -1}, 400, "temperature"),
    ("/v1/chat/completions", {"model": "smollm2", "messages": MSGS, "n": 0}, 400, "n must"),
    ("/v1/chat/completions", b"[1, 2]", 400, "JSON object"),
    ("/v1/chat/completions", b'{"messages": [], "top_k": 1' + b"0" * 5000 + b"}", 400, "too many digits"),
    ("/api/chat", b'{"messages": [], "options": {"seed": 1' + b"0" * 5000 + b"}}", 400, "too many digits"),
    ("/v1/completions", {"model": "smollm2", "prompt": HUGE, "max_tokens": 16}, 400, "max_model_len is 2,048"),
    ("/v1/completions", {"model": "smollm2", "prompt": "", "max_tokens": 4}, 400, "prompt"),
    ("/v1/chat/completions", {"messages": MSGS, "logit_bias": {"42": 500}}, 400, "logit_bias"),
    ("/v1/chat/completions", {"messages": MSGS, "logit_bias": {"the": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"99999999": 1}}, 400, "logit_bias"),
    ("/v1/chat/completions", {"messages": MSGS, "response_format": {"type": "yaml"}}, 400, "response_format"),
    ("/v1/chat/completions", {"messages": MSGS, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "nonsense"}}}}, 400, "response_format"),
    ("/v1/chat/completions", {"messages": MSGS, "tools": [{"type": "function", "function": {"name": "bad name"}}]},
     400, "tools"),
    ("/v1/chat/completions", {"messages": MSGS, "tool_choice": "required"}, 400, "tool_choice"),
    ("/v1/completions", {"prompt": "x", "best_of": 3}, 400, "best_of"),
    ("/v1/completions", {"model": "smollm2", "prompt": [99999999]}, 400, "vocabulary"),
    ("/v1/completions", {"model": "smollm2", "prompt": "x", "max_tokens": -3, "stream": True}, 400, "max_tokens"),
    ("/v1/nope", {}, 404, "no route"),
    ("/api/chat", b"{not json", 400, "not valid JSON"),
    ("/api/chat", {"model": "smollm2", "messages": [{"role": "user", "content": 5}]}, 400, "content"),
    ("/api/chat", {"model": "smollm2", "messages": MSGS, "options": {"temperature": "hot"}}, 400, "temperature"),
    ("/api/chat", {"model": "no-such-model", "messages": MSGS}, 404, "no-such-model"),
    ("/api/chat", {"model": "smollm2", "messages": MSGS, "options": {"num_predict": 0}}, 400, "num_predict"),
    ("/api/chat", {"model": "smollm2", "messages": MSGS, "options": {"temprature": 0}}, 400, "options.temprature"),
    ("/api/generate", {"model": "smollm2", "prompt": "x", "options": {"mirostat": 2}}, 400, "options.mirostat"),
    ("/api/chat", {"model": "smollm2", "messages": MSGS, "options": {"repeat_penalty": 1.2, "repeat_last_n": 64}},
     400, "options.repeat_last_n"),
    ("/api/chat", {"model": "smollm2", "messages": MSGS, "options": [1]}, 400, "options"),
    ("/generate", {"inputs": "x", "parameters": {"grammar": {"type": "ebnf", "value": "x"}}}, 400,
     "parameters.grammar"),
    ("/generate", {"inputs": "x", "parameters": {"grammar": {"type": "regex", "value": "(("}}}, 400,
     "parameters.grammar"),
    ("/generate", {"inputs": "x", "parameters": {"grammar": {"type": "json", "value": "{no"}}}, 400,
     "parameters.grammar"),
    ("/generate", {"inputs": "x", "parameters": {"typical_p": 0.5}}, 400, "parameters.typical_p"),
    ("/generate", {"inputs": "x", "parameters": {"max_new_token": 5}}, 400, "parameters.max_new_token"),
    ("/api/chat", {"model": "smollm2", "messages": []}, 400, "messages"),
    ("/api/chat", {"model": "smollm2", "messages": [{"role": "wizard", "content": "x"}]}, 400, "wizard"),
    ("/api/generate", {"model": "smollm2", "prompt": HUGE, "options": {"num_predict": 16}}, 400, "max_model_len"),
    ("/api/generate", {"model": "smollm2", "prompt": "hi", "keep_alive": "soon"}, 400, "keep_alive"),
    ("/api/generate", b'{"model": "smollm2", "prompt": "hi", "keep_alive": NaN}', 400, "keep_alive"),
    ("/api/show", {"model": "no-such-model"}, 404, "no-such-model"),
    ("/generate", b"{", 400, "not valid JSON"),
    ("/generate", {"inputs": 5}, 400, "inputs"),
    ("/generate", {"inputs": "hi", "parameters": {"max_new_tokens": 0}}, 400, "max_new_tokens"),
    ("/generate_stream", {"inputs": HUGE, "parameters": {"max_new_tokens": 8}}, 400, "max_model_len"),
    ("/generate", {"parameters": {}}, 400, "inputs"),
    ("/tokenize", {"prompt": "x", "messages": MSGS}, 400, "exactly one"),
]


def _message(path: str, body: dict) -> str:
    if path.startswith("/v1/"):
        err = body["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert err["type"] in ("invalid_request_error", "not_found_error")
        return err["message"]
    assert isinstance(body["error"], str)
    return body["error"]


@pytest.mark.parametrize("path,body,status,words", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_bad_input(server, path, body, status, words):
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body}
    r = server.post(path, **kw)
    assert r.status_code == status, r.text
    assert words in _message(path, r.json()), r.text


def test_oversized_names_token_counts(server):
    r = server.post("/v1/completions", json={"model": "smollm2", "prompt": HUGE, "max_tokens": 16})
    msg = r.json()["error"]["message"]
    assert "prompt is 3,00" in msg and "max_tokens is 16" in msg and r.json()["error"]["code"] == \
        "context_length_exceeded"


def test_sdk_errors(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=MSGS)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="smollm2", prompt="x", max_tokens=0)
    with pytest.raises(ollama.ResponseError) as e:
        ollama.Client(host=server.url).chat(model="smollm2", messages=[{"role": "wizard", "content": "x"}])
    assert e.value.status_code == 400 and "wizard" in e.value.error


def test_server_healthy_after_bad_input(server):
    assert server.get("/health").status_code == 200
    r = server.post("/v1/completions", json={"model": "smollm2", "prompt": "The capital of France is",
                                             "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["text"].startswith(" Paris")
    server.wait_idle()
    assert 'dialect="ollama",status="400"' in server.get("/metrics").text


def test_queue_full_is_429_with_retry_after():
    import json

    from hearthlm.errors import QueueFullError
    from hearthlm.serve.errors import error_response

    err = QueueFullError("server busy")
    err.retry_after = 2
    for dialect in ("openai", "ollama", "tgi"):
        r = error_response(dialect, err)
        assert r.status_code == 429 and r.headers["retry-after"] == "2"
    body = json.loads(error_response("openai", err).body)
    assert body["error"]["type"] == "rate_limit_error" and body["error"]["code"] == "queue_full"


def test_huge_keep_alive_is_forever(server):
    """keep_alive past a century means never unload; /api/ps must still render it (was a 500)."""
    for value in (1e16, "99999999h", 10 ** 12):
        r = server.post("/api/generate", json={"model": "smollm2", "keep_alive": value})
        assert r.status_code == 200 and r.json()["done_reason"] == "load", r.text
        ps = server.get("/api/ps")
        assert ps.status_code == 200 and ps.json()["models"], ps.text
