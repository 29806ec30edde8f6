"""Time paged decode attention (Triton vs torch reference) and prefill (vs SDPA) on CUDA.

Llama-3.2-1B attention shapes: 32 q heads, 8 kv heads, head_dim 64, bf16, block_size 16.
Run from the repo root: PYTHONPATH=src python tests/kernels/bench_paged_decode.py [--sweep] [--kv fp8|int8]
(--kv: quantized pools, codes + f32 scale per slot and head, as with --kv-cache-dtype)
"""
from __future__ import annotations

import sys
from functools import partial

import torch
import torch.nn.functional as F

from hearthlm.kernels import paged_attention as pa
from hearthlm.kernels import prefill_attention as pf
from hearthlm.kernels.kv_quant import pool_nbytes, quantize_pool

H, KV, D, BS, DT = 32, 8, 64, 16, torch.bfloat16
KV_KIND = sys.argv[sys.argv.index("--kv") + 1] if "--kv" in sys.argv else None


def _time_us(fn, iters: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / iters


def _graph_us(fn, iters: int = 50) -> float:
    """Per-call time with launch overhead removed (as the engine's CUDA-graph decode sees it)."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(iters):
            fn()
    return _time_us(g.replay, 5, warmup=1) / iters


def _paged_inputs(batch: int, ctx: int):
    nb = batch * ctx // BS
    k_cache = torch.randn(nb, BS, KV, D, device="cuda", dtype=DT)
    v_cache = torch.randn(nb, BS, KV, D, device="cuda", dtype=DT)
    if KV_KIND:
        k_cache, v_cache = quantize_pool(k_cache, KV_KIND), quantize_pool(v_cache, KV_KIND)
    block_tables = torch.randperm(nb, device="cuda").view(batch, ctx // BS).to(torch.int32)
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    return k_cache, v_cache, block_tables, seq_lens


def bench_decode(sweep: bool) -> None:
    print("decode: batch ctx | triton us, eager (CUDA graph) | GB/s (graph) | torch ref us | max err")
    dev = torch.device("cuda")
    for batch in (1, 64):
        for ctx in (1024, 8192):
            q = torch.randn(batch, H, D, device="cuda", dtype=DT)
            args = (q, *_paged_inputs(batch, ctx), D ** -0.5)
            kv_bytes = pool_nbytes(args[1]) + pool_nbytes(args[2])
            triton_fn = partial(pa.paged_decode_attention_triton, *args)
            ref_fn = partial(pa.paged_decode_attention_ref, *args)
            t = _time_us(triton_fn, 100)
            tg = _graph_us(triton_fn)
            r = _time_us(ref_fn, 3 if batch > 1 else 10, warmup=1)
            err = (triton_fn().float() - ref_fn().float()).abs().max().item()
            print(f"decode: {batch:3d} {ctx:5d} | {t:7.1f} ({tg:6.1f}) | {kv_bytes / tg / 1e3:5.0f} | {r:8.1f} | "
                  f"{err:.1e}", flush=True)
            if sweep:
                for pps in (2, 4):
                    splits = pa._num_splits(batch, KV, ctx, dev, programs_per_sm=pps)
                    for bn in (64, 128):
                        tg = _graph_us(partial(triton_fn, num_splits=splits, block_n=bn))
                        print(f"  programs/SM={pps} (splits={splits}) block_n={bn}: {tg:6.1f} us", flush=True)


def bench_prefill(sweep: bool) -> None:
    print("prefill: batch x q_len | triton us TFLOP/s | sdpa(flash, contiguous K/V) us")
    configs = [{}, {"num_warps": 8, "num_stages": 3}, {"block_m": 64, "num_warps": 4, "num_stages": 3},
               {"block_m": 128, "block_n": 128, "num_warps": 8, "num_stages": 2}] if sweep else [{}]
    for batch, q_len in ((1, 2048), (4, 512), (1, 8192)):
        q = torch.randn(batch * q_len, H, D, device="cuda", dtype=DT)
        cu = torch.arange(batch + 1, device="cuda", dtype=torch.int32) * q_len
        k_cache, v_cache, block_tables, seq_lens = _paged_inputs(batch, q_len)
        args = (q, k_cache, v_cache, block_tables, cu, seq_lens, D ** -0.5)
        flops = 4 * batch * q_len * q_len / 2 * H * D
        qs = q.view(batch, q_len, H, D).transpose(1, 2)
        ks = torch.randn(batch, KV, q_len, D, device="cuda", dtype=DT)
        s = _time_us(partial(F.scaled_dot_product_attention, qs, ks, ks, is_causal=True, enable_gqa=True), 20)
        want = pf.paged_prefill_attention_ref(*args) if q_len <= 2048 else None
        for cfg in configs:
            fn = partial(pf.paged_prefill_attention_triton, *args, max_seqlen_q=q_len, **cfg)
            t = _time_us(fn, 20)
            err = "" if want is None else f" err {(fn().float() - want.float()).abs().max().item():.1e}"
            print(f"prefill: {batch} x {q_len:5d} {cfg} | {t:8.1f} {flops / t / 1e6:6.1f} | {s:8.1f}{err}",
                  flush=True)


if __name__ == "__main__":
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "kv", KV_KIND or "bf16")
    bench_decode(sweep="--sweep" in sys.argv)
    bench_prefill(sweep="--sweep" in sys.argv)
