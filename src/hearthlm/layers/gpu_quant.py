"""Weights kept quantized on the GPU.

  QuantWeight  group-wise codes for kernels/quant_matmul.py (decode rows: kernels/quant_gemv_a8.py), repacked
               from a GroupQuant at load into its 16-bit word layout: 4-bit codes (Q4_0, Q4_1, Q4_K, int4-g32) four
               per word; 5/6/8-bit codes (Q5_*, Q6_K, Q8_0, int8-g32) two int8 per word; scale/min per group in
               float16 (float32 when a value would lose range in float16). Serves as a Linear weight and as a
               (row-gathered) embedding.
  Fp8Weight    e4m3 weights with one float32 scale per output channel. Up to FP8_GEMV_MAX_ROWS rows: the decode
               GEMV (kernels/gemv.py) reads the codes directly (W8A16, activations untouched); more rows:
               activations scaled per token at run time (dynamic, one kernel: kernels/fp8_quant.py), product on
               torch._scaled_mm (CUDA, compute capability >= 8.9).
Both implement layers/weight_kernel.WeightKernel; EngineConfig.gemv / kernels are bound when one is built.
"""
from __future__ import annotations

import torch

from ..kernels.fp8_quant import quantize_rows_fp8, quantize_rows_fp8_ref
from ..kernels.gemv import MAX_M as _GEMV_ROWS
from ..kernels.gemv import gemv_triton
from ..kernels._triton_utils import use_triton
from ..kernels.quant_gemv_a8 import QuantizedX, quant_gemv_a8_triton, rows_supported
from ..kernels.quant_matmul import (code_width, dequantize_ref, pack_codes, quant_matmul, quant_matmul_ref,
                                    unpack_codes)
from ..kernels.row_dispatch import FP8_GEMV_MAX_ROWS
from ..quant.group_quant import GroupQuant
from .weight_kernel import WeightKernel, current_options

_F16_MAX, _F16_MIN_NORMAL = 65504.0, 6.2e-5


def _scale_dtype(*ts: torch.Tensor | None) -> torch.dtype:
    """float16 when every nonzero |value| is a normal float16, else float32."""
    for t in ts:
        if t is None or t.numel() == 0:
            continue
        a = t.abs()
        nz = a[a > 0]
        if nz.numel() and (float(nz.max()) > _F16_MAX or float(nz.min()) < _F16_MIN_NORMAL):
            return torch.float32
    return torch.float16


class QuantWeight(WeightKernel):
    """w[n, k] = code * scale[n, k // group] + min[n, k // group] with the codes packed for the GPU kernels."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor | None, bits: int, group: int,
                 dtype: torch.dtype):
        self.codes, self.scale, self.mins = codes, scale, mins  # codes: [N, K * bits // 16] int16 words
        self.bits, self.group, self.dtype = bits, group, dtype
        options = current_options()
        self.gemv_a8 = options.gemv_a8  # EngineConfig.gemv auto
        self._matmul = quant_matmul if options.triton else quant_matmul_ref  # EngineConfig.kernels

    @classmethod
    def from_group(cls, g: GroupQuant, device: torch.device | str | None = None) -> QuantWeight:
        device = torch.device(device) if device is not None else g.codes.device
        bits = 4 if g.bits <= 4 else 8  # 5/6-bit codes fit int8 either sign
        codes = pack_codes(g.codes.to(device), bits)
        mins = None if not bool((g.min != 0).any()) else g.min
        sdt = _scale_dtype(g.scale, mins)
        scale = g.scale.to(device=device, dtype=sdt).contiguous()
        mins = None if mins is None else mins.to(device=device, dtype=sdt).contiguous()
        return cls(codes, scale, mins, bits, g.group, g.dtype)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.codes.shape[0], code_width(self.codes, self.bits)))

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @staticmethod
    def cat(parts: list[QuantWeight]) -> QuantWeight:
        """Concatenate along the output dim (fused q/k/v, gate/up); scales promote to float32 if mixed."""
        p = parts[0]
        assert all((q.bits, q.group) == (p.bits, p.group) for q in parts)
        sdt = p.scale.dtype if all(q.scale.dtype == p.scale.dtype for q in parts) else torch.float32
        mins = None
        if any(q.mins is not None for q in parts):
            mins = torch.cat([(q.mins if q.mins is not None else torch.zeros_like(q.scale)).to(sdt) for q in parts])
        return QuantWeight(torch.cat([q.codes for q in parts]), torch.cat([q.scale.to(sdt) for q in parts]), mins,
                           p.bits, p.group, p.dtype)

    def a8_bits(self, rows: int, device: torch.device) -> int | None:
        """Code bits of the int8-activation decode GEMV if it serves `rows` rows on `device`, else None: x's
        producer may then quantize it for this weight (QuantizedX)."""
        if self.gemv_a8 and rows_supported(rows) and device.type == "cuda" and use_triton(self.codes):
            return self.bits
        return None

    def mm(self, x: torch.Tensor, xa: QuantizedX | None = None) -> torch.Tensor:
        # x: [M, K] -> [M, N] in x.dtype; decode rows: int8 activations and dp4a (kernels/quant_gemv_a8.py), x
        # quantized by its producer when xa matches these codes
        if self.a8_bits(x.shape[0], x.device) is not None:
            return quant_gemv_a8_triton(x, self.codes, self.scale, self.mins, self.bits, self.group, xa=xa)
        return self._matmul(x, self.codes, self.scale, self.mins, self.bits, self.group)

    __call__ = mm

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_ref(self.codes, self.scale, self.mins, self.bits, self.group).to(dtype or self.dtype)

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` dequantized. ids: [T] -> [T, K] in self.dtype."""
        q = unpack_codes(self.codes[ids], self.bits)
        t, k = q.shape
        w = q.float().view(t, k // self.group, self.group) * self.scale[ids].float()[..., None]
        if self.mins is not None:
            w = w + self.mins[ids].float()[..., None]
        return w.view(t, k).to(self.dtype)

    def tensors(self) -> list[torch.Tensor]:
        return [self.codes, self.scale] + ([self.mins] if self.mins is not None else [])


# ------------------------------------------------------------------------------------------------------ FP8
FP8_GEMV_MAX_M = FP8_GEMV_MAX_ROWS  # old name


def fp8_supported(device: torch.device) -> str | None:
    """None if FP8 weights can run on `device`, else the reason (for a typed error)."""
    if device.type != "cuda":
        return (f"quantization='fp8' needs a CUDA GPU with compute capability >= 8.9 (Ada/Hopper), but the "
                f"device is {device.type}: use quantization='int8' or 'int4' (int4-g32) on CPU, or run on such a GPU")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return (f"quantization='fp8' needs compute capability >= 8.9 (Ada/Hopper); this GPU is {major}.{minor}: "
                f"use quantization='int8' or 'int4' (int4-g32)")
    return None


class Fp8Weight(WeightKernel):
    """W [N, K] as e4m3 with per-output-channel scales; y = (x8 @ w8^T) * sx[m] * sw[n]."""

    def __init__(self, w8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
        self.w8, self.scale, self.dtype = w8, scale, dtype  # [N, K] float8_e4m3fn, [N] float32
        self.gemv = current_options().gemv16  # EngineConfig.gemv not off, kernels auto
        self._rowwise: bool | None = None  # whether _scaled_mm takes row-wise scales here (decided on first use)

    @classmethod
    def quantize(cls, w: torch.Tensor, dtype: torch.dtype | None = None) -> Fp8Weight:
        """w: [N, K] float -> per-row absmax scaling to e4m3 (the activations' per-token rule, once per weight)."""
        w8, scale = quantize_rows_fp8_ref(w)
        return cls(w8.contiguous(), scale.view(-1).contiguous(), dtype or w.dtype)

    @staticmethod
    def cat(parts: list[Fp8Weight]) -> Fp8Weight:
        return Fp8Weight(torch.cat([p.w8 for p in parts]), torch.cat([p.scale for p in parts]), parts[0].dtype)

    @property
    def shape(self) -> torch.Size:
        return self.w8.shape

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return (self.w8.float() * self.scale[:, None]).to(dtype or self.dtype)

    def mm(self, x: torch.Tensor, xa: object = None) -> torch.Tensor:
        # x: [M, K] -> [M, N] in x.dtype; few rows: W8A16 GEMV, else activations scaled per token (dynamic)
        if (0 < x.shape[0] <= min(FP8_GEMV_MAX_ROWS, _GEMV_ROWS) and x.dtype in (torch.bfloat16, torch.float16)
                and x.stride(-1) == 1 and self.gemv and use_triton(x)):
            return gemv_triton(x, self.w8, w_scale=self.scale)
        x8, sx = quantize_rows_fp8(x)  # [M, K] e4m3, [M, 1]
        out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        if self._rowwise is not False:
            try:
                y = torch._scaled_mm(x8, self.w8.t(), scale_a=sx, scale_b=self.scale[None, :],
                                     out_dtype=out_dtype)
                self._rowwise = True
                return y.to(x.dtype)
            except RuntimeError:
                if self._rowwise:
                    raise
                self._rowwise = False  # older GPUs/torch: tensor-wise scales only; apply ours afterwards
        one = torch.ones((), device=x.device, dtype=torch.float32)
        y = torch._scaled_mm(x8, self.w8.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
        return (y * sx * self.scale[None, :]).to(x.dtype)

    def tensors(self) -> list[torch.Tensor]:
        return [self.w8, self.scale]

    __call__ = mm
