"""Quantized KV pools (fp8 e4m3 / int8 + f32 scale per slot and head): quantizer, writers, attention readers.

CPU: torch references. CUDA (gpu-marked): Triton writer / decode / prefill vs the references at real sizes.
The interpreted Triton checks on CPU live in test_triton_interpreted.py.
"""
from __future__ import annotations

import pytest
import torch

from hearthlm.kernels import paged_attention as pa
from hearthlm.kernels import prefill_attention as pf
from hearthlm.kernels.cache_write import reshape_and_cache_ref, reshape_and_cache_triton
from hearthlm.kernels.kv_quant import (QuantizedKVCache, as_bytes, dequantize_kv, new_pool, quantize_kv,
                                       quantize_pool)
from hearthlm.layers.attention import write_kv

KINDS = ["fp8", "int8"]


def dequant_pool(pool: QuantizedKVCache) -> torch.Tensor:
    return dequantize_kv(pool.codes, pool.scales)


@pytest.mark.parametrize("kind", KINDS)
def test_quantize_roundtrip_error_and_zero_rows(kind):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 4, 64, generator=g) * torch.logspace(-3, 2, 50)[:, None, None]
    x[3, 1] = 0.0
    codes, scales = quantize_kv(x, kind)
    assert codes.dtype == (torch.float8_e4m3fn if kind == "fp8" else torch.int8) and scales.dtype == torch.float32
    assert scales[3, 1] == 0 and torch.count_nonzero(codes[3, 1].float()) == 0
    absmax = x.abs().amax(-1)
    torch.testing.assert_close(scales, absmax / (448.0 if kind == "fp8" else 127.0))
    err = (dequantize_kv(codes, scales) - x).abs()
    if kind == "int8":  # half a step
        assert (err <= scales[..., None] * 0.5 * (1 + 1e-5)).all()
    else:  # e4m3: 3 mantissa bits -> relative 2^-4, absolute floor at the subnormal step 2^-9 x scale
        assert (err <= torch.maximum(x.abs() * 2**-4, scales[..., None] * 2**-10) * (1 + 1e-5)).all()
    assert torch.equal(codes.float().abs().amax(-1)[absmax > 0], torch.full_like(absmax[absmax > 0],
                                                                                 448.0 if kind == "fp8" else 127.0))


@pytest.mark.parametrize("kind", KINDS)
def test_writers_agree(kind):
    g = torch.Generator().manual_seed(1)
    kv = torch.randn(7, 3, 2, 16, generator=g)
    k, v = kv[:, 0], kv[:, 2]  # strided views, like slices of a fused qkv output
    slots = torch.tensor([3, -1, 0, 15, 6, 22, 9])
    pools = [new_pool((6, 4, 2, 16), kind, torch.float32, torch.device("cpu"), zero=True) for _ in range(4)]
    reshape_and_cache_ref(k, v, pools[0], pools[1], slots)
    keep = slots >= 0
    write_kv(k[keep], v[keep], pools[2], pools[3], slots[keep])
    for a, b, x in ((pools[0], pools[2], k), (pools[1], pools[3], v)):
        assert torch.equal(as_bytes(a.codes), as_bytes(b.codes)) and torch.equal(a.scales, b.scales)
        codes, scales = quantize_kv(x[keep], kind)
        assert torch.equal(as_bytes(a.codes).view(-1, 2, 16)[slots[keep]], as_bytes(codes))
        assert torch.equal(a.scales.view(-1, 2)[slots[keep]], scales)
        untouched = torch.ones(24, dtype=torch.bool)
        untouched[slots[keep]] = False
        assert torch.count_nonzero(a.scales.view(-1, 2)[untouched]) == 0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("softcap,window", [(None, None), (5.0, 7)])
def test_refs_read_dequantized_values(decode_case, prefill_case, kind, softcap, window):
    pb, q = decode_case([1, 17, 40], num_heads=6, num_kv_heads=2, block_size=12)
    kq, vq = quantize_pool(pb.k_cache, kind), quantize_pool(pb.v_cache, kind)
    got = pa.paged_decode_attention_ref(q, kq, vq, pb.block_tables, pb.seq_lens, 0.2, softcap, window)
    want = pa.paged_decode_attention_ref(q, dequant_pool(kq), dequant_pool(vq), pb.block_tables, pb.seq_lens,
                                         0.2, softcap, window)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    pb, q, cu = prefill_case([21, 30, 45], [21, 1, 13], num_heads=6, num_kv_heads=2, block_size=12)
    kq, vq = quantize_pool(pb.k_cache, kind), quantize_pool(pb.v_cache, kind)
    args = (pb.block_tables, cu, pb.seq_lens, 0.2, softcap, window)
    got = pf.paged_prefill_attention_ref(q, kq, vq, *args)
    want = pf.paged_prefill_attention_ref(q, dequant_pool(kq), dequant_pool(vq), *args)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    # and the quantization error itself stays small next to the exact cache
    exact = pf.paged_prefill_attention_ref(q, pb.k_cache, pb.v_cache, *args)
    assert (got - exact).abs().max() < (0.2 if kind == "fp8" else 0.03)  # measured 0.11 and 0.02


# ----------------------------------------------------------------------------- CUDA

GPU_SHAPES = [(32, 8, 64), (16, 16, 128), (8, 4, 256), (28, 4, 128)]  # (num_heads, num_kv_heads, head_dim)
GPU_CASES = [(kind, torch.bfloat16, shape, None, None) for kind in KINDS for shape in GPU_SHAPES] + [
    ("fp8", torch.bfloat16, GPU_SHAPES[0], 10.0, 24), ("int8", torch.bfloat16, GPU_SHAPES[1], None, 24),
    ("fp8", torch.float16, GPU_SHAPES[2], 50.0, 64), ("int8", torch.float32, GPU_SHAPES[0], 5.0, 7)]


def _tol(dtype: torch.dtype) -> dict[str, float]:
    return {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype,kv_heads,head_dim", [(torch.bfloat16, 8, 64), (torch.bfloat16, 2, 128),
                                                     (torch.float16, 4, 256), (torch.float32, 3, 80)])
def test_cache_write_triton_cuda(kind, dtype, kv_heads, head_dim):
    g = torch.Generator().manual_seed(0)
    qkv = (torch.randn(300, 3 * kv_heads, head_dim, generator=g) * 3).to(dtype).cuda()
    qkv[5, kv_heads] = 0  # an all-zero head
    k, v = qkv[:, kv_heads:2 * kv_heads], qkv[:, 2 * kv_heads:]
    slots = torch.randperm(40 * 16, generator=g)[:300]
    slots[1] = -1
    slots = slots.cuda()
    pools = [new_pool((40, 16, kv_heads, head_dim), kind, dtype, torch.device("cuda"), zero=True) for _ in range(4)]
    reshape_and_cache_ref(k, v, pools[0], pools[1], slots)
    reshape_and_cache_triton(k, v, pools[2], pools[3], slots)
    for want, got in ((pools[0], pools[2]), (pools[1], pools[3])):
        assert torch.equal(got.scales, want.scales)
        assert torch.equal(as_bytes(got.codes), as_bytes(want.codes))


@pytest.mark.gpu
@pytest.mark.parametrize("kind,dtype,shape,softcap,window", GPU_CASES)
def test_decode_triton_quantized_cuda(decode_case, kind, dtype, shape, softcap, window):
    num_heads, num_kv_heads, head_dim = shape
    seq_lens = [1, 15, 16, 17, 100, 1000, 2049, 300]
    pb, q = decode_case(seq_lens, num_heads, num_kv_heads, head_dim, 16, dtype, "cuda")
    kq, vq = quantize_pool(pb.k_cache, kind), quantize_pool(pb.v_cache, kind)
    want = pa.paged_decode_attention_ref(q, kq, vq, pb.block_tables, pb.seq_lens, 0.1, softcap, window)
    for splits in (None, 1, 5):
        got = pa.paged_decode_attention_triton(q, kq, vq, pb.block_tables, pb.seq_lens, 0.1, softcap, window,
                                               num_splits=splits)
        torch.testing.assert_close(got, want, **_tol(dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("kind,dtype,shape,softcap,window", GPU_CASES)
def test_prefill_triton_quantized_cuda(prefill_case, kind, dtype, shape, softcap, window):
    num_heads, num_kv_heads, head_dim = shape
    seq_lens, q_lens = [300, 77, 1, 500, 64], [300, 20, 1, 1, 33]
    pb, q, cu = prefill_case(seq_lens, q_lens, num_heads, num_kv_heads, head_dim, 16, dtype, "cuda")
    kq, vq = quantize_pool(pb.k_cache, kind), quantize_pool(pb.v_cache, kind)
    args = (pb.block_tables, cu, pb.seq_lens, 0.1, softcap, window)
    want = pf.paged_prefill_attention_ref(q, kq, vq, *args)
    got = pf.paged_prefill_attention_triton(q, kq, vq, *args)
    torch.testing.assert_close(got, want, **_tol(dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,shape", [(torch.bfloat16, (16, 8, 128)), (torch.float16, (32, 8, 64)),
                                         (torch.float32, (28, 4, 128))])
def test_plain_e4m3_pools_cuda(decode_case, prefill_case, dtype, shape):
    """--kv-cache-dtype fp8_e4m3: e4m3 codes without scales; the kernels vs the reference on the same pools, and
    the Triton writer vs the torch writer (saturating at +-448)."""
    from hearthlm.kernels.kv_quant import to_pool_dtype

    num_heads, num_kv_heads, head_dim = shape
    pb, q = decode_case([1, 17, 300, 2049], num_heads, num_kv_heads, head_dim, 16, dtype, "cuda")
    kc, vc = (to_pool_dtype(c * 3, torch.float8_e4m3fn) for c in (pb.k_cache, pb.v_cache))
    want = pa.paged_decode_attention_ref(q, kc, vc, pb.block_tables, pb.seq_lens, 0.1)
    for splits in (None, 1, 4):
        got = pa.paged_decode_attention_triton(q, kc, vc, pb.block_tables, pb.seq_lens, 0.1, num_splits=splits)
        torch.testing.assert_close(got, want, **_tol(dtype))
    pb, q, cu = prefill_case([300, 77, 1], [300, 20, 1], num_heads, num_kv_heads, head_dim, 16, dtype, "cuda")
    kc, vc = (to_pool_dtype(c, torch.float8_e4m3fn) for c in (pb.k_cache, pb.v_cache))
    args = (pb.block_tables, cu, pb.seq_lens, 0.1, None, None)
    torch.testing.assert_close(pf.paged_prefill_attention_triton(q, kc, vc, *args),
                               pf.paged_prefill_attention_ref(q, kc, vc, *args), **_tol(dtype))
    slots = torch.randperm(64 * 16, device="cuda")[:200]
    pools = [new_pool((64, 16, num_kv_heads, head_dim), "fp8_e4m3", dtype, torch.device("cuda"), zero=True)
             for _ in range(4)]
    kv = (torch.randn(2, 200, num_kv_heads, head_dim, device="cuda") * 200).to(dtype)
    reshape_and_cache_ref(kv[0], kv[1], pools[0], pools[1], slots)
    reshape_and_cache_triton(kv[0], kv[1], pools[2], pools[3], slots)
    assert torch.equal(as_bytes(pools[0]), as_bytes(pools[2])) and torch.equal(as_bytes(pools[1]), as_bytes(pools[3]))

