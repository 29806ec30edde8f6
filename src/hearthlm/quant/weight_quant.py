"""Weight-only quantizers of --quantization (applied at load to an HF model's block matrices).

Format names, one per format (the planner, plan/, uses the same):
  INT8_G32       --quantization int8: symmetric int8 codes, one scale per 32 inputs (q8_0's 8.5 bits a weight)
  INT4_G32       --quantization int4: asymmetric 4-bit codes, a scale and a min per 32 inputs (q4_1's 5 bits)
  INT4_AWQ_G128  an HF checkpoint's AWQ/GPTQ int4: 4-bit codes, an f16 scale and a 4-bit zero point per 128
                 inputs (planned for memory only; not produced here)
"""
from __future__ import annotations

import torch

from .group_quant import GroupQuant

INT8_G32 = "int8-g32"
INT4_G32 = "int4-g32"
INT4_AWQ_G128 = "int4-awq-g128"


def quantize_int8(w: torch.Tensor, group: int = 32) -> GroupQuant:
    """INT8_G32 (--quantization int8), symmetric per group of `group` inputs: code = round(w / scale) in
    [-127, 127], scale = absmax / 127. w: [N, K] float (K % group == 0) -> GroupQuant on w's device, dtype w.dtype."""
    n, k = w.shape
    wf = w.float().view(n, k // group, group)
    scale = (wf.abs().amax(-1) / 127).clamp(min=1e-12)
    codes = torch.round(wf / scale[..., None]).clamp(-127, 127).to(torch.int8).view(n, k)
    return GroupQuant(codes, scale, torch.zeros_like(scale), group, 8, w.dtype)


def quantize_int4(w: torch.Tensor, group: int = 32) -> GroupQuant:
    """INT4_G32 (--quantization int4), asymmetric per group: w ~= code * scale + min, code in 0..15,
    min = group min, scale = range / 15. w: [N, K] float (K % group == 0) -> GroupQuant on w's device, dtype w.dtype."""
    n, k = w.shape
    wf = w.float().view(n, k // group, group)
    lo, hi = wf.amin(-1), wf.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    codes = torch.round((wf - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8).view(n, k)
    return GroupQuant(codes, scale, lo, group, 4, w.dtype)
