"""Triton kernels vs torch references under TRITON_INTERPRET=1 (CPU, tiny shapes: the suite's time budget).

@triton.jit (and triton.language's own jit helpers) choose interpreter vs compiler when triton is
imported, so these cases run only in a process that set TRITON_INTERPRET=1 first;
test_triton_interpreter_subprocess.py starts such a process from a plain CPU run (where conftest deselects them).
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

from .conftest import interpreting

if importlib.util.find_spec("triton") is None:
    pytest.skip("could not import 'triton'", allow_module_level=True)
pytestmark = pytest.mark.skipif(not interpreting(), reason="needs TRITON_INTERPRET=1 on a CPU machine "
                                "(test_triton_interpreter_subprocess.py runs these)")

from hearthlm.kernels import activation, cache_write, rmsnorm, rope
from hearthlm.kernels import paged_attention as pa
from hearthlm.kernels import prefill_attention as pf
from hearthlm.kernels.kv_quant import as_bytes, new_pool, quantize_pool


@pytest.mark.parametrize("softcap,window,num_splits", [(None, None, 1), (None, None, 3), (5.0, 21, None)])
def test_decode(decode_case, softcap, window, num_splits):
    pb, q = decode_case([1, 30, 75], num_heads=6, num_kv_heads=2, block_size=12)
    args = (q, pb.k_cache, pb.v_cache, pb.block_tables, pb.seq_lens, 0.2, softcap, window)
    want = pa.paged_decode_attention_ref(*args)
    got = pa.paged_decode_attention_triton(*args, num_splits=num_splits, block_n=16)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_splits", [1, 2])
def test_decode_longest_first_order(decode_case, num_splits):
    """seq_order only changes which program takes which sequence: results are bit-identical."""
    pb, q = decode_case([5, 75, 30, 1, 52], num_heads=6, num_kv_heads=2, block_size=12)
    lens = torch.tensor([5, 75, 30, 0, 52], dtype=torch.int32)
    args = (q, pb.k_cache, pb.v_cache, pb.block_tables, lens, 0.2)
    order = torch.from_numpy(pa.decode_order_of(lens.numpy()))
    assert order.tolist() == [1, 4, 2, 0, 3]
    plain = pa.paged_decode_attention_triton(*args, num_splits=num_splits, block_n=16)
    got = pa.paged_decode_attention_triton(*args, num_splits=num_splits, block_n=16, seq_order=order)
    assert torch.equal(got, plain)
    torch.testing.assert_close(got, pa.paged_decode_attention_ref(*args), atol=1e-5, rtol=1e-5)


def test_decode_fp16_zero_length(decode_case):
    pb, q = decode_case([40, 9], dtype=torch.float16)
    seq_lens = torch.tensor([40, 0], dtype=torch.int32)
    args = (q, pb.k_cache, pb.v_cache, pb.block_tables, seq_lens, 0.2)
    got = pa.paged_decode_attention_triton(*args, num_splits=2, block_n=16)
    torch.testing.assert_close(got, pa.paged_decode_attention_ref(*args), atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("softcap,window", [(None, None), (5.0, 9)])
def test_prefill_mixed_q_len(prefill_case, softcap, window):
    pb, q, cu = prefill_case([21, 30, 45], [21, 1, 13], num_heads=6, num_kv_heads=2, block_size=12)
    args = (q, pb.k_cache, pb.v_cache, pb.block_tables, cu, pb.seq_lens, 0.2, softcap, window)
    want = pf.paged_prefill_attention_ref(*args)
    got = pf.paged_prefill_attention_triton(*args, block_m=16, block_n=16)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_mixed_step_split_between_the_decode_and_prefill_kernels(prefill_case):
    """A mixed step as the attention layer runs it: leading q_len-1 rows through the decode kernel into
    out[:d], the rest through the prefill kernel from first_seq=d into the same out."""
    pb, q, cu = prefill_case([21, 30, 45, 17], [1, 1, 13, 17], num_heads=6, num_kv_heads=2, block_size=12)
    args = (pb.k_cache, pb.v_cache, pb.block_tables, cu, pb.seq_lens, 0.2, None, 9)
    want = pf.paged_prefill_attention_ref(q, *args)
    out = torch.full_like(q, float("nan"))
    pa.paged_decode_attention_triton(q[:2], pb.k_cache, pb.v_cache, pb.block_tables[:2], pb.seq_lens[:2], 0.2,
                                     None, 9, block_n=16, out=out[:2])
    got = pf.paged_prefill_attention_triton(q, *args, block_m=16, block_n=16, first_seq=2, out=out)
    assert got is out
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_and_prefill_with_sinks(decode_case, prefill_case, num_splits):
    """gpt-oss attention sinks: one more logit per head in the softmax, added once (in the reduce when split)."""
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0, 3.0, -0.5])
    pb, q = decode_case([1, 30, 75], num_heads=6, num_kv_heads=2, block_size=12)
    args = (q, pb.k_cache, pb.v_cache, pb.block_tables, pb.seq_lens, 0.2, None, None)
    want = pa.paged_decode_attention_ref(*args, sinks=sinks)
    torch.testing.assert_close(pa.paged_decode_attention_triton(*args, num_splits=num_splits, block_n=16,
                                                                sinks=sinks), want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(want, pa.paged_decode_attention_ref(*args), atol=1e-3)
    pb, q, cu = prefill_case([21, 30, 45], [21, 1, 13], num_heads=6, num_kv_heads=2, block_size=12)
    args = (q, pb.k_cache, pb.v_cache, pb.block_tables, cu, pb.seq_lens, 0.2, None, 9 if num_splits > 1 else None)
    torch.testing.assert_close(pf.paged_prefill_attention_triton(*args, block_m=16, block_n=16, sinks=sinks),
                               pf.paged_prefill_attention_ref(*args, sinks=sinks), atol=1e-5, rtol=1e-5)


def test_cache_write():
    k_cache, v_cache = torch.zeros(2, 4, 4, 2, 8).unbind(0)
    kv = torch.randn(5, 3, 2, 8)
    k, v = kv[:, 0], kv[:, 2]  # strided views, like slices of a fused qkv output
    slots = torch.tensor([3, -1, 0, 15, 6])
    want_k, want_v = k_cache.clone(), v_cache.clone()
    cache_write.reshape_and_cache_ref(k, v, want_k, want_v, slots)
    cache_write.reshape_and_cache_triton(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)


@pytest.mark.parametrize("kind,dtype", [("fp8", torch.float32), ("int8", torch.float32), ("fp8", torch.float16)])
def test_cache_write_quantized(kind, dtype):
    g = torch.Generator().manual_seed(0)
    kv = (torch.randn(9, 3, 3, 40, generator=g) * torch.logspace(-4, 3, 40)).to(dtype)  # subnormal codes too
    kv[2, 0, 1] = 0  # an all-zero head: scale 0, codes 0
    k, v = kv[:, 0], kv[:, 2]
    slots = torch.tensor([3, -1, 0, 15, 6, 7, 20, 21, 9])
    want = [new_pool((6, 4, 3, 40), kind, dtype, torch.device("cpu"), zero=True) for _ in range(2)]
    got = [new_pool((6, 4, 3, 40), kind, dtype, torch.device("cpu"), zero=True) for _ in range(2)]
    cache_write.reshape_and_cache_ref(k, v, *want, slots)
    cache_write.reshape_and_cache_triton(k, v, *got, slots)
    for a, b in zip(got, want):  # bit-exact, -0.0 included
        assert torch.equal(as_bytes(a.codes), as_bytes(b.codes)) and torch.equal(a.scales, b.scales)


@pytest.mark.parametrize("kind,dtype,softcap,window,num_splits", [
    ("fp8", torch.float32, None, None, 1), ("int8", torch.float32, 5.0, 21, 3), ("fp8", torch.float16, None, None, 2)])
def test_decode_quantized(decode_case, kind, dtype, softcap, window, num_splits):
    pb, q = decode_case([1, 30, 75], num_heads=6, num_kv_heads=2, block_size=12, dtype=dtype)
    kq, vq = quantize_pool(pb.k_cache, kind), quantize_pool(pb.v_cache, kind)
    args = (q, kq, vq, pb.block_tables, pb.seq_lens, 0.2, softcap, window)
    want = pa.paged_decode_attention_ref(*args)
    got = pa.paged_decode_attention_triton(*args, num_splits=num_splits, block_n=16)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


@pytest.mark.parametrize("kind,softcap,window", [("fp8", None, None), ("int8", 5.0, 9)])
def test_prefill_quantized(prefill_case, kind, softcap, window):
    pb, q, cu = prefill_case([21, 30, 45], [21, 1, 13], num_heads=6, num_kv_heads=2, block_size=12)
    kq, vq = quantize_pool(pb.k_cache, kind), quantize_pool(pb.v_cache, kind)
    args = (q, kq, vq, pb.block_tables, cu, pb.seq_lens, 0.2, softcap, window)
    want = pf.paged_prefill_attention_ref(*args)
    got = pf.paged_prefill_attention_triton(*args, block_m=16, block_n=16)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("gemma", [False, True])
def test_rms_norm(gemma):
    x, res = torch.randn(2, 5, 40).to(torch.float16).unbind(0)
    w = torch.randn(40).to(torch.float16)
    kw = {"weight_offset": 1.0 if gemma else 0.0, "gemma_style": gemma}
    out, new_res = rmsnorm.rms_norm_triton(x, w, 1e-6, residual=res, **kw)
    want, want_res = rmsnorm.rms_norm_ref(x, w, 1e-6, residual=res, **kw)
    assert torch.equal(new_res, want_res)
    torch.testing.assert_close(out, want, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(rmsnorm.rms_norm_triton(x, w, 1e-6, **kw), rmsnorm.rms_norm_ref(x, w, 1e-6, **kw),
                               atol=2e-3, rtol=2e-3)


def test_rope():
    cache = rope.build_cos_sin_cache(16, 64, 10000.0)
    qkv = torch.randn(7, 6, 16)
    q, k = qkv[:, :4], qkv[:, 4:]  # strided views
    pos = torch.tensor([0, 5, 63, 2, 2, 10, 40])
    q2, k2 = q.clone(), k.clone()
    rope.apply_rope_ref_(q2, k2, pos, cache)
    rope.apply_rope_triton_(q, k, pos, cache)
    torch.testing.assert_close(q, q2)
    torch.testing.assert_close(k, k2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rope_with_qk_norm(dtype):
    cache = rope.build_cos_sin_cache(16, 64, 10000.0)
    qkv = (3 * torch.randn(5, 6, 16)).to(dtype)
    q, k = qkv[:, :4], qkv[:, 4:]
    qw, kw = torch.rand(16).to(dtype) + 0.5, torch.rand(16).to(dtype) + 0.5
    pos = torch.tensor([0, 5, 63, 2, 9])
    q2, k2 = q.clone(), k.clone()
    # reference: the unfused per-head RMSNorm, then RoPE
    q2.copy_(rmsnorm.rms_norm_ref(q2, qw, 1e-6))
    k2.copy_(rmsnorm.rms_norm_ref(k2, kw, 1e-6))
    rope.apply_rope_ref_(q2, k2, pos, cache)
    rope.apply_rope_triton_(q, k, pos, cache, (qw, kw, 1e-6))
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(q, q2, atol=tol, rtol=tol)
    torch.testing.assert_close(k, k2, atol=tol, rtol=tol)


@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.float8_e4m3fn])
def test_rope_writes_kv_like_reshape_and_cache(pool_dtype):
    """apply_rope_ with kv_write: the rotated k and v land in the pool exactly as reshape_and_cache puts them."""
    cache = rope.build_cos_sin_cache(16, 64, 10000.0)
    qkv = 3 * torch.randn(5, 8, 16)
    q, k, v = qkv[:, :4], qkv[:, 4:6], qkv[:, 6:]
    pos = torch.tensor([0, 5, 63, 2, 9])
    slots = torch.tensor([3, -1, 17, 40, 8])
    pools = [torch.zeros(4, 12, 2, 16).to(pool_dtype) for _ in range(4)]
    q2, k2 = q.clone(), k.clone()
    rope.apply_rope_ref_(q2, k2, pos, cache)
    cache_write.reshape_and_cache_ref(k2, v, pools[0], pools[1], slots)
    rope.apply_rope_triton_(q, k, pos, cache, kv_write=(v, pools[2], pools[3], slots))
    torch.testing.assert_close(q, q2)
    torch.testing.assert_close(k, k2)
    for want, got in zip(pools[:2], pools[2:]):
        torch.testing.assert_close(got.float(), want.float(), atol=1e-6, rtol=0)
        assert got.float().abs().sum() > 0


def test_activations():
    x = torch.randn(3, 2, 2 * 1100)  # inter = 1100 spans two 1024-wide program tiles
    torch.testing.assert_close(activation.silu_and_mul_triton(x), activation.silu_and_mul_ref(x))
    torch.testing.assert_close(activation.gelu_tanh_and_mul_triton(x), activation.gelu_tanh_and_mul_ref(x))
