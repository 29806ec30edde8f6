"""Per-row dynamic FP8 quantization of activations (for W8A8 matmuls on torch._scaled_mm), one launch.

For each row x of [M, K]: scale = max(|x|) / 448 (at least 1e-12), codes = e4m3(clamp(x / scale, +-448)).
The Triton kernel makes two passes over the row (absmax, then codes) instead of the five to six torch ops the
reference takes; it rounds like torch (the final cast is the hardware's round-to-nearest-even).
"""
from __future__ import annotations

import torch

from ._triton_utils import HAS_TRITON, next_pow2, use_triton
from .kv_quant import FP8_MAX

_MIN_SCALE = 1e-12


def quantize_rows_fp8_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [M, K] -> (codes [M, K] float8_e4m3fn, scales [M, 1] float32)."""
    xf = x.float()
    sx = (xf.abs().amax(1, keepdim=True) / FP8_MAX).clamp(min=_MIN_SCALE)
    return (xf / sx).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), sx


if HAS_TRITON:
    import triton
    import triton.language as tl

    from .cache_write import _store_e4m3

    @triton.jit
    def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, BLOCK: tl.constexpr,
                              HW_CAST: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        amax = tl.zeros([BLOCK], tl.float32)
        for k0 in range(0, K, BLOCK):
            m = k0 + offs < K
            amax = tl.maximum(amax, tl.abs(tl.load(x_ptr + row * stride_x + k0 + offs, mask=m, other=0.0).to(tl.float32)))
        scale = tl.maximum(tl.max(amax, 0) * (1.0 / 448.0), 1e-12)  # as torch divides by a scalar: x * (1 / s)
        tl.store(s_ptr + row, scale)
        for k0 in range(0, K, BLOCK):
            m = k0 + offs < K
            v = tl.load(x_ptr + row * stride_x + k0 + offs, mask=m, other=0.0).to(tl.float32)
            _store_e4m3(tl.math.div_rn(v, scale), q_ptr + row * stride_q + k0 + offs, m, HW_CAST)


def quantize_rows_fp8_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    assert x.dim() == 2 and x.stride(1) == 1
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m:
        block = min(4096, max(16, next_pow2(k)))
        _quantize_rows_kernel[(m,)](x, q, s, k, x.stride(0), q.stride(0), BLOCK=block,
                                    HW_CAST=not triton.knobs.runtime.interpret, num_warps=4 if block >= 1024 else 1)
    return q, s


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [M, K] -> (e4m3 codes [M, K], float32 scales [M, 1]) with x ~= codes * scales. Triton on CUDA."""
    if use_triton(x) and x.stride(-1) == 1:
        return quantize_rows_fp8_triton(x)
    return quantize_rows_fp8_ref(x)


__all__ = ["FP8_MAX", "quantize_rows_fp8", "quantize_rows_fp8_ref", "quantize_rows_fp8_triton"]
