"""y = x @ W^T with W kept as group-wise codes on the GPU: w[n, k] = code[n, k] * scale[n, g] + min[n, g],
g = k // group (group 16 or 32, any power of two >= 16). Two code layouts:

  bits=4  codes [N, K // 2] uint8, two 4-bit codes per byte: byte j holds k = 2j (low nibble), 2j + 1 (high)
          (Q4_0, Q4_1, Q4_K -- exact up to the rounding of scale/min to their storage dtype -- and int4)
  bits=8  codes [N, K] int8 (Q8_0, int8; Q5_0/1, Q5_K, Q6_K repacked one code per byte)
scale, min: [N, K // group] float16 or float32 (min None = symmetric codes, e.g. Q8_0, Q6_K, int8).

Kernels (fp32 accumulation both):
  _gemv_kernel  small M (decode): CUDA-core dot products, one CTA per (BLOCK_N rows, K split); split-K makes
                enough CTAs to stream W at HBM bandwidth; partial sums [splits, M, N] fp32 are summed after
  _mm_kernel    larger M (prefill): tl.dot on tiles dequantized in registers, optional split-K as well
`quant_matmul` dispatches (Triton for CUDA tensors, else the torch reference `quant_matmul_ref`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._triton_utils import HAS_TRITON, num_sms, use_triton

GEMV_MAX_M = 4  # rows up to which the CUDA-core GEMV kernel runs; above, the tl.dot kernel


# ----------------------------------------------------------------------------------------- layouts + reference
def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """[N, K] codes in 0..15 (any int dtype) -> [N, K // 2] uint8: byte j = code[2j] | code[2j + 1] << 4."""
    c = codes.to(torch.uint8)
    return (c[:, 0::2] | (c[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[N, K // 2] uint8 -> [N, K] uint8 codes (inverse of pack_int4)."""
    return torch.stack([packed & 15, packed >> 4], -1).reshape(packed.shape[0], -1)


def dequantize_ref(codes: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor | None, bits: int,
                   group: int) -> torch.Tensor:
    """-> W [N, K] float32."""
    q = unpack_int4(codes) if bits == 4 else codes
    n, k = q.shape
    w = q.float().view(n, k // group, group) * scale.float()[..., None]
    if mins is not None:
        w = w + mins.float()[..., None]
    return w.view(n, k)


def quant_matmul_ref(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor | None,
                     bits: int, group: int) -> torch.Tensor:
    """x: [M, K] -> [M, N] in x.dtype (dequantize, then matmul in fp32)."""
    return (x.float() @ dequantize_ref(codes, scale, mins, bits, group).t()).to(x.dtype)


# ----------------------------------------------------------------------------------------------- Triton kernels
if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, s_ptr, m_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_sn,
                     stride_os, stride_om, C, c_per_split,
                     BITS: tl.constexpr, GROUP: tl.constexpr, HAS_MIN: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        offs_m = tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
        s_rows = s_ptr + offs_n.to(tl.int64)[:, None] * stride_sn
        m_rows = m_ptr + offs_n.to(tl.int64)[:, None] * stride_sn
        x_rows = x_ptr + offs_m[:, None] * stride_xm
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        # loops run over code columns (bytes: K // 2 for 4-bit codes) so that W loads stay vectorised
        c_start = pid_s * c_per_split
        c_end = tl.minimum(c_start + c_per_split, C)
        if BITS == 4:
            offs_b = tl.arange(0, BLOCK_K // 2)
            for c0 in range(c_start, c_end, BLOCK_K // 2):
                cb = c0 + offs_b
                ke = 2 * cb  # k of the low nibbles; K is a multiple of the group, so ke + 1 < K too
                k_mask = cb < c_end
                wm = n_mask[:, None] & k_mask[None, :]
                q = tl.load(w_rows + cb[None, :], mask=wm, other=0)
                g = (ke // GROUP)[None, :]
                s = tl.load(s_rows + g, mask=wm, other=0.0).to(tl.float32)
                lo = (q & 15).to(tl.float32) * s
                hi = (q >> 4).to(tl.float32) * s
                if HAS_MIN:
                    mn = tl.load(m_rows + g, mask=wm, other=0.0).to(tl.float32)
                    lo += mn
                    hi += mn
                xm = m_mask[:, None] & k_mask[None, :]
                xe = tl.load(x_rows + ke[None, :], mask=xm, other=0.0).to(tl.float32)
                xo = tl.load(x_rows + ke[None, :] + 1, mask=xm, other=0.0).to(tl.float32)
                acc += tl.sum(lo[None, :, :] * xe[:, None, :] + hi[None, :, :] * xo[:, None, :], axis=2)
        else:
            offs_k = tl.arange(0, BLOCK_K)
            for c0 in range(c_start, c_end, BLOCK_K):
                kk = c0 + offs_k
                k_mask = kk < c_end
                wm = n_mask[:, None] & k_mask[None, :]
                q = tl.load(w_rows + kk[None, :], mask=wm, other=0)
                g = (kk // GROUP)[None, :]
                w = q.to(tl.float32) * tl.load(s_rows + g, mask=wm, other=0.0).to(tl.float32)
                if HAS_MIN:
                    w += tl.load(m_rows + g, mask=wm, other=0.0).to(tl.float32)
                xv = tl.load(x_rows + kk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
                acc += tl.sum(w[None, :, :] * xv[:, None, :], axis=2)
        out = out_ptr + pid_s * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])

    @triton.jit
    def _mm_kernel(x_ptr, w_ptr, s_ptr, m_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_sn,
                   stride_os, stride_om, C, c_per_split,
                   BITS: tl.constexpr, GROUP: tl.constexpr, HAS_MIN: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_s = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = offs_m < M
        n_mask = offs_n < N
        # W tiles are read as [k, n] (contiguous along k) so that they feed tl.dot as the right operand
        w_cols = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn
        s_cols = s_ptr + offs_n.to(tl.int64)[None, :] * stride_sn
        m_cols = m_ptr + offs_n.to(tl.int64)[None, :] * stride_sn
        x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        c_start = pid_s * c_per_split  # code columns, as in _gemv_kernel
        c_end = tl.minimum(c_start + c_per_split, C)
        k_end = c_end * (2 if BITS == 4 else 1)
        offs_k = tl.arange(0, BLOCK_K)
        for c0 in range(c_start, c_end, BLOCK_K // 2 if BITS == 4 else BLOCK_K):
            kk = c0 * (2 if BITS == 4 else 1) + offs_k
            x = tl.load(x_rows + kk[None, :], mask=m_mask[:, None] & (kk < k_end)[None, :], other=0.0)
            if BITS == 4:
                cb = c0 + tl.arange(0, BLOCK_K // 2)
                wm = (cb < c_end)[:, None] & n_mask[None, :]
                q = tl.load(w_cols + cb[:, None], mask=wm, other=0)  # [BLOCK_K // 2, BLOCK_N]
                g = (2 * cb // GROUP)[:, None]
                s = tl.load(s_cols + g, mask=wm, other=0.0).to(tl.float32)
                lo = (q & 15).to(tl.float32) * s
                hi = (q >> 4).to(tl.float32) * s
                if HAS_MIN:
                    mn = tl.load(m_cols + g, mask=wm, other=0.0).to(tl.float32)
                    lo += mn
                    hi += mn
                xe, xo = tl.split(tl.reshape(x, [BLOCK_M, BLOCK_K // 2, 2]))
                acc = tl.dot(xe, lo.to(x.dtype), acc)
                acc = tl.dot(xo, hi.to(x.dtype), acc)
            else:
                wm = (kk < k_end)[:, None] & n_mask[None, :]
                q = tl.load(w_cols + kk[:, None], mask=wm, other=0)  # [BLOCK_K, BLOCK_N]
                g = (kk // GROUP)[:, None]
                w = q.to(tl.float32) * tl.load(s_cols + g, mask=wm, other=0.0).to(tl.float32)
                if HAS_MIN:
                    w += tl.load(m_cols + g, mask=wm, other=0.0).to(tl.float32)
                acc = tl.dot(x, w.to(x.dtype), acc)
        out = out_ptr + pid_s * stride_os + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@dataclass(frozen=True)
class KernelConfig:
    block_m: int
    block_n: int
    block_k: int
    split_k: int  # 0 = choose from the grid size
    num_warps: int = 4
    num_stages: int = 3


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def gemv_config(m: int, n: int, k: int, bits: int) -> KernelConfig:
    """Defaults (benchmarks/quant_matmul_bench.py --sweep prints better ones per GPU): 32 rows x 4 KB of codes per
    CTA step for M = 1 (register tiles stay <= 8K fp32 values across 128 threads), split-K for ~2 waves."""
    bm = _next_pow2(m)
    bk = {1: 128, 2: 64}.get(bm, 32) * (2 if bits == 4 else 1)
    return KernelConfig(bm, 32, min(bk, max(32, _next_pow2(k))), 0, 4, 2)


def mm_config(m: int, n: int, k: int, bits: int) -> KernelConfig:
    if m <= 16:
        return KernelConfig(16, 64, 128, 0, 4, 3)
    if m <= 64:
        return KernelConfig(64, 64, 64, 0, 4, 3)
    return KernelConfig(128, 128, 64, 1, 8, 3)


def _splits(tiles: int, k: int, block_k: int, device: torch.device) -> int:
    """Enough K splits for ~2 waves of CTAs, each split keeping >= 4 K tiles of work."""
    want = _cdiv(2 * num_sms(device), tiles)
    return max(1, min(want, k // (4 * block_k)))


def _launch(kernel, grid_mn: tuple[int, ...], cfg: KernelConfig, x, codes, scale, mins, bits, group, out_dtype):
    m, k = x.shape
    n = codes.shape[0]
    split = cfg.split_k or _splits(grid_mn[0] * grid_mn[-1], k, cfg.block_k, x.device)
    k_per_split = _cdiv(_cdiv(k, split), cfg.block_k) * cfg.block_k
    split = _cdiv(k, k_per_split)
    out = torch.empty((split, m, n) if split > 1 else (1, m, n), device=x.device,
                      dtype=torch.float32 if split > 1 else out_dtype)
    kernel[(*grid_mn, split)](
        x, codes, scale, mins if mins is not None else scale, out, m, n, k, x.stride(0), codes.stride(0),
        scale.stride(0), out.stride(0), out.stride(1), codes.shape[1], k_per_split // (2 if bits == 4 else 1),
        BITS=bits, GROUP=group, HAS_MIN=mins is not None, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out[0] if split == 1 else out.sum(0).to(out_dtype)


def _check(x, codes, scale, mins, bits, group):
    assert x.dim() == 2 and bits in (4, 8) and group >= 16 and group & (group - 1) == 0, (x.shape, bits, group)
    k = codes.shape[1] * (2 if bits == 4 else 1)
    assert x.shape[1] == k and k % group == 0 and scale.shape == (codes.shape[0], k // group), (x.shape, scale.shape)
    assert codes.is_contiguous() and scale.is_contiguous() and (mins is None or mins.shape == scale.shape)


def quant_gemv_triton(x, codes, scale, mins, bits: int, group: int, cfg: KernelConfig | None = None,
                      out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Small-M kernel. x: [M, K] -> [M, N]. cfg.block_m must be >= M."""
    x = x.contiguous()
    _check(x, codes, scale, mins, bits, group)
    cfg = cfg or gemv_config(x.shape[0], codes.shape[0], x.shape[1], bits)
    assert cfg.block_m >= x.shape[0]
    grid = (triton.cdiv(codes.shape[0], cfg.block_n),)
    return _launch(_gemv_kernel, grid, cfg, x, codes, scale, mins, bits, group, out_dtype or x.dtype)


def quant_mm_triton(x, codes, scale, mins, bits: int, group: int, cfg: KernelConfig | None = None,
                    out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """tl.dot kernel. x: [M, K] -> [M, N]."""
    x = x.contiguous()
    _check(x, codes, scale, mins, bits, group)
    cfg = cfg or mm_config(x.shape[0], codes.shape[0], x.shape[1], bits)
    grid = (triton.cdiv(x.shape[0], cfg.block_m), triton.cdiv(codes.shape[0], cfg.block_n))
    return _launch(_mm_kernel, grid, cfg, x, codes, scale, mins, bits, group, out_dtype or x.dtype)


def quant_matmul(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor | None,
                 bits: int, group: int) -> torch.Tensor:
    """x: [M, K] -> [M, N] in x.dtype. Triton on CUDA (GEMV for M <= GEMV_MAX_M), else the reference."""
    if not use_triton(x):
        return quant_matmul_ref(x, codes, scale, mins, bits, group)
    if x.shape[0] <= GEMV_MAX_M:
        return quant_gemv_triton(x, codes, scale, mins, bits, group)
    return quant_mm_triton(x, codes, scale, mins, bits, group)


__all__ = ["GEMV_MAX_M", "KernelConfig", "dequantize_ref", "gemv_config", "mm_config", "pack_int4",
           "quant_gemv_triton", "quant_matmul", "quant_matmul_ref", "quant_mm_triton", "unpack_int4"]
