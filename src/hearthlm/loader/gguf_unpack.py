"""GGUF blocks -> GroupQuant (quant/group_quant.py), decoded lazily: a packed-weight cache hit reads no code.

Q4_0, Q4_1 and Q8_0 blocks give the native CPU kernel's layout directly (their nibble pairs are the kernel's);
Q2_K and Q3_K stay dequantized (loader/gguf.py).
"""
from __future__ import annotations

import numpy as np
import torch

from ..kernels import cpu_quant
from ..quant.group_quant import GroupQuant

QUANT_TYPES = ("Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q8_0")  # unpacked to GroupQuant; others dequantized
GPU_QUANT_TYPES = QUANT_TYPES + ("Q6_K",)  # groups of 16: no CPU int4 layout, but the GPU kernels take them


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)[..., 0]


def _nibbles(qs: np.ndarray, run: int) -> np.ndarray:
    """[..., B] packed bytes -> [..., 2B] codes: per run of `run` bytes, its low nibbles then its high nibbles."""
    qs = qs.reshape(*qs.shape[:-1], -1, 1, run)
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-2).reshape(*qs.shape[:-3], -1)


def unpack_gguf(raw: np.ndarray, type_name: str, shape: tuple[int, int]) -> GroupQuant | None:
    """GGUF blocks -> GroupQuant. raw: [N, bytes per row] uint8 as GGUFFile.raw gives it; shape: (N, K).
    Codes, scales and mins are decoded when first read (a packed-weight cache hit reads none of them); Q4_0, Q4_1
    and Q8_0 blocks give the native kernel's layout directly (their nibble pairs are the kernel's: no decode)."""
    import gguf

    if type_name not in GPU_QUANT_TYPES:
        return None
    n, k = shape
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    b = np.asarray(raw, dtype=np.uint8).reshape(n, k // block, size)
    if type_name == "Q6_K":  # [ql: 128, qh: 64, scales: 16 int8, d], w = d * scale[16 groups] * (q - 32)
        def scales_q6k() -> tuple[torch.Tensor, torch.Tensor]:
            sc = b[..., 192:208].copy().view(np.int8).astype(np.float32)  # [N, blocks, 16]
            scale = _f16(b[..., 208:210])[..., None] * sc
            return torch.from_numpy(scale.reshape(n, -1)), torch.zeros(n, k // 16)

        return GroupQuant(None, None, None, 16, 6, shape=shape, code_dtype=torch.int8,
                          decode=lambda: _q6k_codes(b, n, k), scales=scales_q6k)
    if type_name == "Q8_0":
        return GroupQuant(None, None, None, 32, 8, shape=shape, code_dtype=torch.int8,
                          scales=lambda: (torch.from_numpy(_f16(b[..., 0:2])), torch.zeros(n, k // 32)),
                          decode=lambda: torch.from_numpy(b[..., 2:].copy().view(np.int8).reshape(n, k)),
                          native=lambda: _native_q8_0(b, n, k))
    bits = 5 if type_name.startswith("Q5") else 4
    if not type_name.endswith("_K"):  # Q4_0 Q4_1 Q5_0 Q5_1: [d, (m), (qh: 32 fifth bits), qs: 16 bytes]
        off = 4 if type_name.endswith("_1") else 2

        def scales() -> tuple[torch.Tensor, torch.Tensor]:
            d = _f16(b[..., 0:2])
            m = _f16(b[..., 2:4]) if off == 4 else -(1 << (bits - 1)) * d  # _0 types: w = d * (q - 8 or 16)
            return torch.from_numpy(d), torch.from_numpy(m)

        def decode() -> torch.Tensor:
            codes = _nibbles(b[..., off + 4 * (bits == 5):], 16)
            if bits == 5:
                qh = np.ascontiguousarray(b[..., off:off + 4]).view(np.uint32)  # [N, blocks, 1]
                codes |= ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8) << 4
            return torch.from_numpy(codes.reshape(n, k))

        return GroupQuant(None, None, None, 32, bits, shape=shape, code_dtype=torch.uint8, decode=decode,
                          scales=scales,
                          native=(lambda: _native_q4(b[..., off:], n, k)) if bits == 4 else None)
    # Q4_K / Q5_K: 256-weight super-blocks of 8 groups of 32, w = d * sc * q - dmin * m
    def scales_k() -> tuple[torch.Tensor, torch.Tensor]:
        d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
        sc, mn = gguf.quants.Q4_K.get_scale_min(b[..., 4:16].reshape(-1, 12))
        sc, mn = sc.reshape(n, -1, 8).astype(np.float32), mn.reshape(n, -1, 8).astype(np.float32)
        return (torch.from_numpy((d[..., None] * sc).reshape(n, -1)),
                torch.from_numpy((-dmin[..., None] * mn).reshape(n, -1)))

    def decode_k() -> torch.Tensor:
        codes = _nibbles(b[..., 16 + 32 * (bits == 5):], 32)  # runs of 32 bytes: groups 2j, 2j+1 in low/high nibbles
        if bits == 5:  # qh[32]: bit j of byte l is the fifth bit of element l of group j
            qh = b[..., 16:48, None] >> np.arange(8, dtype=np.uint8)  # [N, blocks, 32, 8]
            codes |= ((qh & 1).swapaxes(-1, -2).reshape(n, -1, 256)) << 4
        return torch.from_numpy(codes.reshape(n, k))

    return GroupQuant(None, None, None, 32, bits, shape=shape, code_dtype=torch.uint8, decode=decode_k,
                      scales=scales_k)


def _q6k_codes(b: np.ndarray, n: int, k: int) -> torch.Tensor:
    # per 128-weight half: 4 runs of 32 = (ql[0:32] lo, ql[32:64] lo, ql[0:32] hi, ql[32:64] hi) | qh bits 2j..
    ql = (b[..., :128].reshape(n, -1, 2, 1, 64) >> np.array([0, 4], np.uint8)[:, None]) & 15
    qh = (b[..., 128:192].reshape(n, -1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3
    q = ql.reshape(n, -1, 8, 32) | (qh.reshape(n, -1, 8, 32) << 4)
    return torch.from_numpy((q.astype(np.int16) - 32).astype(np.int8).reshape(n, k))


def _native_q4(qs: np.ndarray, n: int, k: int) -> np.ndarray | None:
    """Q4_0/Q4_1 blocks' 16 code bytes [N, K / 32, >= 16] -> cpu_quant.interleave's 4-bit layout: byte j of a
    block holds codes j and j + 16 (low, high nibble), the kernel's pairing of vector i and i + 4, so the bytes
    only move, 4 at a time. None: N is not whole tiles (the caller checks supports first)."""
    if n % cpu_quant.TILE:
        return None
    v = np.ascontiguousarray(qs[..., :16]).view(np.uint32).reshape(n // cpu_quant.TILE, cpu_quant.TILE, k // 32, 4)
    return np.ascontiguousarray(v.transpose(0, 2, 3, 1)).view(np.uint8).reshape(-1)


def _native_q8_0(b: np.ndarray, n: int, k: int) -> np.ndarray | None:
    """Q8_0 blocks [N, K / 32, 34] -> cpu_quant.interleave's 8-bit layout of the codes + 128."""
    if n % cpu_quant.TILE:
        return None
    v = (b[..., 2:] ^ np.uint8(0x80)).view(np.uint32).reshape(n // cpu_quant.TILE, cpu_quant.TILE, k // 32, 8)
    return np.ascontiguousarray(v.transpose(0, 2, 3, 1)).view(np.uint8).reshape(-1)
