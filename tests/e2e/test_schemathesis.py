"""Schemathesis against the served /openapi.json: every route's declared request body, positive and negative
examples, no 5xx. /api/pull and /api/delete are left out (network and model store: test_security, test_store)."""
from __future__ import annotations

import os
from collections import deque
import time

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode

from hearthlm.serve.app import create_app
from hearthlm.serve.models import ServeConfig
from hearthlm.serve.openapi import REQUEST_BODIES

from .conftest import start_server

EXCLUDED = {("POST", "/api/pull"), ("DELETE", "/api/delete")}
# a deeper run: HEARTH_SCHEMATHESIS_EXAMPLES=200 HEARTH_SCHEMATHESIS_BUDGET_S=1200
MAX_EXAMPLES = int(os.environ.get("HEARTH_SCHEMATHESIS_EXAMPLES", "15"))
BUDGET_S = float(os.environ.get("HEARTH_SCHEMATHESIS_BUDGET_S", "150"))  # all operations together, on 2 cores
REQUEST_TIMEOUT_S = 45


def flat_routes(routes: list) -> list:
    """app.routes with included routers expanded (FastAPI wraps them)."""
    out = []
    for r in routes:
        sub = getattr(r, "original_router", None)
        out += flat_routes(sub.routes) if sub is not None else [r]
    return out


def test_every_body_route_declares_its_body():
    app = create_app(ServeConfig(preload=False))
    spec = app.openapi()
    routes = {(m, r.path) for r in flat_routes(app.routes) for m in getattr(r, "methods", ()) or ()}
    routes |= {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops}
    body_routes = {(m, p) for m, p in routes if m in ("POST", "PUT", "PATCH", "DELETE")}
    assert body_routes == set(REQUEST_BODIES), "update REQUEST_BODIES in serve/openapi.py"
    for method, path in body_routes:
        body = spec["paths"][path][method.lower()]["requestBody"]
        ref = body["content"]["application/json"]["schema"]["$ref"]
        assert ref.split("/")[-1] in spec["components"]["schemas"]
    assert "$defs" not in str(spec)
    assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


@pytest.fixture(scope="module")
def small_server(tmp_path_factory):
    # a short context bounds every generation (the machine may be shared: a few tokens/s under load)
    p = start_server(tmp_path_factory.mktemp("schemathesis"), "--max-model-len", "64")
    yield p.srv
    p.stop()


def test_no_server_errors(small_server):
    spec = httpx.get(small_server.url + "/openapi.json", timeout=30).json()
    assert spec["paths"]["/v1/chat/completions"]["post"]["requestBody"]
    schema = schemathesis.openapi.from_dict(spec)
    schema.config.output.sanitization.enabled = False  # curl lines with the real max_tokens values
    session = requests.Session()
    failures: list[str] = []
    slow: list[str] = []
    recent: deque[str] = deque(maxlen=6)
    ran = 0
    timings: dict[str, float] = {}
    ops = [r.ok() for r in schema.get_all_operations()]
    ops = [op for op in ops if (op.method.upper(), op.path) not in EXCLUDED]
    for op in ops:
        deadline = time.monotonic() + BUDGET_S / len(ops)  # each operation its share, whatever the load
        has_body = op.method.upper() in ("POST", "PUT", "PATCH", "DELETE")
        for mode in [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if has_body else []):

            @given(case=op.as_strategy(generation_mode=mode))
            @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            def run(case) -> None:
                nonlocal ran
                if time.monotonic() > deadline:
                    return
                try:
                    resp = case.call(base_url=small_server.url, session=session, timeout=REQUEST_TIMEOUT_S)
                except requests.Timeout:  # slow under load; a real hang shows in wait_idle below
                    slow.append(case.as_curl_command(base_url=small_server.url))
                    return
                except requests.RequestException as e:
                    failures.append(f"{type(e).__name__}: {e}\n  {case.as_curl_command(base_url=small_server.url)}")
                    return
                ran += 1
                curl = case.as_curl_command(base_url=small_server.url)
                key = op.label
                timings[key] = timings.get(key, 0.0) + float(resp.elapsed)
                if resp.status_code >= 500:  # server state counts: show the last requests with bodies too
                    before = "\n    ".join(recent)
                    failures.append(f"{resp.status_code} {resp.text[:300]}\n  {curl}\n  after:\n    {before}")
                if has_body:
                    recent.append(curl)

            run()
    print(f"{ran} requests;", ", ".join(f"{k}: {v:.1f}s" for k, v in timings.items()))
    assert len(timings) == len(ops), f"operations never called: {[op.label for op in ops if op.label not in timings]}"
    assert ran > 30, f"only {ran} requests in {BUDGET_S} s"
    if slow:
        print(f"{len(slow)} requests over {REQUEST_TIMEOUT_S} s:\n  " + "\n  ".join(slow))
    assert small_server.get("/health").status_code == 200
    small_server.wait_idle(timeout=2 * REQUEST_TIMEOUT_S)  # timed-out requests were aborted, nothing stuck
    log_tail = "\n".join(small_server.log.read_text(errors="replace").splitlines()[-40:])
    assert not failures, f"{len(failures)} responses were 5xx or hung:\n" + "\n".join(failures) + \
        f"\n--- server log tail ---\n{log_tail}"
