"""huggingface_hub.InferenceClient pointed at `hearth serve` the way its docs show (a base URL, no model name),
and --served-model-name seen through the OpenAI, Ollama and TGI routes of a real server."""
from __future__ import annotations

import re

import httpx
import pytest
from huggingface_hub import InferenceClient

from .conftest import start_server

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.mark.parametrize("how", ["base_url", "model_url"])
def test_chat_completion_without_a_model_name(server, how):
    # the client posts {"model": "dummy"} (older releases "tgi") to /v1/chat/completions: the served model
    client = InferenceClient(base_url=server.url) if how == "base_url" else InferenceClient(server.url)
    out = client.chat_completion(messages=QUESTION, max_tokens=12, temperature=0)
    assert out.model == "smollm2" and "Paris" in out.choices[0].message.content
    assert out.choices[0].finish_reason in ("length", "stop") and out.usage.completion_tokens <= 12
    chunks = list(client.chat_completion(messages=QUESTION, max_tokens=12, temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == out.choices[0].message.content


@pytest.mark.parametrize("name", ["tgi", "dummy", None])
def test_placeholder_model_names_mean_the_served_model(server, name):
    body = {"messages": QUESTION, "max_tokens": 2, **({"model": name} if name else {})}
    r = server.post("/v1/chat/completions", json=body)
    assert r.status_code == 200 and r.json()["model"] == "smollm2"


def test_text_generation_from_a_bare_url(server):
    client = InferenceClient(server.url)
    text = client.text_generation("The capital of France is", max_new_tokens=6)
    assert text.startswith(" Paris")
    assert "".join(client.text_generation("The capital of France is", max_new_tokens=6, stream=True)) == text


def test_text_generation_with_a_grammar(server):
    """TGI's grammar through InferenceClient: json (a schema) and regex, streamed and not, at temperature 1."""
    import json

    client = InferenceClient(server.url)
    schema = {"type": "object", "properties": {"city": {"enum": ["Paris", "Lyon"]}, "people": {"type": "integer",
              "minimum": 0, "maximum": 99}}, "required": ["city", "people"], "additionalProperties": False}
    for seed in range(3):
        text = client.text_generation("The capital of France as JSON:", max_new_tokens=40, do_sample=True,
                                      seed=seed, grammar={"type": "json", "value": schema})
        value = json.loads(text)
        assert value["city"] in ("Paris", "Lyon") and 0 <= value["people"] <= 99, text
    kw = dict(max_new_tokens=12, do_sample=True, seed=1, grammar={"type": "regex", "value": "[A-Z][a-z]{2,8}!"})
    text = client.text_generation("The capital of France is", **kw)
    assert re.fullmatch("[A-Z][a-z]{2,8}!", text), text
    assert "".join(client.text_generation("The capital of France is", stream=True, **kw)) == text


@pytest.fixture(scope="module")
def named(tmp_path_factory):
    p = start_server(tmp_path_factory.mktemp("hearth_named"), "--served-model-name", "my-model", "alias-2")
    yield p.srv
    p.stop()


def test_served_model_name_is_reported_and_accepted(named):
    models = named.get("/v1/models").json()["data"]
    assert models[0]["id"] == "my-model" and "max_model_len" in models[0]
    assert "alias-2" not in [m["id"] for m in models]  # vLLM: the first name is the one reported
    for name in ("my-model", "alias-2", "tgi", None):
        body = {"messages": QUESTION, "max_tokens": 2, **({"model": name} if name else {})}
        r = named.post("/v1/chat/completions", json=body)
        assert r.status_code == 200 and r.json()["model"] == "my-model", (name, r.text)
    r = named.post("/api/chat", json={"model": "alias-2", "messages": QUESTION, "stream": False,
                                      "options": {"num_predict": 2}})
    assert r.status_code == 200 and r.json()["model"] == "my-model"
    assert [m["name"] for m in named.get("/api/ps").json()["models"]] == ["my-model"]
    assert named.get("/api/tags").json()["models"][0]["name"] == "my-model"
    assert named.get("/info").json()["model_id"] == "my-model"
    r = named.post("/v1/chat/completions", json={"model": "no-such-model", "messages": QUESTION, "max_tokens": 2})
    assert r.status_code == 404 and "no-such-model" in r.json()["error"]["message"]
    out = InferenceClient(named.url).chat_completion(messages=QUESTION, max_tokens=2)
    assert out.model == "my-model"
    assert httpx.get(named.url + "/health").status_code == 200
