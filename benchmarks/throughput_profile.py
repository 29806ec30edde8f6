"""Where the throughput workload's wall time goes: per-step wall and host time by step kind and batch size,
and (with --kernels) GPU time by kernel over the whole run.

Usage (CUDA machine, repo root): PYTHONPATH=src python benchmarks/throughput_profile.py [--kernels]
  [--preset qwen3-0.6b] [--num-requests 256] [--max-num-batched-tokens 8192]
"""
from __future__ import annotations

import argparse
import random
import time
from collections import defaultdict

import torch

from hearthlm import LLM, SamplingParams
from hearthlm.bench.models import build_pair


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="qwen3-0.6b")
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--kernels", action="store_true")
    args = ap.parse_args()
    _, loaded = build_pair(args.preset, torch.bfloat16, torch.device("cuda"))
    llm = LLM(loaded=loaded, device="cuda", max_model_len=4096, max_num_seqs=256,
              max_num_batched_tokens=args.max_num_batched_tokens, kv_cache_dtype=args.kv_cache_dtype)
    rng = random.Random(0)
    vocab = loaded.config.vocab_size
    lens = [(rng.randint(100, 1024), rng.randint(100, 1024)) for _ in range(args.num_requests)]
    prompts = [[rng.randrange(3, vocab) for _ in range(i)] for i, _ in lens]
    sps = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for _, o in lens]
    llm.generate(prompts[:4], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)

    eng = llm.engine
    records = []  # (kind, batch, tokens, wall, wait)
    orig_step, orig_launch = eng.step, eng._launch
    waits = [0.0]

    def launch(sched):
        step = orig_launch(sched)
        tokens = sum(sched.num_new_tokens)
        kind = "decode" if tokens == len(sched.seqs) else "mixed"
        handle = step.handle
        orig_result = handle.result

        def result():
            t = time.perf_counter()
            r = orig_result()
            waits[0] += time.perf_counter() - t
            return r
        handle.result = result
        records.append([kind, len(sched.seqs), tokens, 0.0, 0.0])
        return step

    def step(*a, **k):
        waits[0] = 0.0
        t = time.perf_counter()
        out = orig_step(*a, **k)
        if records:
            records[-1][3] += time.perf_counter() - t
            records[-1][4] += waits[0]
        return out

    eng.step, eng._launch = step, launch
    prof = None
    if args.kernels:
        from torch.profiler import ProfilerActivity, profile
        prof = profile(activities=[ProfilerActivity.CUDA])
        prof.__enter__()
    torch.cuda.synchronize()
    t = time.perf_counter()
    outs = llm.generate(prompts, sps, use_tqdm=False)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    out_tok = sum(len(o.outputs[0].token_ids) for o in outs)
    print(f"{torch.cuda.get_device_name()}: {out_tok / dt:,.0f} output tok/s, {dt:.2f} s, {len(records)} steps")
    groups = defaultdict(lambda: [0, 0.0, 0.0, 0])
    for kind, bs, tokens, wall, wait in records:
        key = (kind, min(bs // 32 * 32, 224))
        g = groups[key]
        g[0] += 1
        g[1] += wall
        g[2] += wall - wait
        g[3] += tokens
    print("kind   batch>= | steps | wall s | host s (not waiting) | mean wall ms | tokens")
    for (kind, b), (n, wall, host, tokens) in sorted(groups.items()):
        print(f"{kind:6s} {b:7d} | {n:5d} | {wall:6.2f} | {host:6.2f} | {1e3 * wall / n:7.2f} | {tokens:,}")
    if prof is not None:
        prof.__exit__(None, None, None)
        events = prof.key_averages()
        total = sum(e.device_time_total for e in events) / 1e6
        print(f"GPU kernel time {total:.2f} s of {dt:.2f} s wall")
        print(events.table(sort_by="device_time_total", row_limit=20, max_name_column_width=80))


if __name__ == "__main__":
    main()
