"""The official ollama SDK against `hearth serve`."""
from __future__ import annotations

import time

import ollama
import pytest

from hearthlm.loader import default_model_path

from .conftest import chat_ids

MSGS = [{"role": "user", "content": "Name three colors."}]
GREEDY = {"temperature": 0, "num_predict": 16}


@pytest.fixture(scope="module")
def client(server) -> ollama.Client:
    return ollama.Client(host=server.url, timeout=120)


def test_chat_stream_and_not(client, tokenizer):
    r = client.chat(model="smollm2", messages=MSGS, options=GREEDY)
    assert r.done and r.message.role == "assistant" and r.message.content
    assert r.prompt_eval_count == len(chat_ids(tokenizer, MSGS))
    assert 0 < r.eval_count <= 16 and r.done_reason in ("stop", "length")
    assert r.total_duration >= r.eval_duration > 0 and r.prompt_eval_duration > 0
    parts = list(client.chat(model="smollm2", messages=MSGS, options=GREEDY, stream=True))
    assert len(parts) > 3 and parts[-1].done and not any(p.done for p in parts[:-1])
    assert "".join(p.message.content for p in parts) == r.message.content
    assert parts[-1].eval_count == r.eval_count


def test_generate_stream_and_not(client):
    r = client.generate(model="smollm2", prompt="Why is the sky blue?", options=GREEDY)
    assert r.done and r.response and r.context
    parts = list(client.generate(model="smollm2", prompt="Why is the sky blue?", options=GREEDY, stream=True))
    assert "".join(p.response for p in parts) == r.response and parts[-1].done
    raw = client.generate(model="smollm2", prompt="The capital of France is", raw=True,
                          options={"temperature": 0, "num_predict": 4, "stop": ["."]})
    assert raw.response == " Paris" and raw.done_reason == "stop"


def test_options_seed_and_sampling(client):
    opts = {"temperature": 0.9, "top_k": 30, "top_p": 0.9, "min_p": 0.02, "seed": 42, "num_predict": 12,
            "repeat_penalty": 1.1, "presence_penalty": 0.2, "frequency_penalty": 0.2, "num_ctx": 1024}
    a = client.generate(model="smollm2", prompt="Tell me a story.", options=opts)
    b = client.generate(model="smollm2", prompt="Tell me a story.", options=opts)
    assert a.response == b.response


def test_list_show_ps_version(client, server):
    names = [m.model for m in client.list().models]
    assert "smollm2" in names
    show = client.show("smollm2")
    assert show.details.family == "llama" and show.details.quantization_level
    assert show.modelinfo["llama.context_length"] == 8192 and "im_start" in show.template
    assert show.capabilities == ["completion", "tools"]
    ps = client.ps().models
    assert ps[0].model == "smollm2" and ps[0].context_length == 2048 and ps[0].size > 0
    assert server.get("/api/version").json()["version"]


def test_pull_list_delete_store_model(client, server, monkeypatch):
    src = str(default_model_path())
    with pytest.raises(ollama.ResponseError) as e:  # a local path over HTTP needs --allow-local-paths
        client.pull(src)
    assert e.value.status_code == 400 and "--allow-local-paths" in e.value.error
    monkeypatch.setenv("HEARTH_HOME", str(server.home))
    from hearthlm import store

    store.pull(src)  # what `hearth pull PATH` does on the server's machine
    name = "SmolLM2-135M-Instruct.Q4_1"
    assert name in [m.model for m in client.list().models]
    r = client.chat(model=name, messages=MSGS, options={"temperature": 0, "num_predict": 2})  # swaps models
    assert r.model == name and client.ps().models[0].model == name
    client.delete(name)  # unloads it, then removes it from the store
    assert name not in [m.model for m in client.list().models]
    with pytest.raises(ollama.ResponseError) as e:
        client.delete(name)
    assert e.value.status_code == 404
    assert client.chat(model="smollm2", messages=MSGS, options=GREEDY).done  # the default loads again


def test_keep_alive_expiry_unload_and_reload(client):
    r = client.generate(model="smollm2", prompt="", keep_alive="1s")
    assert r.done_reason == "load" and client.ps().models[0].expires_at is not None
    deadline = time.monotonic() + 10
    while client.ps().models:  # idle past keep_alive: unloaded
        assert time.monotonic() < deadline
        time.sleep(0.2)
    r = client.chat(model="smollm2", messages=MSGS, options=GREEDY, keep_alive=-1)  # loads on first use
    assert r.done and r.load_duration > 0 and client.ps().models[0].model == "smollm2"
    r = client.generate(model="smollm2", prompt="", keep_alive=0)
    assert r.done_reason == "unload" and client.ps().models == []
    r = client.chat(model="smollm2", messages=MSGS, options=GREEDY)
    assert r.done and r.load_duration > 0
    assert client.chat(model="smollm2", messages=MSGS, options=GREEDY).load_duration == 0
