"""The store is a jail: names that are paths or escape models/ are refused, server pulls follow a policy (no SSRF),
re-pulls swap atomically and recover_store() repairs an interrupted swap. Network: 127.0.0.1 only."""
from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

import pytest

from hearthlm.errors import InvalidRequestError, ModelNotFoundError
from hearthlm.store import (PullPolicy, find_dir, list_models, pull, recover_store, remove, resolve_in_store,
                            resolve_name, show_model, verify)
from hearthlm.store import netpolicy
from hearthlm.store.layout import models_dir, partial_dir, store_dir

from .fixtures import GGUFSite, make_tiny_gguf, make_victim

BAD_NAMES = ["..", ".", "/", "/root", "../../victim", "org/..", "../x", "a/b/c", "a/../../victim", "-rf", ".hidden",
             "~", "~root", "a\\..\\b", "x:../../y", "", " ", "a" * 300]


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HEARTH_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    return tmp_path / "home"


@pytest.fixture
def victim(tmp_path) -> Path:
    return make_victim(tmp_path)


@pytest.fixture
def stored(tmp_path) -> Path:
    """One model in the store, so that refusals can be checked to leave the store intact."""
    return pull(str(make_tiny_gguf(tmp_path / "keep.gguf")))


@pytest.fixture
def rmtree_calls(monkeypatch) -> list[Path]:
    calls: list[Path] = []
    real = shutil.rmtree

    def record(path, *a, **kw):
        calls.append(Path(path))
        return real(path, *a, **kw)

    monkeypatch.setattr(shutil, "rmtree", record)
    return calls


def _intact(victim: Path, stored: Path) -> None:
    assert (victim / "precious.txt").read_text() == "keep me" and (victim / "victim.gguf").is_file()
    assert (victim / "hf" / "config.json").is_file()
    assert stored.is_dir() and [m.name for m in list_models() if not m.embedded] == ["keep"]


def _inside(calls: list[Path]) -> None:
    root = models_dir().resolve()
    for p in calls:
        assert p.resolve().is_relative_to(root) and p.resolve() != root, p


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_are_refused_everywhere(name, victim, stored, rmtree_calls, monkeypatch):
    monkeypatch.chdir(models_dir())  # relative names would resolve from here, too
    for fn in (remove, find_dir, verify, store_dir, partial_dir):
        with pytest.raises(InvalidRequestError) as e:
            fn(name)
        assert e.value.param == "model" and "hearth rm /" not in str(e.value)
    for fn in (lambda n: show_model(n, allow_local_paths=False), lambda n: resolve_name(n, allow_local_paths=False)):
        with pytest.raises(InvalidRequestError):
            fn(name)
    assert resolve_in_store(name) is None
    _inside(rmtree_calls)
    _intact(victim, stored)


def test_victim_paths_refused(victim, stored, rmtree_calls):
    for name in (str(victim), str(victim / "victim.gguf"), str(victim / "hf"), str(models_dir()),
                 str(models_dir() / ".partial"), str(stored), os.path.relpath(victim, models_dir())):
        with pytest.raises(InvalidRequestError, match="valid|path") as e:
            remove(name)
        assert "hearth rm" not in str(e.value)
        with pytest.raises(InvalidRequestError, match="--allow-local-paths"):
            resolve_name(name, allow_local_paths=False)
        with pytest.raises(InvalidRequestError, match="--allow-local-paths"):
            show_model(name, allow_local_paths=False)
    _inside(rmtree_calls)
    _intact(victim, stored)


def test_store_symlink_out_is_refused(victim, stored, rmtree_calls):
    (models_dir() / "evil").symlink_to(victim, target_is_directory=True)
    with pytest.raises(InvalidRequestError, match="outside the model store"):
        remove("evil")
    with pytest.raises(InvalidRequestError, match="outside the model store"):
        resolve_name("evil", allow_local_paths=False)
    _inside(rmtree_calls)
    _intact(victim, stored)


def test_resolve_name(victim, stored):
    assert resolve_name("keep", allow_local_paths=False) == stored / "keep.gguf"
    with pytest.raises(ModelNotFoundError, match="hearth pull nope"):
        resolve_name("nope", allow_local_paths=False)
    with pytest.raises(ModelNotFoundError, match="hearth pull org/nope:Q4_K_M"):
        resolve_name("org/nope:Q4_K_M", allow_local_paths=False)
    with pytest.raises(InvalidRequestError, match="local paths are not accepted over HTTP"):
        resolve_name("/etc/passwd", allow_local_paths=False)
    with pytest.raises(InvalidRequestError):
        resolve_name("../../../../etc", allow_local_paths=False)
    with pytest.raises(InvalidRequestError):
        resolve_name("http://127.0.0.1:1/x.gguf", allow_local_paths=True)
    # allowed: local .gguf files and HF directories only
    assert resolve_name(str(victim / "victim.gguf"), allow_local_paths=True) == victim / "victim.gguf"
    assert resolve_name(str(victim / "hf"), allow_local_paths=True) == victim / "hf"
    for bad in (victim / "precious.txt", victim):
        with pytest.raises(InvalidRequestError, match="neither"):
            resolve_name(str(bad), allow_local_paths=True)
    with pytest.raises(ModelNotFoundError):
        resolve_name(str(victim / "missing.gguf"), allow_local_paths=True)


def test_show_errors_are_4xx(victim, tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf at all")
    for path in (victim / "precious.txt", fake, victim):
        with pytest.raises(InvalidRequestError):
            show_model(str(path))  # the CLI may name paths; what is not a model is a 400, not a 500
    with pytest.raises(InvalidRequestError, match="--allow-local-paths"):
        show_model(str(victim / "hf"), allow_local_paths=False)
    assert show_model(str(victim / "hf"))["format"] == "safetensors"  # the CLI's trust


# ---- URL pulls and the server's policy ----

@pytest.fixture
def site(tmp_path):
    s = GGUFSite(make_tiny_gguf(tmp_path / "served.gguf").read_bytes())
    yield s
    s.close()


LOCAL = PullPolicy(allow_hosts=("127.0.0.1",))


def test_percent_encoded_names_never_leave_the_store(site, victim, stored, tmp_path):
    target = victim / "victim.gguf"
    before = target.read_bytes()
    encoded = str(target).replace("/", "%2F")
    rel = os.path.relpath(target, models_dir() / ".partial" / "x").replace("/", "%2F")
    for path in (f"/{encoded}?good", f"/m/{encoded}", f"/m/{rel}", "/m/..%2F..%2F..%2Fvictim.gguf",
                 f"/bytes/{encoded}"):
        for policy in (None, LOCAL):  # the CLI refuses them as well
            with pytest.raises(InvalidRequestError, match="plain file name"):
                pull(site.url(path), policy=policy)
        with pytest.raises(InvalidRequestError, match="not allowed"):  # the default server policy: no such host
            pull(site.url(path), policy=PullPolicy())
    assert target.read_bytes() == before and not (tmp_path / "home" / "victim.gguf").exists()
    _intact(victim, stored)


def test_content_disposition_is_reduced_to_a_basename(site, victim, stored, tmp_path):
    d = pull(site.url("/download?id=1"), policy=LOCAL)
    assert d == models_dir() / "evil" and (d / "evil.gguf").is_file()
    assert not (tmp_path / "evil.gguf").exists() and not (tmp_path / "home" / "evil.gguf").exists()
    remove("evil")
    _intact(victim, stored)


def test_server_policy_ssrf(site, monkeypatch):
    url = site.url("/m/served.gguf")
    with pytest.raises(InvalidRequestError, match="host 127.0.0.1 is not allowed"):
        pull(url, policy=PullPolicy())
    assert site.paths == []  # refused before connecting
    d = pull(url, policy=LOCAL)  # the operator allowed this host
    assert (d / "served.gguf").is_file() and site.paths == ["/m/served.gguf"]
    remove("served")
    # a redirect from an allowed host to a host that is not allowed: refused at the hop
    with pytest.raises(InvalidRequestError, match="host 127.0.0.1 is not allowed"):
        pull(site.url(f"/redirect?to={url}", host="localhost"), policy=PullPolicy(allow_hosts=("localhost",)))
    assert resolve_in_store("served") is None
    # file:// and other schemes are never pulled over HTTP
    with pytest.raises(InvalidRequestError, match="file://"):
        pull("file:///etc/passwd.gguf", policy=LOCAL)
    # an allowed host that resolves to a private address is refused unless the operator trusts it
    monkeypatch.setattr(netpolicy.socket, "getaddrinfo",
                        lambda *a, **k: [(2, 1, 6, "", ("10.0.0.7", 443))])
    with pytest.raises(InvalidRequestError, match="10.0.0.7.*private"):
        pull("https://huggingface.co/x.gguf", policy=PullPolicy())
    netpolicy.check_url("https://huggingface.co/x.gguf", PullPolicy(allow_hosts=("huggingface.co",)))


def test_connected_address_is_checked_too(site, monkeypatch):
    """DNS may answer differently at connect time: the peer address is checked after connecting."""
    monkeypatch.setattr(netpolicy, "check_url", lambda url, policy: None)
    with pytest.raises(InvalidRequestError, match="127.0.0.1"):
        pull(site.url("/m/served.gguf"), policy=PullPolicy())
    assert resolve_in_store("served") is None


def test_local_paths_under_policy(victim):
    src = str(victim / "victim.gguf")
    with pytest.raises(InvalidRequestError, match="--allow-local-paths"):
        pull(src, policy=PullPolicy())
    with pytest.raises(InvalidRequestError, match="--allow-local-paths"):
        pull("../../../../etc", policy=PullPolicy())
    assert pull(src, policy=PullPolicy(allow_local_paths=True)) == models_dir() / "victim"
    assert (victim / "victim.gguf").is_file()
    with pytest.raises(InvalidRequestError, match="store name|valid"):
        pull(src, name="../../x")


# ---- atomic re-pull and recovery ----

def test_repull_crash_keeps_the_old_model(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    v1 = make_tiny_gguf(tmp_path / "a" / "t.gguf", name="one")
    v2 = make_tiny_gguf(tmp_path / "b" / "t.gguf", name="two")
    d = pull(str(v1))
    sha1 = hashlib.sha256(v1.read_bytes()).hexdigest()
    real = os.replace

    def crash(src, dst):
        if Path(src) == partial_dir("t") and Path(dst) == store_dir("t"):
            raise OSError("simulated crash between the renames")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        pull(str(v2))
    monkeypatch.setattr(os, "replace", real)
    assert not d.exists()  # the crash left the store between the renames
    done = recover_store()
    assert any("restored" in line for line in done)
    assert hashlib.sha256((d / "t.gguf").read_bytes()).hexdigest() == sha1 and verify("t") == []
    assert [m.name for m in list_models() if not m.embedded] == ["t"]
    assert show_model("t")["architecture"] == "llama" and resolve_in_store("t") == d / "t.gguf"
    # the next re-pull completes and leaves no old copy
    pull(str(v2))
    assert (d / "t.gguf").read_bytes() == v2.read_bytes() and not list((models_dir() / ".partial").rglob("*.gguf"))


def test_old_copy_deleted_when_final_exists(tmp_path):
    d = pull(str(make_tiny_gguf(tmp_path / "t.gguf")))
    old = models_dir() / ".partial" / ".old" / "t"
    shutil.copytree(d, old)
    assert any("deleted the replaced copy" in line for line in recover_store())
    assert not old.exists() and verify("t") == []


def test_stale_partials_cleaned_fresh_kept():
    stale, fresh = partial_dir("stale"), partial_dir("fresh")
    for p in (stale, fresh):
        p.mkdir(parents=True)
        (p / "x.gguf.incomplete").write_bytes(b"GGUF....")
    day_ago = time.time() - 25 * 3600
    for p in (stale / "x.gguf.incomplete", stale):
        os.utime(p, (day_ago, day_ago))
    done = recover_store()
    assert not stale.exists() and (fresh / "x.gguf.incomplete").is_file()
    assert len(done) == 1 and "stale" in done[0]
    assert recover_store(now=time.time() + 25 * 3600) and not fresh.exists()
