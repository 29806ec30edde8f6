"""Dense GEMV for decode: y[M, N] = x[M, K] @ w[N, K]^T (+ bias), M <= 8, one kernel launch.

At batch 1-8 a decode matmul is bound by reading W from HBM; cuBLAS falls well short of the bandwidth on small
decode shapes (and adds a split-K reduce kernel; BENCHMARKS.md). `_gemv_kernel`:
  * one program per BLOCK_N output columns, over the whole of K (no split-K, no reduce kernel, no atomics);
    all M rows of x are handled by the same program, so W is read exactly once;
  * W tiles [BLOCK_N, BLOCK_K] are loaded with 16-byte vectors along K; the products are first summed over each
    thread's own vector (a free reshape + in-register sum), so the fp32 accumulators are small
    ([BLOCK_N, BLOCK_K // VEC] per row of x) and the cross-thread reduction happens once, after the K loop;
  * x rows are loaded as 1-D [BLOCK_K] tiles. With BLOCK_K >= VEC * 32 * num_warps (bf16/fp16: 256 * num_warps)
    their layout coincides with a slice of W's, so there is no shared-memory layout conversion (and no barrier)
    inside the K loop; smaller BLOCK_K is correct but slower on GPU;
  * num_stages > 1 lets Triton's pipeliner stage W tiles through shared memory (cp.async) that many tiles ahead;
    num_stages = 1 is a plain load-then-use loop (latency is then hidden by occupancy alone);
  * the K loop runs unmasked over whole BLOCK_K tiles, then one masked tail tile if K % BLOCK_K != 0; rows past N
    re-read row N - 1 (clamped) so W loads are never masked along N; only the store is.
FP8 weights (e4m3, W8A16): W may be float8_e4m3fn with one float32 scale per output column (`w_scale`); codes
are converted in registers (VEC = 16 codes per 16-byte load, so x loads 32 bytes per vector) and the scale is
applied once to each column's sum.
Capturable in CUDA graphs: no host syncs, the output is the only allocation (a Triton compile happens on the
first call for each (M, dtype, config) and must precede capture, as for every Triton kernel here).

`gemv` dispatches (Triton for CUDA tensors, else `gemv_ref`); `gemv_triton` always runs the kernel (it also runs
under TRITON_INTERPRET=1 on CPU tensors); `gemv_config(M, N, K)` is the default tile table
(benchmarks/gemv_bench.py prints a tuned one).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._triton_utils import HAS_TRITON, next_pow2, use_triton

MAX_M = 8  # rows of x one program handles (accumulators are unrolled per row); callers' thresholds: row_dispatch


def gemv_ref(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
             w_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x: [M, K], w: [N, K] -> [M, N] in x.dtype (fp32 matmul, bias added in fp32); w_scale [N]: column scales."""
    y = x.float() @ w.float().t()
    if w_scale is not None:
        y = y * w_scale.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _row_dot(acc, w, x_row, kk, k_mask, MASKED: tl.constexpr, VEC: tl.constexpr):
        """acc [BN, BK // VEC] += (w [BN, BK] * x_row[kk] [BK]) summed over each VEC-wide group along K."""
        if MASKED:
            x = tl.load(x_row + kk, mask=k_mask, other=0.0)
        else:
            x = tl.load(x_row + kk)
        p = w * x.to(tl.float32)[None, :]
        return acc + tl.sum(tl.reshape(p, [p.shape[0], p.shape[1] // VEC, VEC]), axis=2)

    @triton.jit
    def _tile(a0, a1, a2, a3, a4, a5, a6, a7, w_rows, x_ptr, stride_xm, kk, K,
              MASKED: tl.constexpr, BLOCK_M: tl.constexpr, VEC: tl.constexpr):
        """One [BLOCK_N, BLOCK_K] tile of W (read once) against up to 8 rows of x."""
        k_mask = kk < K
        if MASKED:
            w = tl.load(w_rows + kk[None, :], mask=k_mask[None, :], other=0.0)
        else:
            w = tl.load(w_rows + kk[None, :])
        w = w.to(tl.float32)
        a0 = _row_dot(a0, w, x_ptr, kk, k_mask, MASKED, VEC)
        if BLOCK_M > 1:
            a1 = _row_dot(a1, w, x_ptr + stride_xm, kk, k_mask, MASKED, VEC)
        if BLOCK_M > 2:
            a2 = _row_dot(a2, w, x_ptr + 2 * stride_xm, kk, k_mask, MASKED, VEC)
        if BLOCK_M > 3:
            a3 = _row_dot(a3, w, x_ptr + 3 * stride_xm, kk, k_mask, MASKED, VEC)
        if BLOCK_M > 4:
            a4 = _row_dot(a4, w, x_ptr + 4 * stride_xm, kk, k_mask, MASKED, VEC)
        if BLOCK_M > 5:
            a5 = _row_dot(a5, w, x_ptr + 5 * stride_xm, kk, k_mask, MASKED, VEC)
        if BLOCK_M > 6:
            a6 = _row_dot(a6, w, x_ptr + 6 * stride_xm, kk, k_mask, MASKED, VEC)
        if BLOCK_M > 7:
            a7 = _row_dot(a7, w, x_ptr + 7 * stride_xm, kk, k_mask, MASKED, VEC)
        return a0, a1, a2, a3, a4, a5, a6, a7

    @triton.jit
    def _join_rows(t0, t1, t2, t3, t4, t5, t6, t7, P: tl.constexpr):
        """Stack P (1, 2, 4 or 8) same-shape tensors along log2(P) (at least one) new trailing axes of size 2 (or 1);
        flattened row-major, they give back t0..t{P-1} in order. Lets the epilogue do one reduction for all rows
        instead of one shared-memory round trip (and barriers) per row."""
        if P == 1:
            r = tl.expand_dims(t0, len(t0.shape))
        elif P == 2:
            r = tl.join(t0, t1)
        elif P == 4:  # join(join(a, c), join(b, d))[..., i, j] = row 2 * i + j
            r = tl.join(tl.join(t0, t2), tl.join(t1, t3))
        else:
            r = tl.join(tl.join(tl.join(t0, t4), tl.join(t2, t6)), tl.join(tl.join(t1, t5), tl.join(t3, t7)))
        return r

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, b_ptr, s_ptr, y_ptr, N, K, stride_xm, stride_wn, stride_ym,
                     BLOCK_M: tl.constexpr, P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, VEC: tl.constexpr,
                     NUM_STAGES: tl.constexpr, HAS_BIAS: tl.constexpr, ALIGNED: tl.constexpr, HAS_SCALE: tl.constexpr):
        pid = tl.program_id(0)
        if ALIGNED:  # strides are multiples of VEC: lets 16-byte loads through when they are not multiples of 16
            stride_wn = tl.multiple_of(stride_wn, VEC)
            stride_xm = tl.multiple_of(stride_xm, VEC)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        rows = tl.minimum(offs_n, N - 1)  # clamped: W loads need no mask along N
        w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_wn
        offs_k = tl.arange(0, BLOCK_K)
        a0 = tl.zeros([BLOCK_N, BLOCK_K // VEC], dtype=tl.float32)
        a1 = tl.zeros([BLOCK_N, BLOCK_K // VEC], dtype=tl.float32)  # a1..a7: dead (removed) for rows >= BLOCK_M
        a2 = tl.zeros([BLOCK_N, BLOCK_K // VEC], dtype=tl.float32)
        a3 = tl.zeros([BLOCK_N, BLOCK_K // VEC], dtype=tl.float32)
        a4 = tl.zeros([BLOCK_N, BLOCK_K // VEC], dtype=tl.float32)
        a5 = tl.zeros([BLOCK_N, BLOCK_K // VEC], dtype=tl.float32)
        a6 = tl.zeros([BLOCK_N, BLOCK_K // VEC], dtype=tl.float32)
        a7 = tl.zeros([BLOCK_N, BLOCK_K // VEC], dtype=tl.float32)
        k_full = (K // BLOCK_K) * BLOCK_K
        for k0 in tl.range(0, k_full, BLOCK_K, num_stages=NUM_STAGES):
            kk = tl.multiple_of(k0, BLOCK_K) + offs_k
            a0, a1, a2, a3, a4, a5, a6, a7 = _tile(a0, a1, a2, a3, a4, a5, a6, a7, w_rows, x_ptr, stride_xm, kk,
                                                   K, False, BLOCK_M, VEC)
        if k_full < K:
            kk = k_full + offs_k
            a0, a1, a2, a3, a4, a5, a6, a7 = _tile(a0, a1, a2, a3, a4, a5, a6, a7, w_rows, x_ptr, stride_xm, kk,
                                                   K, True, BLOCK_M, VEC)
        # epilogue: [BLOCK_N, BLOCK_K // VEC, P] -> one cross-thread sum over K -> [BLOCK_N, P] (P = rows padded to 2^i)
        acc = tl.reshape(tl.sum(_join_rows(a0, a1, a2, a3, a4, a5, a6, a7, P), axis=1), [BLOCK_N, P])
        r0 = tl.zeros_like(offs_n)
        m = tl.reshape(_join_rows(r0, r0 + 1, r0 + 2, r0 + 3, r0 + 4, r0 + 5, r0 + 6, r0 + 7, P), [BLOCK_N, P])
        if HAS_SCALE:
            acc *= tl.load(s_ptr + rows).to(tl.float32)[:, None]
        if HAS_BIAS:
            acc += tl.load(b_ptr + rows).to(tl.float32)[:, None]
        tl.store(y_ptr + m * stride_ym + offs_n[:, None], acc.to(y_ptr.dtype.element_ty),
                 mask=n_mask[:, None] & (m < BLOCK_M))


@dataclass(frozen=True)
class GemvConfig:
    block_n: int  # output columns (rows of W) per program, power of two
    block_k: int  # K per loop step, power of two >= 16 bytes; fastest with block_k >= 256 * num_warps (2-byte)
    num_warps: int = 4
    num_stages: int = 1  # > 1: W tiles staged through shared memory that many steps ahead (cp.async)


_SMS_GUESS = 132  # an H100 SXM's SMs; only shapes the default table (the benchmark prints a measured one)


# tuned tiles per shape (benchmarks/gemv_bench.py's table for an H100 80GB HBM3); other shapes use the rule below
_TUNED: dict[tuple[int, int, int], GemvConfig] = {  # (M, N, K) -> config
    (1, 4096, 1024): GemvConfig(4, 1024, 4, 1),
    (2, 4096, 1024): GemvConfig(2, 512, 2, 1),
    (1, 6144, 1024): GemvConfig(2, 512, 2, 1),
    (2, 6144, 1024): GemvConfig(4, 512, 2, 1),
    (1, 49152, 1024): GemvConfig(2, 1024, 4, 1),
    (2, 49152, 1024): GemvConfig(2, 512, 2, 1),
    (1, 1024, 2048): GemvConfig(4, 2048, 4, 1),
    (2, 1024, 2048): GemvConfig(1, 1024, 4, 1),
    (1, 2048, 2048): GemvConfig(4, 2048, 4, 1),
    (2, 2048, 2048): GemvConfig(2, 1024, 2, 1),
    (1, 3072, 2048): GemvConfig(4, 2048, 4, 1),
    (2, 3072, 2048): GemvConfig(2, 1024, 2, 1),
    (1, 16384, 2048): GemvConfig(2, 2048, 8, 1),
    (2, 16384, 2048): GemvConfig(2, 2048, 4, 1),
    (1, 1024, 3072): GemvConfig(2, 2048, 8, 1),
    (2, 1024, 3072): GemvConfig(1, 1024, 4, 1),
    (1, 4096, 4096): GemvConfig(1, 2048, 4, 1),
    (2, 4096, 4096): GemvConfig(2, 2048, 4, 1),
    (1, 6144, 4096): GemvConfig(1, 2048, 4, 1),
    (2, 6144, 4096): GemvConfig(2, 2048, 4, 1),
    (1, 28672, 4096): GemvConfig(1, 2048, 8, 1),
    (2, 28672, 4096): GemvConfig(2, 2048, 4, 1),
    (1, 2048, 8192): GemvConfig(1, 2048, 4, 1),
    (2, 2048, 8192): GemvConfig(2, 2048, 4, 1),
    (1, 4096, 14336): GemvConfig(2, 2048, 8, 1),
    (2, 4096, 14336): GemvConfig(2, 2048, 4, 1),
}


def gemv_config(m: int, n: int, k: int) -> GemvConfig:
    """Tiles: the measured table, else a rule (benchmarks/gemv_bench.py prints a measured table per GPU).

    block_k = 256 * num_warps (16-byte loads, x's layout a slice of W's) capped by K; block_n the largest power
    of two <= 16 that still gives ~4 programs per SM (several W tiles in flight per SM), and <= 64 // m so that
    the per-thread fp32 accumulators (m * block_n per 16-byte vector) stay small."""
    tuned = _TUNED.get((m, n, k))
    if tuned is not None:
        return tuned
    num_warps = 4 if k >= 1024 else 2
    block_k = min(256 * num_warps, max(16, next_pow2(k)))
    cap = max(1, min(16, 64 // max(m, 1)))
    block_n = 1
    while block_n < cap and -(-n // (2 * block_n)) >= 4 * _SMS_GUESS:
        block_n *= 2
    num_stages = 2 if k >= 4 * block_k else 1
    return GemvConfig(block_n, block_k, num_warps, num_stages)


def _check(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, w_scale: torch.Tensor | None) -> None:
    assert x.dim() == 2 and w.dim() == 2 and x.shape[1] == w.shape[1], (x.shape, w.shape)
    assert 1 <= x.shape[0] <= MAX_M, f"gemv handles 1..{MAX_M} rows, got {x.shape[0]}"
    if w_scale is not None:
        assert w.dtype == torch.float8_e4m3fn and w_scale.shape == (w.shape[0],) and w_scale.stride(0) == 1
    else:
        assert x.dtype == w.dtype, (x.dtype, w.dtype)
    assert bias is None or bias.shape == (w.shape[0],)
    assert w.stride(1) == 1 and (bias is None or bias.stride(0) == 1), "W rows (and bias) must be contiguous"


def gemv_triton(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, block_n: int | None = None,
                block_k: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
                out: torch.Tensor | None = None, w_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x: [M, K] (rows contiguous, any row stride), w: [N, K] (rows contiguous) -> [M, N] in x.dtype.
    Tile arguments left None come from gemv_config(M, N, K). `out` ([M, N], unit column stride) is written
    in place when given. w_scale [N] float32: w holds float8_e4m3fn codes and column n is scaled by w_scale[n]."""
    if x.stride(1) != 1:
        x = x.contiguous()
    _check(x, w, bias, w_scale)
    m, k = x.shape
    n = w.shape[0]
    cfg = gemv_config(m, n, k)
    bn = block_n or cfg.block_n
    vec = max(1, 16 // w.element_size())  # one 16-byte load of W per thread and step
    # fp8 W: twice the table's K tile (the same bytes of W per thread), at most K rounded up
    bk = block_k or (cfg.block_k if w.element_size() > 1 else min(2 * cfg.block_k, max(cfg.block_k, next_pow2(k))))
    stages = num_stages or cfg.num_stages
    assert bn & (bn - 1) == 0 and bk & (bk - 1) == 0 and bk >= vec, (bn, bk)
    if out is None:
        out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    assert out.shape == (m, n) and out.stride(1) == 1
    aligned = (k % vec == 0 and w.stride(0) % vec == 0 and x.stride(0) % vec == 0
               and w.data_ptr() % 16 == 0 and x.data_ptr() % 16 == 0)
    _gemv_kernel[(triton.cdiv(n, bn),)](
        x, w, bias if bias is not None else w, w_scale if w_scale is not None else w, out, n, k,
        x.stride(0), w.stride(0), out.stride(0),
        BLOCK_M=m, P=next_pow2(m), BLOCK_N=bn, BLOCK_K=bk, VEC=vec, NUM_STAGES=stages,
        HAS_BIAS=bias is not None, ALIGNED=aligned, HAS_SCALE=w_scale is not None,
        num_warps=num_warps or cfg.num_warps, num_stages=stages)
    return out


def gemv_supported(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, max_m: int = MAX_M) -> bool:
    """Whether the Triton kernel takes x [..., K] @ w[N, K]^T here: CUDA (and Triton), bf16/fp16 x and w of one
    dtype, 1..max_m rows, K % 8 == 0, unit inner strides, and x viewable as [rows, K] without a copy."""
    k = x.shape[-1]
    return (use_triton(x) and x.dtype in (torch.bfloat16, torch.float16) and w.dtype == x.dtype and w.dim() == 2
            and 0 < x.numel() <= min(max_m, MAX_M) * k and k % 8 == 0 and w.shape[1] == k and w.stride(1) == 1
            and x.stride(-1) == 1 and (x.dim() == 2 or x.is_contiguous())
            and (bias is None or (bias.dim() == 1 and bias.stride(0) == 1)))


def gemv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [M, K] (M <= 8), w: [N, K] -> [M, N] in x.dtype, fp32 accumulation. Triton on CUDA, else gemv_ref."""
    if not use_triton(x):
        return gemv_ref(x, w, bias)
    return gemv_triton(x, w, bias)


__all__ = ["MAX_M", "GemvConfig", "gemv", "gemv_config", "gemv_ref", "gemv_supported", "gemv_triton"]
