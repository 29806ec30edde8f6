"""Serving benchmark: TTFT / TPOT percentiles at a given concurrency against a running server."""
from __future__ import annotations

import asyncio
import json
import random
import statistics
import time


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


async def _one(client, url: str, model: str, prompt: list[int] | str, max_tokens: int) -> tuple[float, float, int]:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    start = time.perf_counter()
    first, chunks = None, 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"server answered {resp.status_code}: {(await resp.aread()).decode()[:200]}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            if json.loads(line[6:])["choices"][0].get("text"):
                chunks += 1
                first = first or time.perf_counter()
    end = time.perf_counter()
    first = first or end
    return first - start, end - start, chunks


def run_serving(args) -> int:
    import httpx

    from ..client.base import server_url

    url = (args.url or server_url()).rstrip("/")
    model = args.model or httpx.get(f"{url}/v1/models", timeout=5).json()["data"][0]["id"]
    rng = random.Random(0)
    words = ["river", "stone", "light", "garden", "winter", "engine", "paper", "signal"]
    prompts = [" ".join(rng.choice(words) for _ in range(args.input_len)) for _ in range(args.num_requests)]

    async def main():
        sem = asyncio.Semaphore(args.concurrency)
        async with httpx.AsyncClient(timeout=600) as client:
            async def guarded(p):
                async with sem:
                    return await _one(client, url, model, p, args.output_len)
            t = time.perf_counter()
            results = await asyncio.gather(*(guarded(p) for p in prompts))
            return results, time.perf_counter() - t

    results, wall = asyncio.run(main())
    ttft = [r[0] * 1000 for r in results]
    tpot = [(r[1] - r[0]) * 1000 / max(1, args.output_len - 1) for r in results]
    print(f"# hearth bench serving {url} model={model} concurrency={args.concurrency} "
          f"requests={args.num_requests} in={args.input_len} words out={args.output_len}")
    print("| metric | p50 | p99 | mean |\n|---|---|---|---|")
    for name, vals in (("TTFT ms", ttft), ("TPOT ms", tpot)):
        print(f"| {name} | {_pct(vals, 0.5):,.1f} | {_pct(vals, 0.99):,.1f} | {statistics.mean(vals):,.1f} |")
    print(f"output tok/s: {args.num_requests * args.output_len / wall:,.1f}")
    return 0
