"""The store is a jail, through a real `hearth serve` (no --allow-local-paths, no --allow-pull-host): names that are
paths are refused with a 4xx, nothing outside the store is deleted, written or shown, and the served model stays
loaded. Victims live in tmp_path; the only network is 127.0.0.1."""
from __future__ import annotations

import os
import re

import httpx
import pytest

from tests.store.fixtures import TEMPLATE, GGUFSite, make_tiny_gguf, make_victim

PATH_NAMES = ["/etc/passwd", "../../../../etc"]


@pytest.fixture
def victim(tmp_path):
    return make_victim(tmp_path)


@pytest.fixture
def stored(server, tmp_path, monkeypatch):
    """A model in the server's store (pulled as the local user would, with the CLI's trust); removed afterwards."""
    from hearthlm.store import pull, remove

    monkeypatch.setenv("HEARTH_HOME", str(server.home))
    d = pull(str(make_tiny_gguf(tmp_path / "jailtest.gguf")))
    yield d
    remove("jailtest")


def _intact(server, victim, stored) -> None:
    assert (victim / "precious.txt").read_text() == "keep me" and (victim / "victim.gguf").is_file()
    assert (victim / "hf" / "config.json").is_file() and stored.is_dir() and server.home.is_dir()
    names = [m["name"] for m in server.get("/api/tags").json()["models"]]
    assert "jailtest" in names and "smollm2" in names


def _loads(server) -> int:
    return len(re.findall(r"\bloaded \S+ from ", server.log.read_text()))


def _is_4xx(r: httpx.Response) -> bool:
    return 400 <= r.status_code < 500


def test_delete_paths_refused(server, victim, stored):
    models = server.home / "models"
    for name in (str(victim), str(victim / "victim.gguf"), os.path.relpath(victim, models), "..", ".", "/",
                 str(models), str(stored)):
        r = httpx.request("DELETE", server.url + "/api/delete", json={"model": name}, timeout=30)
        assert _is_4xx(r), (name, r.status_code, r.text)
        assert "hearth rm /" not in r.text and "hearth rm ." not in r.text
    _intact(server, victim, stored)


def test_pull_percent_encoded_url_refused(server, victim, stored, tmp_path):
    site = GGUFSite(make_tiny_gguf(tmp_path / "served.gguf").read_bytes())
    target = victim / "victim.gguf"
    before = target.read_bytes()
    try:
        for path in ("/" + str(target).replace("/", "%2F") + "?good", "/m/..%2F..%2F..%2F..%2Fvictim.gguf",
                     "/m/new.gguf"):
            r = server.post("/api/pull", json={"model": site.url(path), "stream": False})
            assert _is_4xx(r) and "not allowed" in r.text, (path, r.status_code, r.text)
        r = server.post("/api/pull", json={"model": str(target), "stream": False})  # a local path
        assert _is_4xx(r) and "--allow-local-paths" in r.text
    finally:
        site.close()
    assert site.paths == []  # refused before connecting
    assert target.read_bytes() == before and not (server.home / "models" / "new").exists()
    _intact(server, victim, stored)


def test_show_reveals_nothing_outside_the_store(server, victim, stored, tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf")
    for name in ("/usr", str(victim / "hf"), str(victim / "precious.txt"), str(fake), str(victim / "victim.gguf")):
        r = server.post("/api/show", json={"model": name})
        assert _is_4xx(r), (name, r.status_code, r.text)
        assert TEMPLATE not in r.text and "model_info" not in r.text and "hearth rm" not in r.text
    assert server.post("/api/show", json={"model": "jailtest"}).json()["template"] == TEMPLATE
    _intact(server, victim, stored)


def test_generate_with_path_names_keeps_the_served_model(server):
    before_ps = server.get("/api/ps").json()["models"]
    assert before_ps
    loads = _loads(server)
    msgs = [{"role": "user", "content": "hi"}]
    for name in PATH_NAMES:
        ollama = {"options": {"num_predict": 2}}
        for path, body in (("/api/chat", {"messages": msgs, **ollama}), ("/api/generate", {"prompt": "hi", **ollama}),
                           ("/v1/chat/completions", {"messages": msgs, "max_tokens": 2})):
            r = server.post(path, json={"model": name, "stream": False, **body})
            assert _is_4xx(r), (path, name, r.status_code, r.text)
            assert "--allow-local-paths" in r.text
    after_ps = server.get("/api/ps").json()["models"]
    assert [m["name"] for m in after_ps] == [m["name"] for m in before_ps]
    assert _loads(server) == loads  # nothing was unloaded or loaded
    r = server.post("/api/generate", json={"model": before_ps[0]["name"], "prompt": "hi", "stream": False,
                                           "options": {"num_predict": 2}})
    assert r.status_code == 200 and _loads(server) == loads
