"""GGUF blocks -> float32 weights with torch ops, on the device that holds the blocks.

The same arithmetic as gguf-py's numpy `dequantize` (gguf.quants), operation for operation in float32, so a
weight comes out bit-identical to it; on CUDA the blocks are copied up as bytes and decoded there, which takes a
dense GGUF load off the CPU (cold start, issue 16). Types without a port here return None: the caller falls back
to gguf-py.
"""
from __future__ import annotations

import torch

QK_K = 256
# type -> (weights per block, bytes per block)
BLOCKS = {"Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34),
          "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210), "IQ4_NL": (32, 18), "IQ4_XS": (256, 136)}
# IQ types the loader reads: every one gguf-py's numpy dequantizer decodes (IQ4_NL/IQ4_XS also ported here); none of
# them maps to linear group codes, so they are always dequantized
IQ_TYPES = frozenset({"IQ4_NL", "IQ4_XS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M"})
IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)  # IQ4_NL's codebook
# the nearest type the loader reads, for a GGUF type it does not (`nearest_supported`)
_NEAREST = {"TQ1_0": "IQ1_M", "TQ2_0": "IQ2_XXS", "Q8_1": "Q8_0", "Q8_K": "Q8_0", "MXFP4": "IQ4_XS"}
# rows decoded at once: bounds the float32 temporaries to about this many weights
CHUNK_WEIGHTS = 1 << 27


def _f16(b: torch.Tensor) -> torch.Tensor:
    """[..., 2] uint8 little-endian float16 -> [..., 1] float32."""
    return b.contiguous().view(torch.float16).to(torch.float32)


def _nibbles(qs: torch.Tensor, width: int) -> torch.Tensor:
    """[n, groups * width] bytes -> [n, 2 * groups, width] codes: each group's low nibbles, then its high ones."""
    q = qs.reshape(qs.shape[0], -1, 1, width)
    return torch.cat([q & 0x0F, q >> 4], dim=2).reshape(qs.shape[0], -1, width)


def _bits(b: torch.Tensor, count: int) -> torch.Tensor:
    """[n, bytes] uint8 -> [n, bytes, count]: bit i of each byte, little end first (count <= 8)."""
    shifts = torch.arange(count, device=b.device, dtype=torch.uint8)
    return (b.unsqueeze(-1) >> shifts) & 1


def _scale_min_k(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 packed bytes -> 8 six-bit scales and 8 six-bit mins per super-block (uint8)."""
    s = scales.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _blocks(b: torch.Tensor, kind: str) -> torch.Tensor:
    """[n_blocks, block bytes] uint8 -> [n_blocks, block weights] float32, as gguf.quants' dequantize_blocks."""
    n = b.shape[0]
    if kind == "Q8_0":
        return _f16(b[:, :2]) * b[:, 2:].contiguous().view(torch.int8).to(torch.float32)
    if kind in ("Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        off = 4 if kind.endswith("_1") else 2
        d = _f16(b[:, :2])
        if kind.startswith("Q5"):
            qh = _bits(b[:, off:off + 4], 8).reshape(n, 32)
            q = _nibbles(b[:, off + 4:], 16).reshape(n, 32) | (qh << 4)
        else:
            q = _nibbles(b[:, off:], 16).reshape(n, 32)
        if off == 4:
            return d * q.to(torch.float32) + _f16(b[:, 2:4])
        zero = 16 if kind.startswith("Q5") else 8
        return d * (q.to(torch.int8) - zero).to(torch.float32)
    if kind in ("Q4_K", "Q5_K"):
        d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
        sc, mn = _scale_min_k(b[:, 4:16])
        scale = (d * sc.to(torch.float32)).unsqueeze(-1)  # [n, 8, 1]
        dm = (dmin * mn.to(torch.float32)).unsqueeze(-1)
        if kind == "Q4_K":
            q = _nibbles(b[:, 16:], 32)  # [n, 8, 32]
        else:
            qh = (b[:, 16:48].reshape(n, 1, 32) >> torch.arange(8, device=b.device, dtype=torch.uint8)
                  .reshape(1, 8, 1)) & 1  # [n, 8, 32]
            q = _nibbles(b[:, 48:], 32) | (qh << 4)
        return (scale * q.to(torch.float32) - dm).reshape(n, QK_K)
    if kind == "Q6_K":
        ql = b[:, :128].reshape(n, 2, 1, 64)
        ql = torch.cat([ql & 0x0F, ql >> 4], dim=2).reshape(n, 8, 32)
        qh = (b[:, 128:192].reshape(n, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], device=b.device, dtype=torch.uint8)
              .reshape(1, 1, 4, 1)) & 3
        q = (ql | (qh.reshape(n, 8, 32) << 4)).to(torch.int8) - 32
        scale = (_f16(b[:, 208:210]) * b[:, 192:208].contiguous().view(torch.int8).to(torch.float32))
        return (scale.unsqueeze(-1) * q.reshape(n, 16, 16).to(torch.float32)).reshape(n, QK_K)
    if kind in ("IQ4_NL", "IQ4_XS"):
        kv = torch.tensor(IQ4_VALUES, device=b.device, dtype=torch.float32)
        if kind == "IQ4_NL":
            return _f16(b[:, :2]) * kv[_nibbles(b[:, 2:], 16).reshape(n, 32).long()]
        sh = b[:, 2:4].contiguous().view(torch.int16).to(torch.int32) & 0xFFFF  # [n, 1]
        sl = _nibbles(b[:, 4:8], 1).reshape(n, 8).to(torch.int32)  # byte i: sub-blocks 2 i (low), 2 i + 1
        sh = (sh >> (2 * torch.arange(8, device=b.device, dtype=torch.int32))) & 3
        dl = _f16(b[:, :2]) * ((sl | (sh << 4)) - 32).to(torch.float32)  # [n, 8]
        q = _nibbles(b[:, 8:], 16).reshape(n, 8, 32)
        return (dl.unsqueeze(-1) * kv[q.long()]).reshape(n, QK_K)
    raise KeyError(kind)


def nearest_supported(type_name: str) -> str:
    """The nearest GGUF type the loader reads, for one it does not (an error names it)."""
    return _NEAREST.get(type_name, "IQ4_XS" if type_name.startswith("IQ4") else "Q4_K")


def dequantize(raw: torch.Tensor, type_name: str, shape: tuple[int, int],
               dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """raw: [N, bytes per row] uint8 blocks of a (N, K) weight, on any device -> [N, K] `dtype` on that device
    (decoded in float32, then cast), or None for a type this module does not decode."""
    if type_name not in BLOCKS:
        return None
    n, k = shape
    block, size = BLOCKS[type_name]
    b = raw.reshape(n, (k // block) * size)
    out = torch.empty(n, k, dtype=dtype, device=raw.device)
    step = max(1, CHUNK_WEIGHTS // max(1, k))
    for r in range(0, n, step):
        rows = b[r:r + step]
        out[r:r + step] = _blocks(rows.reshape(-1, size), type_name).reshape(rows.shape[0], k)
    return out
