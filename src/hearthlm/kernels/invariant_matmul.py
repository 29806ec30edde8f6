"""Batch-invariant dense matmul (--batch-invariant): y = x @ w^T + b with a per-element reduction order that does
not depend on the row count M.

cuBLAS picks its algorithm (tile shape, split-K, stream-K) from M, so a row's output changes with the batch it
rides in. Here every output element sums K in the same fixed chunks whatever M is:
  * the K loop steps BLOCK_K at a time from the split's start, each chunk one chained tensor-core accumulate;
  * split-K is chosen from (N, K) only (`splits_for`), and the partials are summed in split order by
    `_reduce_kernel` (a sequential loop, not a tree);
  * the M tile (BLOCK_M, warps) may follow M only where the tile shapes were checked to give the same bits on
    this device (`m_tiles_agree`: each tensor-core instruction's arithmetic per element is the same for every
    tile shape there); otherwise one tile shape serves every M.
The torch reference is F.linear (CPU runs the reference; the CPU default path is invariant by construction).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ._triton_utils import HAS_TRITON, num_sms, use_triton

BLOCK_N, BLOCK_K = 64, 64
FIXED_TILE = (64, 4)  # (BLOCK_M, num_warps) for every M when the tile shapes disagree
M_TILES = ((16, 16, 4), (64, 64, 4), (1 << 62, 128, 8))  # (up to M rows, BLOCK_M, num_warps)
MIN_K_PER_SPLIT = 512

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["M"])
    def _mm_kernel(x_ptr, w_ptr, b_ptr, out_ptr, part_ptr, M, N, K, stride_xm, stride_wn, stride_om, k_per_split,
                   HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
        pid_m, pid_n, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask, n_mask = offs_m < M, offs_n < N
        k_lo = pid_s * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K)
        x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
        w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < k_hi
            x = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_rows + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            if IEEE:  # float32 operands: exact products, no TF32
                acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, tl.trans(w), acc)
        if SPLIT == 1:
            if HAS_BIAS:
                acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :],
                     acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])
        else:  # partials: [SPLIT, M, N] float32
            part = part_ptr + (pid_s * M + offs_m.to(tl.int64))[:, None] * N + offs_n[None, :]
            tl.store(part, acc, mask=m_mask[:, None] & n_mask[None, :])

    @triton.jit(do_not_specialize=["M"])
    def _reduce_kernel(part_ptr, b_ptr, out_ptr, M, N, stride_om, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
                       BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for s in range(SPLIT):  # split order, one add at a time
            acc += tl.load(part_ptr + (s * M + row) * N + offs, mask=mask, other=0.0)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_om + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def splits_for(n: int, k: int, device: torch.device) -> int:
    """Split-K count from the weight's shape alone: enough (column tile, split) programs to give every SM about
    two at the smallest M, each split at least MIN_K_PER_SPLIT deep and a whole number of BLOCK_K chunks."""
    tiles = -(-n // BLOCK_N)
    want = max(1, round(2 * num_sms(device) / tiles))
    return max(1, min(want, k // MIN_K_PER_SPLIT))


def _launch(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, tile: tuple[int, int]) -> torch.Tensor:
    m, k = x.shape
    n = w.shape[0]
    block_m, warps = tile
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    split = splits_for(n, k, x.device)
    chunks = -(-k // BLOCK_K)
    k_per_split = -(-chunks // split) * BLOCK_K  # whole chunks, from (N, K) only: the same for every M
    split = -(-k // k_per_split)
    part = torch.empty(split, m, n, dtype=torch.float32, device=x.device) if split > 1 else out
    b = bias if bias is not None else out
    _mm_kernel[(-(-m // block_m), -(-n // BLOCK_N), split)](
        x, w, b, out, part, m, n, k, x.stride(0), w.stride(0), out.stride(0), k_per_split,
        HAS_BIAS=bias is not None and split == 1, SPLIT=split, BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        IEEE=x.dtype == torch.float32, num_warps=warps, num_stages=3)
    if split > 1:
        _reduce_kernel[(m, -(-n // 1024))](part, b, out, m, n, out.stride(0), HAS_BIAS=bias is not None,
                                           SPLIT=split, BLOCK=1024, num_warps=4)
    return out


def _tile_for(m: int, device: torch.device) -> tuple[int, int]:
    if not m_tiles_agree(device.index if device.index is not None else torch.cuda.current_device()):
        return FIXED_TILE
    return next((bm, warps) for up_to, bm, warps in M_TILES if m <= up_to)


@functools.cache
def m_tiles_agree(device_index: int) -> bool:
    """Whether every M tile of M_TILES gives the same bits per row on this GPU (checked once per process on
    random data with the shapes of a wide projection); if not, FIXED_TILE serves every M."""
    dev = torch.device("cuda", device_index)
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(160, 1024, device=dev, generator=g).to(torch.bfloat16)
    w = torch.randn(320, 1024, device=dev, generator=g).to(torch.bfloat16)
    ref = _launch(x, w, None, FIXED_TILE)
    return all(torch.equal(_launch(x, w, None, (bm, warps)), ref) for _, bm, warps in M_TILES)


def invariant_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [..., K] @ w: [N, K]^T (+ bias [N]) -> [..., N] in x.dtype; each row's result is independent of the
    other rows (Triton on CUDA, F.linear elsewhere)."""
    if not use_triton(x) or x.dtype not in (torch.bfloat16, torch.float16, torch.float32) or w.dtype != x.dtype:
        return F.linear(x, w, bias)
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    w = w if w.stride(-1) == 1 else w.contiguous()
    y = _launch(x2, w, bias, _tile_for(x2.shape[0], x.device))
    return y.view(*x.shape[:-1], w.shape[0])
