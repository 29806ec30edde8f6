"""Paged decode / prefill attention: references vs naive dense attention, Triton vs references."""
from __future__ import annotations

import pytest
import torch

from hearthlm.kernels import paged_attention as pa
from hearthlm.kernels import prefill_attention as pf

VARIANTS = [(None, None), (10.0, None), (None, 24), (5.0, 7)]  # (softcap, window)


# ----------------------------------------------------------------------------- references vs dense

@pytest.mark.parametrize("softcap,window", VARIANTS)
@pytest.mark.parametrize("block_size", [16, 12])
def test_decode_ref_matches_dense(decode_case, dense, softcap, window, block_size):
    seq_lens = [1, 17, 64, 100]
    pb, q = decode_case(seq_lens, block_size=block_size)
    out = pa.paged_decode_attention_ref(q, pb.k_cache, pb.v_cache, pb.block_tables, pb.seq_lens, 0.2,
                                        softcap, window)
    for i, n in enumerate(seq_lens):
        want = dense(q[i:i + 1], pb.k[i], pb.v[i], torch.tensor([n - 1]), 0.2, softcap, window)
        torch.testing.assert_close(out[i:i + 1].double(), want, atol=1e-5, rtol=1e-5)


def test_decode_ref_zero_length_rows_are_zero(decode_case):
    pb, q = decode_case([5, 9])
    seq_lens = torch.tensor([5, 0], dtype=torch.int32)
    out = pa.paged_decode_attention_ref(q, pb.k_cache, pb.v_cache, pb.block_tables, seq_lens, 0.2)
    assert torch.count_nonzero(out[1]) == 0 and torch.count_nonzero(out[0]) > 0


@pytest.mark.parametrize("softcap,window", VARIANTS)
def test_prefill_ref_matches_dense(prefill_case, dense, softcap, window):
    # (seq_len, q_len): fresh prompt, decode rows, chunked prefill over a cached prefix, tiny prompt
    seq_lens, q_lens = [33, 50, 70, 5, 100], [33, 1, 20, 5, 1]
    pb, q, cu = prefill_case(seq_lens, q_lens, num_heads=6, num_kv_heads=2)
    out = pf.paged_prefill_attention_ref(q, pb.k_cache, pb.v_cache, pb.block_tables, cu, pb.seq_lens, 0.2,
                                         softcap, window)
    for i, (n, ql) in enumerate(zip(seq_lens, q_lens)):
        rows = slice(int(cu[i]), int(cu[i + 1]))
        want = dense(q[rows], pb.k[i], pb.v[i], torch.arange(n - ql, n), 0.2, softcap, window)
        torch.testing.assert_close(out[rows].double(), want, atol=1e-5, rtol=1e-5)


def test_decode_and_prefill_refs_agree_on_q_len_1(decode_case):
    pb, q = decode_case([3, 40, 77])
    cu = torch.arange(4, dtype=torch.int32)
    a = pa.paged_decode_attention_ref(q, pb.k_cache, pb.v_cache, pb.block_tables, pb.seq_lens, 0.3, 8.0, 16)
    b = pf.paged_prefill_attention_ref(q, pb.k_cache, pb.v_cache, pb.block_tables, cu, pb.seq_lens, 0.3, 8.0, 16)
    torch.testing.assert_close(a, b)


def test_public_names_use_reference_on_cpu(decode_case):
    from hearthlm.kernels import paged_decode_attention

    pb, q = decode_case([10, 20])
    got = paged_decode_attention(q, pb.k_cache, pb.v_cache, pb.block_tables, pb.seq_lens, 0.2)
    want = pa.paged_decode_attention_ref(q, pb.k_cache, pb.v_cache, pb.block_tables, pb.seq_lens, 0.2)
    torch.testing.assert_close(got, want)


# ----------------------------------------------------------------------------- CUDA

GPU_SHAPES = [(32, 8, 64), (16, 16, 128), (8, 4, 256), (28, 4, 128)]  # (num_heads, num_kv_heads, head_dim)
# bf16 on every shape and variant; fp16/fp32 on a few (each case compiles kernels: keep the matrix small)
GPU_CASES = ([(torch.bfloat16, shape, *var) for shape in GPU_SHAPES for var in VARIANTS]
             + [(torch.float16, GPU_SHAPES[0], None, None), (torch.float16, GPU_SHAPES[2], 50.0, 64),
                (torch.float32, GPU_SHAPES[1], None, None), (torch.float32, GPU_SHAPES[0], 5.0, 7)])


def _tol(dtype: torch.dtype) -> dict[str, float]:
    return {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,shape,softcap,window", GPU_CASES)
def test_decode_triton_cuda(decode_case, dtype, shape, softcap, window):
    num_heads, num_kv_heads, head_dim = shape
    seq_lens = [1, 15, 16, 17, 300, 1029]
    pb, q = decode_case(seq_lens, num_heads, num_kv_heads, head_dim, 16, dtype, "cuda")
    args = (q, pb.k_cache, pb.v_cache, pb.block_tables, pb.seq_lens, 0.1, softcap, window)
    want = pa.paged_decode_attention_ref(*args)
    torch.testing.assert_close(pa.paged_decode_attention(*args), want, **_tol(dtype))
    for splits, block_n in ((1, 64), (7, 128), (40, 32)):
        got = pa.paged_decode_attention_triton(*args, num_splits=splits, block_n=block_n)
        torch.testing.assert_close(got, want, **_tol(dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,shape,softcap,window", GPU_CASES)
def test_prefill_triton_cuda(prefill_case, dtype, shape, softcap, window):
    num_heads, num_kv_heads, head_dim = shape
    seq_lens, q_lens = [300, 77, 1, 600, 129, 40], [300, 1, 1, 250, 64, 1]
    pb, q, cu = prefill_case(seq_lens, q_lens, num_heads, num_kv_heads, head_dim, 16, dtype, "cuda")
    args = (q, pb.k_cache, pb.v_cache, pb.block_tables, cu, pb.seq_lens, 0.1, softcap, window)
    want = pf.paged_prefill_attention_ref(*args)
    torch.testing.assert_close(pf.paged_prefill_attention(*args, max_seqlen_q=max(q_lens)), want, **_tol(dtype))
    got = pf.paged_prefill_attention_triton(*args, block_m=64, block_n=64, num_warps=8, num_stages=3)
    torch.testing.assert_close(got, want, **_tol(dtype))
    # all-decode batch through the prefill kernel (q_len = 1 rows only; small tile path)
    dec = torch.arange(len(seq_lens) + 1, dtype=torch.int32, device="cuda")
    qd = q[cu[1:] - 1].contiguous()
    dargs = (qd, pb.k_cache, pb.v_cache, pb.block_tables, dec, pb.seq_lens, 0.1, softcap, window)
    torch.testing.assert_close(pf.paged_prefill_attention(*dargs), pf.paged_prefill_attention_ref(*dargs),
                               **_tol(dtype))


@pytest.mark.gpu
def test_decode_triton_cuda_graph_capture(decode_case):
    pb, q = decode_case([5, 200, 1000], 32, 8, 64, 16, torch.bfloat16, "cuda")
    args = (q, pb.k_cache, pb.v_cache, pb.block_tables, pb.seq_lens, 0.125)
    want = pa.paged_decode_attention_ref(*args)
    pa.paged_decode_attention(*args)  # compile outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = pa.paged_decode_attention(*args)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, want, atol=2e-2, rtol=2e-2)
