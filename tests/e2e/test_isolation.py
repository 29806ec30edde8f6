"""No request can abort others: poisoned sampling fields get a 400 naming the field while 8 streams of every
dialect run on, and finish with the same greedy text as alone."""
from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

HEADERS = {"Content-Type": "application/json"}
TOPICS = ("the sea", "autumn", "a cat", "mountains", "coffee", "the moon", "trains", "rain")


def _spec(i: int) -> tuple[str, dict]:
    """The i-th background stream: greedy, ~48 tokens, dialects in turn."""
    text = f"Write a short story about {TOPICS[i % len(TOPICS)]}."
    raw = f"Once upon a time, by {TOPICS[i % len(TOPICS)]}, there lived"
    kind = i % 5
    if kind == 0:
        return "/v1/completions", {"prompt": raw, "max_tokens": 48, "temperature": 0, "stream": True}
    if kind == 1:
        return "/v1/chat/completions", {"messages": [{"role": "user", "content": text}], "max_tokens": 48,
                                        "temperature": 0, "stream": True}
    if kind == 2:
        return "/api/generate", {"prompt": text, "options": {"temperature": 0, "num_predict": 48}}
    if kind == 3:
        return "/api/chat", {"messages": [{"role": "user", "content": text}],
                             "options": {"temperature": 0, "num_predict": 48}}
    return "/generate_stream", {"inputs": raw, "parameters": {"max_new_tokens": 48}}


SPECS = [_spec(i) for i in range(8)]


@dataclass
class StreamResult:
    text: str = ""
    finish: str | None = None
    error: str | None = None
    status: int = 0
    times: list[float] = field(default_factory=list)

    @property
    def max_gap(self) -> float:
        return max((b - a for a, b in zip(self.times, self.times[1:])), default=0.0)


def body_bytes(body: dict) -> bytes:
    """JSON with NaN / Infinity literals and \\ud800-style escapes kept (json.dumps, ensure_ascii)."""
    return json.dumps(body).encode()


def stream(url: str, path: str, body: dict) -> StreamResult:
    """Run one streaming request of any dialect; record its text, finish reason, error and line arrival times."""
    res = StreamResult()
    with httpx.stream("POST", url + path, content=body_bytes(body), headers=HEADERS, timeout=120) as r:
        res.status = r.status_code
        res.times.append(time.monotonic())
        if r.status_code != 200:
            r.read()
            res.error = r.text
            return res
        for line in r.iter_lines():
            res.times.append(time.monotonic())
            if not line.strip() or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:] if line.startswith("data: ") else line)
            if "error" in chunk:
                res.error = json.dumps(chunk)
                continue
            if path.startswith("/v1/"):
                for c in chunk["choices"]:
                    res.text += c.get("text") or (c.get("delta") or {}).get("content") or ""
                    res.finish = c.get("finish_reason") or res.finish
            elif path.startswith("/api/"):
                res.text += chunk.get("response") or (chunk.get("message") or {}).get("content") or ""
                if chunk.get("done"):
                    res.finish = chunk.get("done_reason")
            else:
                res.text += chunk["token"]["text"]
                if chunk.get("details"):
                    res.finish = chunk["details"]["finish_reason"]
    return res


@pytest.fixture(scope="module")
def alone(server) -> list[StreamResult]:
    """Each background stream's output when it runs alone (computed once)."""
    refs = [stream(server.url, p, b) for p, b in SPECS]
    assert all(r.finish and not r.error and r.text for r in refs), [(s[0], r.text, r.finish, r.error)
                                                                    for s, r in zip(SPECS, refs)]
    return refs


class Background:
    """8 streams running at once (run() waits for them); each checked against its alone reference."""

    def __init__(self, url: str, specs=SPECS):
        self.pool = ThreadPoolExecutor(len(specs))
        self.futures = [self.pool.submit(stream, url, p, b) for p, b in specs]

    def results(self) -> list[StreamResult]:
        out = [f.result(timeout=300) for f in self.futures]
        self.pool.shutdown()
        return out


class KeepStreaming:
    """One thread per spec, each running its stream again and again until stop(); stop() returns every
    (spec index, result), the streams in flight included."""

    def __init__(self, url: str, specs=SPECS):
        self.url, self.specs, self.done = url, specs, threading.Event()
        self.results: list[tuple[int, StreamResult]] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(len(specs))]
        for t in self.threads:
            t.start()

    def _run(self, i: int) -> None:
        while not self.done.is_set():
            r = stream(self.url, *self.specs[i])
            with self.lock:
                self.results.append((i, r))

    def stop(self) -> list[tuple[int, StreamResult]]:
        self.done.set()
        for t in self.threads:
            t.join(300)
        return self.results


def assert_same_as_alone(results: list[StreamResult], alone: list[StreamResult]) -> None:
    for r, ref in zip(results, alone):
        assert r.status == 200 and r.error is None and r.finish, r
        assert (r.text, r.finish) == (ref.text, ref.finish)


def wait_running(server, n: int = 4, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while server.metric("hearth_num_requests_running") < n:
        assert time.monotonic() < deadline, "the background streams never started"
        time.sleep(0.05)


RAW_SURROGATE_PROMPT = b'{"prompt": "hello \\ud800 world", "max_tokens": 4}'
RAW_SURROGATE_CHAT = b'{"messages": [{"role": "user", "content": "hi \\ud800"}], "max_tokens": 4}'
RAW_NAN = b'{"prompt": "hi", "max_tokens": 4, "temperature": NaN}'
RAW_INF = b'{"prompt": "hi", "max_tokens": 4, "top_p": -Infinity}'

# (path, body as dict or raw bytes, text the 400 must name)
POISONS = [
    ("/v1/completions", {"prompt": "hi", "max_tokens": 4, "top_k": 10**20}, "top_k"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 4, "top_k": 10**6}, "top_k"),  # > vocab
    ("/v1/completions", {"prompt": "hi", "max_tokens": 4, "stop_token_ids": [10**9], "min_tokens": 2},
     "stop_token_ids"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 4, "stop_token_ids": [-1]}, "stop_token_ids"),
    ("/api/generate", {"prompt": "hi", "stream": False, "options": {"top_k": 10**20, "num_predict": 4}},
     "options.top_k"),
    ("/api/generate", {"prompt": "hi", "stream": False, "options": {"stop": 5, "num_predict": 4}}, "options.stop"),
    ("/api/chat", {"messages": [{"role": "user", "content": "hi"}], "stream": False,
                   "options": {"temperature": "hot"}}, "options.temperature"),
    ("/api/chat", {"messages": [{"role": "user", "content": "hi"}], "stream": False,
                   "options": {"num_predict": 10**30}}, "options.num_predict"),
    ("/api/generate", {"prompt": "hi", "stream": False, "options": {"seed": 2**70}}, "options.seed"),
    ("/api/generate", {"prompt": "hi", "stream": False, "options": {"repeat_penalty": [1]}}, "options.repeat_penalty"),
    ("/api/generate", {"prompt": "hi", "stream": False, "context": [10**20]}, "context"),
    ("/v1/completions", RAW_SURROGATE_PROMPT, "prompt"),
    ("/v1/chat/completions", RAW_SURROGATE_CHAT, "messages[0].content"),
    ("/api/generate", b'{"prompt": "x", "system": "\\udfff", "stream": false}', "system"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 4, "seed": 2**80}, "seed"),
    ("/v1/completions", RAW_NAN, "temperature"),
    ("/v1/completions", RAW_INF, "top_p"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 4, "n": 10**20}, "n"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 4, "logprobs": 10**9}, "logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True,
                              "top_logprobs": 10**9}, "top_logprobs"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 10**20}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 4, "min_tokens": 10**20}, "min_tokens"),
    ("/v1/completions", {"prompt": [10**9, 5], "max_tokens": 4}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 4, "stop": ["x"] * 100}, "stop"),
    ("/generate", {"inputs": "hi", "parameters": {"top_k": 10**20, "max_new_tokens": 4}}, "parameters.top_k"),
    ("/generate", {"inputs": "hi", "parameters": {"top_n_tokens": 10**6, "max_new_tokens": 4}},
     "parameters.top_n_tokens"),
    ("/generate", {"inputs": "hi", "parameters": {"max_new_tokens": 10**20}}, "parameters.max_new_tokens"),
]


def post(server, path: str, body: dict | bytes, timeout: float = 60) -> httpx.Response:
    content = body if isinstance(body, bytes) else body_bytes(body)
    return httpx.post(server.url + path, content=content, headers=HEADERS, timeout=timeout)


def test_poisoned_requests_get_400_and_never_disturb_running_streams(server, alone):
    bg = Background(server.url)
    wait_running(server)
    answers = [(path, expect, post(server, path, body)) for path, body, expect in POISONS]
    assert server.metric("hearth_num_requests_running") > 0, "the streams ended before every poison was sent"
    results = bg.results()
    for path, expect, r in answers:
        assert r.status_code == 400, (path, expect, r.status_code, r.text)
        assert expect in r.text, (path, expect, r.text)
    assert_same_as_alone(results, alone)
    server.wait_idle()


# ---- fuzz: wild values and types in every dialect's sampling fields ----
WILD = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
    st.sampled_from([0, -1, 1, 2, 40, 2**31, 2**63, 2**64, 10**20, 49151, 49152, 49153]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 1e-300, 1e308, -0.0, 0.5, 2.5]),
    st.text(max_size=5), st.sampled_from(["\ud800", "", "nan", "1", "left"]),
    st.lists(st.one_of(st.integers(min_value=-2**40, max_value=2**40), st.text(max_size=3), st.none()),
             max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
# length fields: small and valid, or wild (invalid or over the context: refused at once, never long to run)
LENGTH = st.one_of(st.integers(min_value=1, max_value=3), st.sampled_from([0, -5, 10**20, 2**31, 2.5, "4", None]))
OPENAI = ["temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids", "presence_penalty",
          "frequency_penalty", "repetition_penalty", "min_tokens", "logprobs", "ignore_eos", "n",
          "skip_special_tokens", "include_stop_str_in_output", "truncate"]
OLLAMA = ["temperature", "top_k", "top_p", "min_p", "seed", "stop", "repeat_penalty", "presence_penalty",
          "frequency_penalty", "num_ctx", "truncate"]
TGI = ["temperature", "top_k", "top_p", "do_sample", "seed", "stop", "repetition_penalty", "frequency_penalty",
       "top_n_tokens", "truncate", "best_of", "details"]


@st.composite
def fuzz_request(draw) -> tuple[str, dict]:
    dialect = draw(st.sampled_from(["cmpl", "chat", "ollama", "tgi"]))
    fields = OPENAI if dialect in ("cmpl", "chat") else OLLAMA if dialect == "ollama" else TGI
    chosen = draw(st.lists(st.sampled_from(fields), min_size=1, max_size=4, unique=True))
    values = {k: draw(WILD) for k in chosen}
    if "n" in values and isinstance(values["n"], int) and not isinstance(values["n"], bool) and values["n"] > 2:
        values["n"] = 2  # a valid n over 2 only makes the example slow
    if dialect == "cmpl":
        return "/v1/completions", {"prompt": "Hello", "max_tokens": draw(LENGTH), **values}
    if dialect == "chat":
        return "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello"}],
                                        "max_tokens": draw(LENGTH), **values}
    if dialect == "ollama":
        return draw(st.sampled_from(["/api/generate", "/api/chat"])), {
            "prompt": "Hello", "messages": [{"role": "user", "content": "Hello"}], "stream": False,
            "options": {"num_predict": draw(LENGTH), **values}}
    return "/generate", {"inputs": "Hello", "parameters": {"max_new_tokens": draw(LENGTH), **values}}


def test_fuzzed_sampling_fields_never_give_5xx_or_disturb_streams(server, alone):
    bg = KeepStreaming(server.url)
    wait_running(server)
    failures = []

    @settings(max_examples=120, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(fuzz_request())
    def one(req: tuple[str, dict]) -> None:
        path, body = req
        r = post(server, path, body)
        if r.status_code >= 500 or r.status_code not in (200, 400):
            failures.append((path, body, r.status_code, r.text[:300]))
        assert r.status_code in (200, 400), (path, body, r.status_code, r.text)

    try:
        one()
    finally:
        results = bg.stop()
    assert not failures
    assert len(results) >= len(SPECS)
    for i, r in results:
        assert r.status == 200 and r.error is None and r.finish, (SPECS[i], r)
        assert (r.text, r.finish) == (alone[i].text, alone[i].finish), SPECS[i]
    server.wait_idle()
