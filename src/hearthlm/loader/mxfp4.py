"""MXFP4 (OCP microscaling FP4) weights -> float: gpt-oss's expert matrices, as HF checkpoints store them
(`*_blocks` [..., groups, 16] bytes + `*_scales` [..., groups] E8M0 exponents) and as GGUF's MXFP4 type does
(17-byte blocks: the exponent, then 16 bytes of codes).

Rule: a group of 32 weights shares one power-of-two scale 2^(e - 127); each weight is an E2M1 code (sign, 2-bit
exponent, 1-bit mantissa: 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives). The scale is built from its bits as
ggml does (exact for every e, 0 and 255 included: no 0 * inf), so the results are gguf-py's bit for bit."""
from __future__ import annotations

import torch

GROUP = 32
# E2M1 codes doubled (integers), as ggml's kvalues: the scale below is halved to match
_KVALUES_X2 = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)


def _half_scale(e: torch.Tensor) -> torch.Tensor:
    """uint8 E8M0 exponents -> float32 2^(e - 128) (ggml_e8m0_to_fp32_half: subnormal for e < 2)."""
    x = e.to(torch.int32)
    bits = torch.where(x < 2, torch.full_like(x, 0x00200000) << x, (x - 1) << 23)
    return bits.view(torch.float32)


def _decode(codes: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """codes [..., 32] (0..15) and exponents [...] -> float32 [..., 32]."""
    lut = torch.tensor(_KVALUES_X2, dtype=torch.float32, device=codes.device)
    return _half_scale(e)[..., None] * lut[codes.long()]


def dequantize_hf(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """HF layout: blocks [..., G, 16] uint8 (weight 2j in byte j's low nibble, 2j + 1 in its high one), scales
    [..., G] uint8 -> [..., G * 32] in dtype (for gpt-oss's `experts.*_proj_blocks`: [E, out, in], the matrix as
    the layer multiplies it, before the transpose HF applies for its own parameter layout)."""
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != GROUP // 2:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)}")
    b = blocks.to(torch.uint8)
    codes = torch.stack([b & 0x0F, b >> 4], dim=-1).flatten(-2)  # interleaved: low, high, low, high...
    return _decode(codes, scales.to(torch.uint8)).flatten(-2).to(dtype)


def dequantize_gguf(raw: torch.Tensor) -> torch.Tensor:
    """GGUF MXFP4 blocks [n, 17] uint8 (exponent, then 16 bytes: weights 0-15 in the low nibbles, 16-31 in the high
    ones) -> float32 [n, 32]."""
    if raw.shape[-1] != 1 + GROUP // 2:
        raise ValueError(f"GGUF MXFP4 blocks are 17 bytes, got rows of {raw.shape[-1]}")
    qs = raw[:, 1:]
    return _decode(torch.cat([qs & 0x0F, qs >> 4], dim=-1), raw[:, 0])
