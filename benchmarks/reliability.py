"""RELIABILITY.md tables: bad inputs, a 200-stream load, injected faults and 5xx counts, for `hearth serve` and
llama.cpp's `llama-server` side by side on the same GGUF and machine (loopback only, bounded).

    python benchmarks/reliability.py --llama-server PATH/TO/llama-server [--model FILE.gguf] > table.md

Each server runs with its defaults apart from the port and a context of 2,048 tokens per sequence (llama-server:
16 slots). Every probe is sent while 8 greedy streams run; a probe passes for a server when it gets a 4xx (or the
row's expected answer) and all 8 streams still finish.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

CHAT = "/v1/chat/completions"
MSG = [{"role": "user", "content": "Write a short poem about the sea."}]


@dataclass
class Target:
    name: str
    cmd: list[str]
    port: int
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen | None = None
    fivexx: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                r = httpx.post(self.url + CHAT, json={"messages": MSG, "max_tokens": 1}, timeout=30)
                if r.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.3)
        raise RuntimeError(f"{self.name} did not start")

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.terminate()
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- streams
async def stream(client: httpx.AsyncClient, t: Target, body: dict, stop_after: int | None = None) -> dict:
    """One streaming chat request: status, finish_reason, TTFT, chunk gaps."""
    res: dict = {"status": None, "finish": None, "ttft": None, "gaps": [], "done": False}
    t0 = last = time.monotonic()
    try:
        async with client.stream("POST", t.url + CHAT, json={**body, "stream": True}, timeout=300) as r:
            res["status"] = r.status_code
            if r.status_code >= 500:
                t.fivexx += 1
            n = 0
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                now = time.monotonic()
                res["gaps"].append(now - last)
                last = now
                data = line[6:]
                if data == "[DONE]":
                    res["done"] = True
                    break
                obj = json.loads(data)
                if "error" in obj:
                    res["error"] = obj["error"]
                for c in obj.get("choices") or []:
                    res["finish"] = c.get("finish_reason") or res["finish"]
                    if res["ttft"] is None and (c.get("delta") or {}).get("content"):
                        res["ttft"] = now - t0  # the first text, not the role-only first chunk
                n += 1
                if stop_after is not None and n >= stop_after:
                    return res  # leaves the stream: a client disconnect
    except httpx.HTTPError as e:
        res["error"] = repr(e)
    return res


def ok(res: dict) -> bool:
    return res["status"] == 200 and res["finish"] is not None and res.get("error") is None


async def background(client: httpx.AsyncClient, t: Target, n: int = 8, tokens: int = 64) -> list[asyncio.Task]:
    return [asyncio.create_task(stream(client, t, {"messages": [{"role": "user", "content": f"Story {i}:"}],
                                                   "max_tokens": tokens, "temperature": 0})) for i in range(n)]


# ---------------------------------------------------------------- bad inputs
def bad_inputs() -> list[tuple[str, dict, bytes]]:
    j = {"content-type": "application/json"}

    def body(**kw) -> bytes:
        return json.dumps({"messages": MSG, "max_tokens": 8, **kw}).encode()

    return [
        ("malformed JSON", j, b'{"messages": ['),
        ("invalid UTF-8", j, b'{"messages": [{"role": "user", "content": "\xff\xfe"}], "max_tokens": 4}'),
        ("lone surrogate \\ud800", j, b'{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 4}'),
        ("temperature NaN", j, b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'),
        ("top_k 10**20", j, body(top_k=10 ** 20)),
        ("stop_token_ids [10**9], min_tokens 2", j, body(stop_token_ids=[10 ** 9], min_tokens=2)),
        ("logprobs true, top_logprobs 10**9", j, body(logprobs=True, top_logprobs=10 ** 9)),
        ("seed 2**80", j, body(seed=2 ** 80)),
        ("max_tokens -3", j, body(max_tokens=-3)),
        ("n 0", j, body(n=0)),
        ("messages not a list", j, json.dumps({"messages": "hi"}).encode()),
        ("image content part", j, json.dumps({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}).encode()),
        ("prompt over the context", j, json.dumps({"messages": [{"role": "user", "content": "hello " * 6000}],
                                                   "max_tokens": 8}).encode()),
        ("model '/etc/passwd'", j, body(model="/etc/passwd")),
        ("Content-Type text/plain (blind cross-site POST)", {"content-type": "text/plain"}, body()),
        ("Host: evil.example (DNS rebinding)", {**j, "host": "evil.example"}, body()),
        ("Origin: http://evil.example", {**j, "origin": "http://evil.example"}, body()),
    ]


async def probe_bad_inputs(t: Target) -> dict[str, str]:
    out: dict[str, str] = {}
    async with httpx.AsyncClient(timeout=300) as client:
        bg = await background(client, t)
        await asyncio.sleep(0.5)
        for label, headers, payload in bad_inputs():
            try:
                r = await client.post(t.url + CHAT, content=payload, headers=headers)
                out[label] = str(r.status_code)
                t.fivexx += r.status_code >= 500
            except httpx.HTTPError as e:
                out[label] = type(e).__name__
        res = await asyncio.gather(*bg)
    out["8 streams beside them finished"] = f"{sum(map(ok, res))}/8"
    return out


# ---------------------------------------------------------------- load and faults
async def probe_load(t: Target, n: int = 200, tokens: int = 32) -> dict[str, str]:
    limits = httpx.Limits(max_connections=n + 10, max_keepalive_connections=n + 10)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.monotonic()
        res = await asyncio.gather(*[stream(client, t, {"messages": [{"role": "user", "content": f"Fact #{i}:"}],
                                                        "max_tokens": tokens, "temperature": 0})
                                     for i in range(n)])
        wall = time.monotonic() - t0
    done = sum(map(ok, res))
    ttfts = sorted(r["ttft"] for r in res if r["ttft"] is not None)
    p = (lambda q: ttfts[min(len(ttfts) - 1, int(q * len(ttfts)))] if ttfts else float("nan"))
    return {"completed": f"{done}/{n}", "lost": str(n - done), "TTFT p50 (s)": f"{p(0.5):.2f}",
            "TTFT p99 (s)": f"{p(0.99):.2f}", "wall (s)": f"{wall:.1f}"}


async def busy(client: httpx.AsyncClient, t: Target) -> bool | None:
    """Whether the server still holds requests (hearth: /metrics; llama-server: /slots)."""
    try:
        if t.name == "hearthlm":
            text = (await client.get(t.url + "/metrics")).text
            vals = [float(line.split()[-1]) for line in text.splitlines()
                    if line.startswith(("hearth_num_requests_running ", "hearth_kv_cache_usage_ratio "))]
            return any(vals)
        slots = (await client.get(t.url + "/slots")).json()
        return any(s.get("is_processing") for s in slots)
    except (httpx.HTTPError, ValueError):
        return None


async def probe_disconnects(t: Target, n: int = 50) -> str:
    async with httpx.AsyncClient(timeout=120) as client:
        await asyncio.gather(*[stream(client, t, {"messages": [{"role": "user", "content": f"Essay {i}"}],
                                                  "max_tokens": 400, "temperature": 0}, stop_after=2)
                               for i in range(n)])
        t0 = time.monotonic()
        while time.monotonic() - t0 < 30:
            b = await busy(client, t)
            if b is False:
                after = await stream(client, t, {"messages": MSG, "max_tokens": 4, "temperature": 0})
                return f"freed in {time.monotonic() - t0:.1f}s, next request {'ok' if ok(after) else 'FAILED'}"
            if b is None:
                return "no way to observe"
            await asyncio.sleep(0.1)
    return "still busy after 30s"


async def probe_big_body(t: Target, mb: int = 20) -> str:
    async with httpx.AsyncClient(timeout=300) as client:
        bg = await background(client, t, tokens=96)
        await asyncio.sleep(1.0)
        big = json.dumps({"messages": [{"role": "user", "content": "hello " * (mb * 1024 * 1024 // 6)}],
                          "max_tokens": 4}).encode()
        t0 = time.monotonic()
        try:
            r = await client.post(t.url + CHAT, content=big, headers={"content-type": "application/json"})
            status = str(r.status_code)
            t.fivexx += r.status_code >= 500
        except httpx.HTTPError as e:
            status = type(e).__name__
        took = time.monotonic() - t0
        res = await asyncio.gather(*bg)
    gap = max((g for r in res for g in r["gaps"][1:]), default=float("nan"))
    return f"{status} in {took:.1f}s; 8 streams {sum(map(ok, res))}/8, longest chunk gap {gap:.2f}s"


async def probe_poison(t: Target) -> str:
    """Out-of-range sampling values beside 8 streams (the values a batch shares)."""
    bodies = [{"top_k": 10 ** 20}, {"stop_token_ids": [10 ** 9], "min_tokens": 2}, {"top_p": 0}, {"min_p": 5},
              {"repetition_penalty": -1}, {"logit_bias": {"99999999": 100}}]
    async with httpx.AsyncClient(timeout=300) as client:
        bg = await background(client, t)
        await asyncio.sleep(0.5)
        codes = []
        for b in bodies:
            r = await client.post(t.url + CHAT, json={"messages": MSG, "max_tokens": 8, **b})
            codes.append(r.status_code)
            t.fivexx += r.status_code >= 500
        res = await asyncio.gather(*bg)
    return f"answers {', '.join(map(str, codes))}; 8 streams {sum(map(ok, res))}/8"


def probe_sigterm(t: Target) -> str:
    async def run() -> str:
        async with httpx.AsyncClient(timeout=120) as client:
            task = asyncio.create_task(stream(client, t, {"messages": MSG, "max_tokens": 1500, "ignore_eos": True,
                                                          "temperature": 0}))
            await asyncio.sleep(2.0)
            t.proc.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            res = await task
            return f"stream {'ended with [DONE]' if res['done'] else 'cut'}" + \
                (" after an error event" if res.get("error") else "") + f" ({time.monotonic() - t0:.1f}s)"
    desc = asyncio.run(run())
    try:
        rc = t.proc.wait(60)
    except subprocess.TimeoutExpired:
        t.proc.kill()
        rc = "hung"
    tracebacks = t.log.read_text(errors="replace").count("Traceback")
    return f"{desc}; exit {rc}; {tracebacks} tracebacks in the log"


# ---------------------------------------------------------------- main
def table(rows: dict[str, dict[str, str]], names: list[str], head: str) -> str:
    lines = [f"| {head} | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    keys = list(dict.fromkeys(k for n in names for k in rows.get(n, {})))
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(rows.get(n, {}).get(k, "n/a") for n in names) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-server", help="path to llama.cpp's llama-server binary (omit: hearthlm only)")
    ap.add_argument("--model", help="GGUF file (default: the embedded SmolLM2-135M-Instruct Q4_1)")
    args = ap.parse_args()
    from hearthlm.loader import default_model_path

    model = args.model or str(default_model_path())
    tmp = Path(tempfile.mkdtemp(prefix="reliability-"))
    env = {**os.environ, "HEARTH_HOME": str(tmp / "home"), "HF_HUB_OFFLINE": "1"}
    targets = []
    p = free_port()
    targets.append(Target("hearthlm", [sys.executable, "-m", "hearthlm.cli.main", "serve", model, "--port", str(p),
                                       "--max-model-len", "2048", "--quiet"], p, env, tmp / "hearth.log"))
    if args.llama_server:
        p = free_port()
        targets.append(Target("llama-server", [args.llama_server, "-m", model, "--port", str(p), "--host",
                                               "127.0.0.1", "-c", str(2048 * 16), "-np", "16"],
                              p, env, tmp / "llama.log"))
    bad: dict[str, dict[str, str]] = {}
    load: dict[str, dict[str, str]] = {}
    faults: dict[str, dict[str, str]] = {}
    for t in targets:
        print(f"# {t.name}: starting", file=sys.stderr)
        t.start()
        try:
            bad[t.name] = asyncio.run(probe_bad_inputs(t))
            print(f"# {t.name}: bad inputs done", file=sys.stderr)
            load[t.name] = asyncio.run(probe_load(t))
            print(f"# {t.name}: load done {load[t.name]}", file=sys.stderr)
            faults[t.name] = {
                "50 clients disconnect mid-stream": asyncio.run(probe_disconnects(t)),
                "20 MB body beside 8 streams": asyncio.run(probe_big_body(t)),
                "out-of-range sampling values beside 8 streams": asyncio.run(probe_poison(t)),
            }
            print(f"# {t.name}: faults done", file=sys.stderr)
            faults[t.name]["SIGTERM with a stream running"] = probe_sigterm(t)
            faults[t.name]["5xx answers seen (all probes)"] = str(t.fivexx)
        finally:
            t.stop()
    names = [t.name for t in targets]
    print(f"Model: `{Path(model).name}`; {os.cpu_count()} CPU cores; loopback; "
          f"{time.strftime('%Y-%m-%d')}\n")
    print("### Bad inputs (HTTP status; 8 streams running beside them)\n")
    print(table(bad, names, "input"))
    print("\n### 200 concurrent streams (32 tokens each, greedy)\n")
    print(table(load, names, "measure"))
    print("\n### Faults injected\n")
    print(table(faults, names, "fault"))


if __name__ == "__main__":
    main()
