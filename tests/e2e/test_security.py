"""Auth and browser safety of `hearth serve`: Host and Origin allow-lists, CORS, JSON-only bodies, body size,
API keys with the real SDKs, admin routes and the non-loopback bind refusal."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from urllib.parse import urlsplit

import httpx
import ollama
import openai
import pytest
from huggingface_hub import InferenceClient

from hearthlm.cli.main import build_parser
from hearthlm.cli.serve_cmd import config_from_args
from hearthlm.serve.models import ServeConfig
from hearthlm.serve.security import ADMIN_ROUTES, ForbiddenError, Policy, UnsafeBindError, check_bind

from .conftest import free_port, start_server

MSGS = [{"role": "user", "content": "hi"}]
CHAT = {"model": "smollm2", "messages": MSGS, "max_tokens": 2}
EVIL = "http://evil.example"
JSON_ROUTES = [("POST", "/v1/chat/completions"), ("POST", "/api/chat"), ("POST", "/generate"),
               ("POST", "/tokenize"), ("DELETE", "/api/delete")]
KEYED_ROUTES = [("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/api/chat"), ("GET", "/api/tags"),
                ("POST", "/generate"), ("GET", "/info"), ("GET", "/metrics"), ("POST", "/tokenize")]


def req(server, method: str, path: str, **kw) -> httpx.Response:
    return httpx.request(method, server.url + path, timeout=60, **kw)


def error_text(path: str, r: httpx.Response) -> str:
    body = r.json()
    return body["error"]["message"] if path.startswith("/v1/") else body["error"]


def no_cors(r: httpx.Response) -> bool:
    return not any(k.lower().startswith("access-control-") for k in r.headers)


def raw_exchange(server, head: bytes, chunks: list[bytes], timeout: float = 10) -> bytes:
    """Send a request head and body chunks on a plain socket, then read until the server closes or replies."""
    u = urlsplit(server.url)
    with socket.create_connection((u.hostname, u.port), timeout=timeout) as s:
        s.sendall(head)
        for c in chunks:
            try:
                s.sendall(c)
            except OSError:  # the server answered and closed before the rest was sent
                break
        data = b""
        while not _complete(data):
            try:
                part = s.recv(65536)
            except ConnectionResetError:
                break
            if not part:
                break
            data += part
        return data


def _complete(data: bytes) -> bool:
    """A whole response with a Content-Length body has arrived."""
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


# ---------------- Host (DNS rebinding) ----------------
@pytest.mark.parametrize("method,path", [("POST", "/v1/chat/completions"), ("DELETE", "/api/delete"),
                                         ("POST", "/api/pull")])
def test_foreign_host_is_403(server, method, path):
    r = req(server, method, path, json={"model": "smollm2"}, headers={"Host": "evil.example"})
    assert r.status_code == 403 and "--allowed-hosts" in error_text(path, r)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.1:8080", "[::1]:11435", "localhost", "LOCALHOST:1",
                                  "app.localhost", "10.1.2.3:80", socket.gethostname()])
def test_ip_and_local_hosts_ok(server, host):
    assert req(server, "GET", "/api/version", headers={"Host": host}).status_code == 200


def test_allowed_hosts_setting():
    p = Policy(ServeConfig(allowed_hosts=["my.box", "*.lan"]))
    assert p.host_ok("my.box:8080") and p.host_ok("a.lan") and not p.host_ok("evil.example")
    assert Policy(ServeConfig(allowed_hosts=["*"])).host_ok("evil.example")


# ---------------- Origin and CORS ----------------
def test_foreign_origin_is_403_without_cors(server):
    r = req(server, "POST", "/v1/chat/completions", json=CHAT, headers={"Origin": EVIL})
    assert r.status_code == 403 and "--allowed-origins" in error_text("/v1/", r) and no_cors(r)
    # the blind cross-site POST a page can send without a preflight
    r = req(server, "POST", "/api/chat", content=b'{"model": "smollm2", "messages": []}',
            headers={"Origin": EVIL, "Content-Type": "text/plain"})
    assert r.status_code == 403 and no_cors(r)
    r = req(server, "OPTIONS", "/v1/chat/completions",
            headers={"Origin": EVIL, "Access-Control-Request-Method": "POST"})
    assert r.status_code == 403 and no_cors(r)
    assert req(server, "GET", "/api/tags", headers={"Origin": "null"}).status_code == 403
    assert 'dialect="ollama",status="403"' in server.get("/metrics").text  # refusals are counted


@pytest.mark.parametrize("origin", ["http://localhost:3000", "https://127.0.0.1", "http://[::1]:8080",
                                    "app://obsidian.md", "vscode-webview://abc"])
def test_local_origin_gets_cors(server, origin):
    r = req(server, "GET", "/v1/models", headers={"Origin": origin})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == origin and "Origin" in r.headers["vary"]
    assert "X-Request-Id" in r.headers["access-control-expose-headers"]
    pre = req(server, "OPTIONS", "/v1/chat/completions",
              headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                       "Access-Control-Request-Headers": "authorization, content-type"})
    assert pre.status_code == 204 and pre.headers["access-control-allow-origin"] == origin
    allowed = pre.headers["access-control-allow-headers"].lower()
    assert "authorization" in allowed and "content-type" in allowed
    assert "POST" in pre.headers["access-control-allow-methods"]


def test_allowed_origins_setting():
    p = Policy(ServeConfig(allowed_origins=["https://*.example.com", "https://app.test"]))
    assert p.origin_ok("https://a.example.com") and p.origin_ok("https://app.test")
    assert not p.origin_ok("https://example.com.evil.org") and not p.origin_ok("http://a.example.com")
    assert not p.origin_ok("null") and Policy(ServeConfig(allowed_origins=["*"])).origin_ok("https://x.y")


# ---------------- Content-Type ----------------
@pytest.mark.parametrize("method,path", JSON_ROUTES)
@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; b=x",
                                   None])
def test_non_json_body_is_415(server, method, path, ctype):
    headers = {"Content-Type": ctype} if ctype else {}
    r = req(server, method, path, content=b'{"model": "smollm2", "messages": [], "inputs": "x"}', headers=headers)
    assert r.status_code == 415 and "Content-Type" in error_text(path, r), r.text


def test_json_with_charset_ok(server):
    r = req(server, "POST", "/tokenize", content=b'{"prompt": "hi"}',
            headers={"Content-Type": "Application/JSON; charset=utf-8"})
    assert r.status_code == 200 and r.json()["count"] > 0


# ---------------- body size ----------------
def test_content_length_over_cap_is_413_fast(server):
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 20000000\r\n\r\n")
    t0 = time.monotonic()
    data = raw_exchange(server, head, [b"{" + b" " * 1000])  # the rest never comes: the server must not wait
    assert data.startswith(b"HTTP/1.1 413"), data[:200]
    assert b"--max-body-size" in data and time.monotonic() - t0 < 3


def test_chunked_body_over_cap_is_413(server):
    head = (b"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    piece = b" " * (1 << 20)
    chunks = [b"1\r\n{\r\n"] + [b"%x\r\n%s\r\n" % (len(piece), piece)] * 6 + [b"0\r\n\r\n"]  # 6 MiB > 4 MiB
    data = raw_exchange(server, head, chunks)
    assert data.startswith(b"HTTP/1.1 413"), data[:200]
    assert server.get("/health").status_code == 200


# ---------------- admin routes ----------------
def test_admin_routes_refuse_browsers_without_key(server):
    assert {"/api/pull", "/api/delete"} <= ADMIN_ROUTES
    r = req(server, "DELETE", "/api/delete", json={"model": "smollm2"}, headers={"Origin": "http://localhost:3000"})
    assert r.status_code == 403 and "--api-key" in r.json()["error"]
    r = req(server, "POST", "/api/generate", json={"model": "smollm2", "keep_alive": 0},
            headers={"Origin": "http://localhost:3000"})  # Ollama's unload idiom
    assert r.status_code == 403
    p = Policy(ServeConfig())
    p.check_admin("/api/pull", "127.0.0.1", None, None)
    p.check_admin("/api/pull", "::ffff:127.0.0.1", None, None)
    with pytest.raises(ForbiddenError, match="--api-key"):
        p.check_admin("/api/pull", "192.168.1.5", None, None)


# ---------------- bind ----------------
def test_check_bind():
    check_bind(ServeConfig(host="127.0.0.1"))
    check_bind(ServeConfig(host="::1"))
    check_bind(ServeConfig(host="0.0.0.0", api_keys=["k"]))
    check_bind(ServeConfig(host="0.0.0.0", insecure_no_auth=True))
    with pytest.raises(UnsafeBindError, match="--api-key.*--insecure-no-auth"):
        check_bind(ServeConfig(host="0.0.0.0"))


def test_public_bind_without_key_exits(tmp_path):
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "hearthlm.cli.main", "serve", "--host", "0.0.0.0", "--port",
                        str(free_port()), "--no-preload"], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "HEARTH_HOME": str(tmp_path), "HEARTH_API_KEY": ""})
    assert p.returncode == 2 and "--api-key" in p.stderr and "--insecure-no-auth" in p.stderr, p.stderr
    assert time.monotonic() - t0 < 30


def test_api_key_flags_parse():
    args = build_parser().parse_args(["serve", "--api-key", "k1", "--api-key", "k2,k3"])
    assert config_from_args(args).api_keys == ["k1", "k2", "k3"]


# ---------------- API keys (one keyed server for this module) ----------------
@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    p = start_server(tmp_path_factory.mktemp("keyed"), env={"HEARTH_API_KEY": "k1,k2"})
    yield p.srv
    p.stop()


def body_for(path: str) -> dict:
    return {"/v1/chat/completions": CHAT, "/api/chat": {"model": "smollm2", "messages": CHAT["messages"], "options": {"num_predict": 2}, "stream": False},
            "/generate": {"inputs": "hi", "parameters": {"max_new_tokens": 2}}, "/tokenize": {"prompt": "hi"}}[path]


@pytest.mark.parametrize("method,path", KEYED_ROUTES)
def test_key_required_on_every_dialect(keyed, method, path):
    kw = {"json": body_for(path)} if method == "POST" else {}
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "k1"}, {"Authorization": "Basic k1"}):
        r = req(keyed, method, path, headers=headers, **kw)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer"), r.text
        assert "Authorization: Bearer" in error_text(path, r)
    for key in ("k1", "k2"):
        r = req(keyed, method, path, headers={"Authorization": f"Bearer {key}"}, **kw)
        assert r.status_code == 200, r.text


def test_health_open_and_preflight_without_key(keyed):
    assert keyed.get("/health").status_code == 200
    pre = req(keyed, "OPTIONS", "/v1/chat/completions",
              headers={"Origin": "http://localhost:5173", "Access-Control-Request-Method": "POST",
                       "Access-Control-Request-Headers": "authorization"})
    assert pre.status_code == 204
    r = req(keyed, "GET", "/v1/models", headers={"Origin": "http://localhost:5173"})
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "http://localhost:5173"


def test_sdks_with_key(keyed):
    for key in ("k1", "k2"):
        oc = openai.OpenAI(base_url=keyed.url + "/v1", api_key=key, max_retries=0, timeout=60)
        assert oc.chat.completions.create(model="smollm2", messages=MSGS, max_tokens=2).choices[0].message
        olc = ollama.Client(host=keyed.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
        assert olc.chat(model="smollm2", messages=MSGS, options={"num_predict": 2}).done
        assert InferenceClient(base_url=keyed.url, token=key).text_generation("hi", max_new_tokens=2) is not None
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=keyed.url + "/v1", api_key="bad", max_retries=0).models.list()
    with pytest.raises(ollama.ResponseError) as e:
        ollama.Client(host=keyed.url, headers={"Authorization": "Bearer bad"}).list()
    assert e.value.status_code == 401


def test_admin_with_key(keyed):
    r = req(keyed, "DELETE", "/api/delete", json={"model": "no-such-model"},
            headers={"Origin": "http://localhost:3000", "Authorization": "Bearer k2"})
    assert r.status_code == 404  # past the admin check: the store answers
    r = req(keyed, "DELETE", "/api/delete", json={"model": "no-such-model"})
    assert r.status_code == 401


def test_httpx_client_sees_the_413_for_a_20mb_body(server):
    """A client that sends the whole body before reading (httpx, requests) gets the 413, not a reset."""
    body = b'{"messages": [{"role": "user", "content": "' + b"x" * (20 << 20) + b'"}]}'
    t0 = time.monotonic()
    r = httpx.post(server.url + "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"},
                   timeout=60)
    assert r.status_code == 413 and "--max-body-size" in r.json()["error"]["message"]
    assert time.monotonic() - t0 < 10
