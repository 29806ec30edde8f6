"""HF Hub pulls with huggingface_hub mocked (never the network)."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
from huggingface_hub.hf_api import BlobLfsInfo, RepoSibling

from hearthlm.errors import HearthError, InvalidRequestError, ModelNotFoundError
from hearthlm.store import ChecksumError, pull, resolve_in_store, show_model
from hearthlm.store.hub import choose_files, quant_of
from hearthlm.store.layout import MANIFEST, git_blob_sha1, models_dir

from .fixtures import make_tiny_gguf, make_tiny_hf_dir


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A fake repo: files in a folder; model_info reports their checksums; hf_hub_download copies them."""
    monkeypatch.setenv("HEARTH_HOME", str(tmp_path / "home"))
    repo = tmp_path / "repo"
    repo.mkdir()
    state = SimpleNamespace(repo=repo, calls=[], corrupt=set(), raise_on_info=None)

    def sibling(p: Path) -> RepoSibling:
        sha = hashlib.sha256(p.read_bytes()).hexdigest()
        if p.suffix in (".gguf", ".safetensors"):
            lfs = BlobLfsInfo(size=p.stat().st_size, sha256="0" * 64 if p.name in state.corrupt else sha,
                              pointer_size=130)
            return RepoSibling(p.name, size=p.stat().st_size, blob_id="x", lfs=lfs)
        return RepoSibling(p.name, size=p.stat().st_size, blob_id=git_blob_sha1(p))

    def model_info(self, repo_id, revision=None, files_metadata=False, **kw):
        state.calls.append(("model_info", repo_id, revision, files_metadata))
        if state.raise_on_info:
            raise state.raise_on_info
        return SimpleNamespace(sha="c0ffee" * 6 + "abcd", siblings=[sibling(p) for p in sorted(repo.iterdir())])

    def hf_hub_download(repo_id, filename, revision=None, local_dir=None, tqdm_class=None, **kw):
        state.calls.append(("download", repo_id, filename, revision))
        src, dst = repo / filename, Path(local_dir) / filename
        if tqdm_class is not None:
            bar = tqdm_class(total=src.stat().st_size, initial=0, desc=filename, unit="B", name="hf")
            bar.update(src.stat().st_size)
        shutil.copy(src, dst)
        return str(dst)

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    return state


def test_pull_gguf_by_quant(hub):
    make_tiny_gguf(hub.repo / "tiny-Q4_K_M.gguf")
    make_tiny_gguf(hub.repo / "tiny-Q8_0.gguf")
    (hub.repo / "README.md").write_text("hi")
    progress = []
    d = pull("org/tiny:q8_0", progress_cb=lambda *a: progress.append(a))
    assert [c[2] for c in hub.calls if c[0] == "download"] == ["tiny-Q8_0.gguf"]
    assert progress[-1] == ("tiny-Q8_0.gguf", (hub.repo / "tiny-Q8_0.gguf").stat().st_size,
                            (hub.repo / "tiny-Q8_0.gguf").stat().st_size)
    manifest = json.loads((d / MANIFEST).read_text())
    assert manifest["revision"] == "c0ffee" * 6 + "abcd" and manifest["repo"] == "org/tiny"
    assert resolve_in_store("org/tiny:q8_0") == d / "tiny-Q8_0.gguf"
    assert show_model("org/tiny:q8_0")["architecture"] == "llama"
    # no selector: Q4_K_M is preferred among several
    pull("org/tiny")
    assert resolve_in_store("org/tiny").name == "tiny-Q4_K_M.gguf"


def test_pull_hf_directory_verifies_blob_ids(hub, tmp_path):
    make_tiny_hf_dir(hub.repo)
    (hub.repo / "pytorch_model.bin").write_bytes(b"\0" * 10)
    d = pull("org/tiny-hf", revision="main")
    got = sorted(c[2] for c in hub.calls if c[0] == "download")
    assert got == ["README.md", "config.json", "model.safetensors", "tokenizer_config.json"]
    assert hub.calls[0] == ("model_info", "org/tiny-hf", "main", True)
    assert show_model("org/tiny-hf")["license"] == "apache-2.0" and (d / "config.json").exists()


def test_checksum_mismatch_deletes_file(hub):
    make_tiny_gguf(hub.repo / "bad.Q4_0.gguf")
    hub.corrupt.add("bad.Q4_0.gguf")
    with pytest.raises(ChecksumError, match="deleted.*hearth pull org/bad"):
        pull("org/bad")
    assert resolve_in_store("org/bad") is None
    assert not list((models_dir() / ".partial").rglob("*.gguf"))


def test_hub_errors_are_actionable(hub):
    from huggingface_hub import errors

    hub.raise_on_info = errors.RepositoryNotFoundError.__new__(errors.RepositoryNotFoundError)
    with pytest.raises(ModelNotFoundError, match="not found on the Hugging Face Hub"):
        pull("org/missing")
    hub.raise_on_info = ConnectionError("offline")
    with pytest.raises(HearthError, match="check the network"):
        pull("org/missing")


def test_choose_files():
    names = ["a-Q4_0.gguf", "a-Q5_K_S.gguf", "README.md"]
    assert choose_files(names, "a-Q5_K_S.gguf", "o/a") == ["a-Q5_K_S.gguf"]
    with pytest.raises(InvalidRequestError, match="Q3_K_S, Q5_K_S"):
        choose_files(["a-Q3_K_S.gguf", "a-Q5_K_S.gguf"], None, "o/a")
    assert choose_files(names, None, "o/a") == ["a-Q4_0.gguf"]
    with pytest.raises(ModelNotFoundError, match="no Q2_K"):
        choose_files(names, "Q2_K", "o/a")
    with pytest.raises(HearthError, match=".bin checkpoints"):
        choose_files(["config.json", "pytorch_model.bin"], None, "o/a")
    assert quant_of("qwen2.5-0.5b-instruct-q4_k_m.gguf") == "Q4_K_M" and quant_of("x.f16.gguf") == "F16"
