"""Gated MLP activations: act(gate) * up with x = [gate | up] along the last dim.
silu_and_mul_a8 also quantizes the product for a decode GEMV with int8 activations (kernels/quant_gemv_a8.py)
in the same launch."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton_utils import HAS_TRITON, use_triton
from .quant_gemv_a8 import QuantizedX, empty_quantized_x

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .quant_gemv_a8 import _quantize_store

    @triton.jit
    def _act_and_mul_kernel(x_ptr, out_ptr, q_ptr, d_ptr, s_ptr, stride_x, stride_out, stride_q, stride_d, inter,
                            GELU_TANH: tl.constexpr, BLOCK: tl.constexpr, A8_T: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < inter
        gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + row * stride_x + inter + offs, mask=mask, other=0.0).to(tl.float32)
        if GELU_TANH:  # 0.5 * g * (1 + tanh(sqrt(2/pi) * (g + 0.044715 g^3))); tanh(z) = 2 sigmoid(2z) - 1
            z = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
            act = gate * tl.sigmoid(2.0 * z)
        else:
            act = gate * tl.sigmoid(gate)
        y = (act * up).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + row * stride_out + offs, y, mask=mask)
        if A8_T > 0:  # int8 activations for the down projection's decode GEMV (BLOCK: whole chunks)
            _quantize_store(y.to(tl.float32), tl.program_id(1) * (BLOCK // (8 * A8_T)), inter // (8 * A8_T),
                            q_ptr + row * stride_q, d_ptr + row * stride_d, s_ptr + row * stride_d, A8_T, BLOCK)


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    # x: [..., 2 * inter] -> [..., inter]  (as HF: act in x.dtype, then multiply)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_tanh_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    # x: [..., 2 * inter] -> [..., inter]
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


def _act_and_mul_triton(x: torch.Tensor, gelu_tanh: bool, xa: QuantizedX | None = None) -> torch.Tensor:
    inter = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * inter)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape[0], inter, dtype=x.dtype, device=x.device)
    block = 1024
    q, d, s = (xa.xq, xa.dx, xa.xs) if xa is not None else (out, out, out)
    if x2.shape[0] > 0:
        _act_and_mul_kernel[(x2.shape[0], -(-inter // block))](
            x2, out, q, d, s, x2.stride(0), out.stride(0), q.stride(0), d.stride(0), inter, GELU_TANH=gelu_tanh,
            BLOCK=block, A8_T=16 // xa.bits if xa is not None else 0, num_warps=4)
    return out.view(*x.shape[:-1], inter)


def silu_and_mul_triton(x: torch.Tensor) -> torch.Tensor:
    return _act_and_mul_triton(x, gelu_tanh=False)


def gelu_tanh_and_mul_triton(x: torch.Tensor) -> torch.Tensor:
    return _act_and_mul_triton(x, gelu_tanh=True)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[..., :I]) * x[..., I:]; x: [..., 2 * I] -> [..., I] (Llama, Qwen, Mistral MLP)."""
    return silu_and_mul_triton(x) if use_triton(x) else silu_and_mul_ref(x)


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(x[..., :I]) * x[..., I:]; x: [..., 2 * I] -> [..., I] (Gemma MLP)."""
    return gelu_tanh_and_mul_triton(x) if use_triton(x) else gelu_tanh_and_mul_ref(x)


def silu_and_mul_a8(x: torch.Tensor, bits: int | None) -> tuple[torch.Tensor, QuantizedX | None]:
    """silu_and_mul -> (out, out quantized for a dp4a GEMV over `bits`-bit codes, or None); quantized in the same
    launch when `bits` is set and the Triton kernel runs (x: [M, 2 I], I a multiple of the chunk)."""
    inter = x.shape[-1] // 2
    if bits is None or not use_triton(x) or x.dim() != 2 or inter % (128 // bits):
        return silu_and_mul(x), None
    xa = empty_quantized_x(x.shape[0], inter, bits, x.device)
    return _act_and_mul_triton(x, False, xa), xa
