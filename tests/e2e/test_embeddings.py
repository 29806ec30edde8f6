"""Embeddings over HTTP with the real SDKs: a `hearth serve` of all-MiniLM-L6-v2 on 127.0.0.1 (openai
embeddings.create float and base64, ollama embed and embeddings), concurrent requests, and 400s naming the field."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.e2e.conftest import Server, free_port
from tests.test_embeddings import minilm_dir

NAME = "all-MiniLM-L6-v2"
TEXTS = ["The cat sits on the mat.", "Embeddings power retrieval.", "naïve café 東京 🙂"]


@pytest.fixture(scope="module")
def emb_server(tmp_path_factory, monkeypatch_module):
    """uvicorn in a thread of this process (no second interpreter to start: the suite's time limit)."""
    import uvicorn

    from hearthlm.serve.app import create_app
    from hearthlm.serve.models import ServeConfig

    path = minilm_dir(tmp_path_factory.getbasetemp())
    monkeypatch_module.setenv("HEARTH_HOME", str(tmp_path_factory.mktemp("hearth_home_embed")))
    port = free_port()
    app = create_app(ServeConfig(model=str(path), served_model_name=[NAME], port=port, dtype="float32",
                                 device="cpu", keep_alive_s=None))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    srv = Server(f"http://127.0.0.1:{port}", Path(), Path())
    deadline = time.monotonic() + 60
    while True:
        try:
            if srv.get("/health").status_code == 200 and srv.get("/api/ps").json()["models"]:
                break
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        assert time.monotonic() < deadline and thread.is_alive(), "the embeddings server did not start"
        time.sleep(0.1)
    yield srv
    server.should_exit = True
    thread.join(30)


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_openai_sdk_float_and_base64(emb_server):
    import openai

    client = openai.OpenAI(base_url=emb_server.url + "/v1", api_key="none")
    b64 = client.embeddings.create(model=NAME, input=TEXTS)  # the SDK asks for base64
    flt = client.embeddings.create(model=NAME, input=TEXTS, encoding_format="float")
    a = np.array([d.embedding for d in b64.data])
    b = np.array([d.embedding for d in flt.data])
    assert a.shape == (3, 384) and [d.index for d in flt.data] == [0, 1, 2]
    assert np.array_equal(a.astype(np.float32), b.astype(np.float32))  # same float32 values either way
    assert np.allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)  # the model's Normalize module
    tokens = sum(emb_server.post("/tokenize", json={"prompt": t}).json()["count"] for t in TEXTS)
    assert flt.usage.prompt_tokens == flt.usage.total_tokens == tokens
    ids = emb_server.post("/tokenize", json={"prompt": TEXTS[0]}).json()["tokens"]
    by_ids = client.embeddings.create(model=NAME, input=[ids], encoding_format="float")
    assert np.allclose(by_ids.data[0].embedding, b[0], atol=1e-6)


def test_ollama_sdk_embed(emb_server):
    import ollama
    import openai

    client = ollama.Client(host=emb_server.url)
    r = client.embed(model=NAME, input=TEXTS)
    assert len(r.embeddings) == 3 and r.prompt_eval_count > 0 and r.total_duration > 0
    single = client.embed(model=NAME, input=TEXTS[1])
    legacy = client.embeddings(model=NAME, prompt=TEXTS[1])
    ref = openai.OpenAI(base_url=emb_server.url + "/v1", api_key="none").embeddings.create(
        model=NAME, input=TEXTS[1], encoding_format="float").data[0].embedding
    assert np.allclose(single.embeddings[0], ref, atol=1e-6) and np.allclose(legacy.embedding, ref, atol=1e-6)
    assert np.allclose(r.embeddings[1], ref, atol=1e-5)  # batched with others: same vector
    assert client.embed(model=NAME, input=[]).embeddings == []  # loads the model, as Ollama
    assert client.show(NAME).capabilities == ["embedding"]


def test_concurrent_requests_match_single(emb_server):
    texts = [f"request number {i} " + "word " * (i * 5) for i in range(12)]

    def one(t: str) -> list[float]:
        r = emb_server.post("/v1/embeddings", json={"input": t})
        assert r.status_code == 200, r.text
        return r.json()["data"][0]["embedding"]

    with ThreadPoolExecutor(12) as pool:
        together = list(pool.map(one, texts))
    alone = emb_server.post("/v1/embeddings", json={"input": texts}).json()["data"]
    assert np.allclose(np.array(together), np.array([d["embedding"] for d in alone]), atol=1e-5)


LONG = "word " * 400
BAD = [
    ("/v1/embeddings", {"input": "hi", "bogus": 1}, "bogus"),
    ("/v1/embeddings", {"input": ""}, "input"),
    ("/v1/embeddings", {"input": []}, "input"),
    ("/v1/embeddings", {"input": ["a", ""]}, "input"),
    ("/v1/embeddings", {"input": ["a", 1]}, "input"),
    ("/v1/embeddings", {"input": [[1, 2], []]}, "input"),
    ("/v1/embeddings", {"input": [99999999]}, "input"),
    ("/v1/embeddings", {"input": LONG}, "input"),
    ("/v1/embeddings", {"input": "hi", "dimensions": 64}, "dimensions"),
    ("/v1/embeddings", {"input": "hi", "encoding_format": "int8"}, "encoding_format"),
    ("/v1/embeddings", {"input": "hi", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    ("/api/embed", {"input": "hi", "bogus": 1}, "bogus"),
    ("/api/embed", {"input": ["a", ""]}, "input"),
    ("/api/embed", {"input": LONG, "truncate": False}, "input"),
    ("/api/embed", {"input": "hi", "options": {"nonsense": 1}}, "options.nonsense"),
    ("/api/embed", {"input": "hi", "dimensions": 8}, "dimensions"),
    ("/api/embeddings", {"prompt": "hi", "input": "x"}, "input"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, "model"),
    ("/api/generate", {"prompt": "hi", "stream": False}, "model"),
]


def test_bad_inputs_name_the_field(emb_server):
    for path, body, field in BAD:
        r = emb_server.post(path, json=body)
        assert r.status_code == 400, (path, body, r.text)
        err = r.json()["error"]
        if path.startswith("/v1/"):
            assert err["param"] == field or field in err["message"], (body, err)
        else:
            assert field in err, (body, err)
    ok = emb_server.post("/v1/embeddings", json={"input": LONG, "truncate_prompt_tokens": -1, "user": "u"})
    assert ok.status_code == 200 and ok.json()["usage"]["prompt_tokens"] == 256
    ok = emb_server.post("/api/embed", json={"input": LONG, "options": {"num_ctx": 32, "temperature": 0}})
    assert ok.status_code == 200 and ok.json()["prompt_eval_count"] == 32
    ok = emb_server.post("/v1/embeddings", json={"input": "hi", "dimensions": 384})
    assert ok.status_code == 200
