"""RMSNorm with optional fused residual add, in HF's two flavours.

Llama style (default): out = (w + offset) * normed.to(x.dtype)   (HF LlamaRMSNorm, weight in x.dtype)
Gemma style:           out = (normed * (w + offset)).to(x.dtype)  (HF Gemma2RMSNorm with offset 1.0)
normed = h * rsqrt(mean(h^2) + eps) with h in fp32. With a residual, h = x + residual rounded to
residual.dtype first (as the eager model's residual add does), and that sum is returned too.
rms_norm_a8 also quantizes the output for a decode GEMV with int8 activations (kernels/quant_gemv_a8.py) in
the same launch.
"""
from __future__ import annotations

import torch

from ._triton_utils import HAS_TRITON, next_pow2, use_triton
from .quant_gemv_a8 import QuantizedX, empty_quantized_x

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .quant_gemv_a8 import _quantize_store

    @triton.jit
    def _rms_norm_kernel(
        x_ptr, res_ptr, w_ptr, out_ptr, new_res_ptr, q_ptr, d_ptr, s_ptr,
        stride_x, stride_res, stride_out, stride_new_res, stride_q, stride_d,
        hidden, eps, weight_offset,
        HAS_RESIDUAL: tl.constexpr, GEMMA_STYLE: tl.constexpr, BLOCK: tl.constexpr, A8_T: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < hidden
        h = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + row * stride_res + offs, mask=mask, other=0.0).to(tl.float32)
            summed = (h + r).to(new_res_ptr.dtype.element_ty)
            tl.store(new_res_ptr + row * stride_new_res + offs, summed, mask=mask)
            h = summed.to(tl.float32)
        var = tl.sum(h * h, 0) / hidden
        normed = h * tl.rsqrt(var + eps)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32) + weight_offset
        if not GEMMA_STYLE:
            normed = normed.to(out_ptr.dtype.element_ty).to(tl.float32)
        y = (normed * w).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + row * stride_out + offs, y, mask=mask)
        if A8_T > 0:  # int8 activations for the next decode GEMV (A8_T codes per 16-bit word of its weights)
            _quantize_store(y.to(tl.float32), 0, hidden // (8 * A8_T), q_ptr + row * stride_q,
                            d_ptr + row * stride_d, s_ptr + row * stride_d, A8_T, BLOCK)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                 weight_offset: float = 0.0, gemma_style: bool = False
                 ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    # x, residual: [..., hidden]; weight: [hidden] -> out [..., hidden] (x.dtype) [, new_residual]
    new_residual = None
    h = x.float()
    if residual is not None:
        new_residual = (h + residual.float()).to(residual.dtype)
        h = new_residual.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    w = weight.float() + weight_offset
    if not gemma_style:
        h = h.to(x.dtype).float()
    out = (h * w).to(x.dtype)
    return out if new_residual is None else (out, new_residual)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                    weight_offset: float = 0.0, gemma_style: bool = False, xa: QuantizedX | None = None
                    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    hidden = x.shape[-1]
    x2 = x.reshape(-1, hidden)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if residual is not None:
        r2 = residual.reshape(-1, hidden)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
        new_res = torch.empty(r2.shape, dtype=residual.dtype, device=x.device)
    else:
        r2 = new_res = x2  # unused
    block = max(next_pow2(hidden), 32)
    q, d, s = (xa.xq, xa.dx, xa.xs) if xa is not None else (x2, x2, x2)
    if x2.shape[0] > 0:
        _rms_norm_kernel[(x2.shape[0],)](
            x2, r2, weight, out, new_res, q, d, s,
            x2.stride(0), r2.stride(0), out.stride(0), new_res.stride(0), q.stride(0), d.stride(0),
            hidden, float(eps), float(weight_offset),
            HAS_RESIDUAL=residual is not None, GEMMA_STYLE=gemma_style, BLOCK=block,
            A8_T=16 // xa.bits if xa is not None else 0, num_warps=min(16, max(1, block // 512)),
        )
    out = out.view(x.shape)
    return out if residual is None else (out, new_res.view(residual.shape))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             weight_offset: float = 0.0, gemma_style: bool = False
             ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim; returns out, or (out, x + residual) when residual is given.

    x: [..., hidden]; weight: [hidden]; residual: [..., hidden] or None.
    Gemma 2: weight_offset=1.0, gemma_style=True. Llama/Qwen: defaults.
    """
    if use_triton(x):
        return rms_norm_triton(x, weight, eps, residual, weight_offset, gemma_style)
    return rms_norm_ref(x, weight, eps, residual, weight_offset, gemma_style)


def rms_norm_a8(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None,
                bits: int | None) -> tuple[torch.Tensor, torch.Tensor | None, QuantizedX | None]:
    """Llama-style rms_norm -> (out, new residual or None, out quantized for a dp4a GEMV over `bits`-bit codes, or
    None). Quantizes in the same launch when `bits` is set and the Triton kernel runs (x: [M, hidden], hidden a
    multiple of the chunk); otherwise the GEMV quantizes for itself."""
    ok = bits is not None and use_triton(x) and x.dim() == 2 and x.shape[-1] % (128 // bits) == 0
    xa = empty_quantized_x(x.shape[0], x.shape[-1], bits, x.device) if ok else None
    r = rms_norm_triton(x, weight, eps, residual, xa=xa) if ok else rms_norm(x, weight, eps, residual)
    out, new_res = r if residual is not None else (r, None)
    return out, new_res, xa
