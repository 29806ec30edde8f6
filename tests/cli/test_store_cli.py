"""`hearth pull/list/show/rm/ps` through subprocesses (HEARTH_HOME in tmp, HEARTH_HOST at an unused port)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.client.fake_server import FakeServer, unused_port
from tests.conftest import default_model_available
from tests.store.fixtures import TEMPLATE, make_tiny_gguf

HEARTH = [sys.executable, "-m", "hearthlm.cli.main"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    home = tmp_path_factory.mktemp("hearth_home")
    return dict(os.environ, HEARTH_HOME=str(home), HEARTH_HOST=f"127.0.0.1:{unused_port()}", PYTHONUNBUFFERED="1")


def hearth(env: dict, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*HEARTH, *args], env=env, capture_output=True, text=True, timeout=timeout)


def many(env: dict, *commands: tuple[str, ...]) -> list[subprocess.CompletedProcess]:
    """Independent commands two at a time (each process spends most of its ~3 s importing torch)."""
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda c: hearth(env, *c), commands))


def test_pull_list_show_rm(env, tmp_path):
    src = make_tiny_gguf(tmp_path / "tiny-chat.Q8_0.gguf")
    pulled, ps, rm_default, show_missing = many(
        env, ("pull", str(src), "--name", "tiny"), ("ps",), ("rm", "smollm2"), ("show", "no-such-model"))
    assert pulled.returncode == 0, pulled.stderr
    assert "pulled tiny" in pulled.stdout
    assert ps.returncode == 0 and "no hearth server is running" in ps.stdout
    assert rm_default.returncode == 1 and rm_default.stderr.startswith("error: ") and "embedded" in rm_default.stderr
    assert show_missing.returncode == 1 and "error: model 'no-such-model' is not in the store" in show_missing.stderr
    assert "hearth pull no-such-model" in show_missing.stderr

    listed, listed_json, shown, template = many(
        env, ("ls",), ("list", "--json"), ("show", "tiny", "--json"), ("show", "tiny", "--template"))
    assert listed.returncode == 0 and listed.stdout.splitlines()[0].split()[:4] == ["NAME", "SIZE", "FORMAT", "QUANT"]
    rows = {line.split()[0]: line.split() for line in listed.stdout.splitlines()[1:]}
    assert rows["tiny"][3:5] == ["gguf", "F32"]  # tiny's GGUF says file_type F32
    if default_model_available():
        assert rows["smollm2"][-1] == "embedded"
    entries = {m["name"]: m for m in json.loads(listed_json.stdout)}
    assert entries["tiny"]["size_bytes"] == src.stat().st_size and entries["tiny"]["modified_at"]
    info = json.loads(shown.stdout)
    assert (info["architecture"], info["context_length"], info["license"], info["format"]) == ("llama", 256, "mit",
                                                                                               "gguf")
    assert info["parameters"] > 0 and info["size_bytes"] == src.stat().st_size and info["path"].endswith(".gguf")
    assert template.stdout.strip() == TEMPLATE

    removed = hearth(env, "rm", "tiny")
    assert removed.returncode == 0 and "deleted 'tiny'" in removed.stdout
    listed, gone = many(env, ("list",), ("rm", "tiny"))
    assert "tiny" not in listed.stdout and gone.returncode == 1 and "error:" in gone.stderr


def test_ps_against_a_server(env):
    with FakeServer() as server:
        out = hearth(dict(env, HEARTH_HOST=server.url), "ps")
    assert out.returncode == 0 and "fake-model" in out.stdout and "0.11 GiB" in out.stdout  # hearth plan's unit


def test_rm_refuses_paths_and_commands_recover_the_store(env, tmp_path):
    from pathlib import Path

    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    models = Path(env["HEARTH_HOME"]) / "models"
    pulled = hearth(env, "pull", str(make_tiny_gguf(tmp_path / "crashy.gguf")))
    assert pulled.returncode == 0, pulled.stderr
    old = models / ".partial" / ".old" / "crashy"  # a re-pull that crashed between its two renames
    old.parent.mkdir(parents=True, exist_ok=True)
    (models / "crashy").rename(old)
    rm_abs, rm_rel = many(env, ("rm", str(victim)), ("rm", "../../" + victim.name))
    for r in (rm_abs, rm_rel):
        assert r.returncode == 1 and "is a path, not a store name" in r.stderr and "hearth rm /" not in r.stderr
    assert (victim / "precious.txt").read_text() == "keep me"
    assert (models / "crashy").is_dir() and not old.exists()  # restored by the first command's recover_store()
    listed = hearth(env, "list")
    assert "crashy" in listed.stdout
    assert hearth(env, "rm", "crashy").returncode == 0
