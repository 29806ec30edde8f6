"""huggingface_hub.InferenceClient (TGI dialect) against `hearth serve`."""
from __future__ import annotations

import httpx
from huggingface_hub import InferenceClient

PROMPT = "The capital of France is"


def test_text_generation(server):
    client = InferenceClient(base_url=server.url)
    text = client.text_generation(PROMPT, max_new_tokens=8)
    assert text.startswith(" Paris")
    out = client.text_generation(PROMPT, max_new_tokens=8, details=True)
    assert out.generated_text == text and out.details.generated_tokens == 8
    assert out.details.finish_reason == "length" and len(out.details.tokens) == 8
    assert "".join(t.text for t in out.details.tokens) == text


def test_text_generation_stream(server):
    client = InferenceClient(base_url=server.url)
    text = client.text_generation(PROMPT, max_new_tokens=8)
    tokens = list(client.text_generation(PROMPT, max_new_tokens=8, stream=True))
    assert "".join(tokens) == text and len(tokens) == 8
    events = list(client.text_generation(PROMPT, max_new_tokens=8, stream=True, details=True, stop=["answer"]))
    assert events[-1].details.finish_reason == "stop_sequence"
    assert events[-1].generated_text == text[:text.index("answer")]
    assert [e.index for e in events] == list(range(len(events)))


def test_generate_route_and_info(server):
    r = server.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 4, "details": True,
                                                                         "return_full_text": True}})
    assert r.status_code == 200 and r.json()["generated_text"].startswith(PROMPT + " Paris")
    info = server.get("/info").json()
    assert info["model_id"] == "smollm2" and info["max_total_tokens"] == 2048
    assert server.get("/health").status_code == 200
    assert httpx.head(server.url + "/").status_code == 200  # Ollama's heartbeat
