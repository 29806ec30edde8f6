"""Sweep the paged decode attention's launch parameters on the throughput workload's shape.

Qwen3-0.6B attention (16 q heads, 8 kv heads, head_dim 128, bf16, block_size 16), context lengths drawn as
in `hearth bench throughput` mid-run (prompt uniform 100-1024 plus a uniform share of an output uniform in
100-1024), block tables shuffled as a busy pool leaves them. Reports achieved KV read bandwidth next to a
plain read (torch sum) and copy of the same byte count.

Usage (CUDA machine, repo root): PYTHONPATH=src python benchmarks/decode_attn_sweep.py [--batch 256 128] [--full]
"""
from __future__ import annotations

import argparse
import itertools
from functools import partial

import torch
import triton.testing

from hearthlm.kernels import paged_attention as pa

H, KV, D, BS, DT = 16, 8, 128, 16, torch.bfloat16


def graph_us(fn, iters: int = 20) -> float:
    """Median time of one call replayed from a CUDA graph (as decode steps run), in us."""
    return triton.testing.do_bench_cudagraph(fn, rep=iters * 2, return_mode="median") * 1e3


def workload(batch: int, max_model_len: int, gen: torch.Generator):
    prompt = torch.randint(100, 1025, (batch,), generator=gen)
    out = torch.randint(100, 1025, (batch,), generator=gen)
    done = (torch.rand(batch, generator=gen) * out).long()
    lens = (prompt + done + 1).clamp(max=max_model_len)
    width = max_model_len // BS
    used = int(((lens + BS - 1) // BS).sum())
    nb = used + 64
    perm = torch.randperm(nb, generator=gen)
    tables = torch.zeros(batch, width, dtype=torch.int32)
    at = 0
    for i, n in enumerate(((lens + BS - 1) // BS).tolist()):
        tables[i, :n] = perm[at:at + n].to(torch.int32)
        at += n
    k = torch.randn(nb, BS, KV, D, device="cuda", dtype=DT)
    v = torch.randn(nb, BS, KV, D, device="cuda", dtype=DT)
    q = torch.randn(batch, H, D, device="cuda", dtype=DT)
    kv_bytes = int(lens.sum()) * KV * D * 2 * 2
    return q, k, v, tables.cuda(), lens.to(torch.int32).cuda(), kv_bytes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[256, 128])
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--full", action="store_true", help="also sweep warps and pipeline stages")
    ap.add_argument("--top", type=int, default=10)
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    gen = torch.Generator().manual_seed(0)
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    read = graph_us(lambda: x.view(torch.bfloat16).sum(dtype=torch.float32), 5)
    copy = graph_us(lambda: y.copy_(x), 5)
    print(f"1 GiB: sum {x.numel() / read / 1e3:.0f} GB/s read; copy {2 * x.numel() / copy / 1e3:.0f} GB/s (r+w)")
    for batch in args.batch:
        q, k, v, tables, lens, kv_bytes = workload(batch, args.max_model_len, gen)
        base = (q, k, v, tables, lens, D ** -0.5)
        want = pa.paged_decode_attention_triton(*base, num_splits=1).float()
        dflt = graph_us(partial(pa.paged_decode_attention_triton, *base))
        print(f"batch {batch}: mean len {lens.float().mean():.0f}, max {int(lens.max())}, KV {kv_bytes / 1e6:.0f} MB;"
              f" default launch {dflt:.1f} us = {kv_bytes / dflt / 1e3:.0f} GB/s", flush=True)
        order = torch.argsort(lens, descending=True)
        lpt = (q[order], k, v, tables[order], lens[order], D ** -0.5)
        t = graph_us(partial(pa.paged_decode_attention_triton, *lpt, num_splits=1))
        print(f"  longest-first order, 1 split: {t:.1f} us = {kv_bytes / t / 1e3:.0f} GB/s", flush=True)
        grid = (itertools.product((1, 2, 3, 4, 6, 8), (64, 128), (4,), (2,)) if not args.full else
                itertools.product((1, 2, 4, 8), (32, 64, 128), (4, 8), (1, 2, 3)))
        rows = []
        for splits, bn, warps, stages in grid:
            fn = partial(pa.paged_decode_attention_triton, *base, num_splits=splits, block_n=bn,
                         num_warps=warps, num_stages=stages)
            try:
                err = (fn().float() - want).abs().max().item()
                t = graph_us(fn)
            except Exception as e:  # noqa: BLE001 - out-of-resources configs are skipped
                print(f"  splits {splits} block_n {bn} warps {warps} stages {stages}: {type(e).__name__}")
                continue
            rows.append((t, splits, bn, warps, stages, err))
        for t, splits, bn, warps, stages, err in sorted(rows)[:args.top]:
            print(f"  splits {splits} block_n {bn:3d} warps {warps} stages {stages}: {t:7.1f} us "
                  f"{kv_bytes / t / 1e3:5.0f} GB/s (err {err:.1e})", flush=True)


if __name__ == "__main__":
    main()
