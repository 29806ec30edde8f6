"""GroupQuant: the common form of a weight kept quantized, w = code * scale + min per group of `group` inputs.

GGUF blocks unpack to it (loader/gguf_unpack.py: Q4_0/1, Q5_0/1, Q4_K, Q5_K, Q8_0, and Q6_K for the GPU kernels),
and so do the --quantization int8 / int4-g32 weights (quant/weight_quant.py). The weight kernels repack it at load
(layers/quant_linear.py on CPU, layers/gpu_quant.py on CUDA).
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch

from ..kernels import cpu_quant


class GroupQuant:
    """w = code * scale + min per group of `group` inputs. codes: [N, K] uint8 (4/5-bit types) or int8 (Q8_0);
    scale, min: [N, K // group] float32; dtype: activation dtype of the model using it.

    A GGUF tensor's codes are decoded on first use (`decode`): the native kernel's layout is made from the file's
    blocks directly (`native_codes`, kernels/cpu_quant.py), so a CPU load never materializes a byte per weight
    for the matrices it packs."""

    def __init__(self, codes: torch.Tensor | None, scale: torch.Tensor | None, min: torch.Tensor | None, group: int,
                 bits: int, dtype: torch.dtype = torch.float32, *, shape: tuple[int, int] | None = None,
                 code_dtype: torch.dtype | None = None, decode: Callable[[], torch.Tensor] | None = None,
                 native: Callable[[], np.ndarray | None] | None = None,
                 scales: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None):
        """codes None: `decode()` makes them when first read (shape and code_dtype then given); native: makes
        the native kernel's code layout without them (None where it cannot); scale and min None: `scales()`
        makes both when first read. name / packed_cache: set by the GGUF loader (loader/pack_cache.py: the native
        layout saved once per model file)."""
        assert codes is not None or (decode is not None and shape is not None and code_dtype is not None)
        assert scale is not None or scales is not None
        self._codes, self._decode, self._native = codes, decode, native
        self._scale, self._min, self._scales = scale, min, scales
        self.shape = torch.Size(codes.shape if codes is not None else shape)
        self.code_dtype = codes.dtype if codes is not None else code_dtype
        self.group, self.bits, self.dtype = group, bits, dtype
        self.name: str | None = None
        self.packed_cache = None  # loader/pack_cache.PackCache

    @property
    def scale(self) -> torch.Tensor:
        if self._scale is None:
            (self._scale, self._min), self._scales = self._scales(), None
        return self._scale

    @property
    def min(self) -> torch.Tensor:
        if self._min is None:
            _ = self.scale  # makes both
        return self._min

    @property
    def codes(self) -> torch.Tensor:
        if self._codes is None:
            self._codes, self._decode = self._decode(), None
        return self._codes

    @codes.setter
    def codes(self, value: torch.Tensor) -> None:
        self._codes, self._decode, self._native = value, None, None
        self.shape, self.code_dtype = value.shape, value.dtype

    @property
    def device(self) -> torch.device:
        return torch.device("cpu") if self._codes is None else self._codes.device  # undecoded: a CPU file

    def __repr__(self) -> str:
        return f"GroupQuant({tuple(self.shape)}, bits={self.bits}, group={self.group}, codes={self.code_dtype})"

    def __getitem__(self, rows: torch.Tensor) -> GroupQuant:
        """Select/permute output rows (e.g. llama q/k head permutation)."""
        return GroupQuant(self.codes[rows], self.scale[rows], self.min[rows], self.group, self.bits, self.dtype)

    @staticmethod
    def cat(parts: list[GroupQuant]) -> GroupQuant:
        """Concatenate along the output dim (fused q/k/v, gate/up). The codes stay undecoded: the native layout
        of whole tiles concatenates as bytes (each part's N % 16 == 0), else it is made from the joined codes."""
        p = parts[0]
        assert all(q.group == p.group and q.bits == p.bits and q.code_dtype == p.code_dtype for q in parts)

        def native() -> np.ndarray | None:
            if any(q.shape[0] % cpu_quant.TILE for q in parts):
                return None
            return np.concatenate([q.native_codes() for q in parts])

        g = GroupQuant(None, None, None, p.group, p.bits, p.dtype, shape=(sum(q.shape[0] for q in parts), p.shape[1]),
                       code_dtype=p.code_dtype, decode=lambda: torch.cat([q.codes for q in parts]), native=native,
                       scales=lambda: (torch.cat([q.scale for q in parts]), torch.cat([q.min for q in parts])))
        if all(q.name for q in parts):
            g.name, g.packed_cache = "+".join(q.name for q in parts), p.packed_cache
        return g

    def native_codes(self) -> np.ndarray:
        """The codes in the native kernel's layout (cpu_quant.interleave: unsigned, 4-bit two a byte), flat
        uint8; straight from the file's blocks where the format allows, else from the decoded codes."""
        packed = self._native() if self._codes is None and self._native is not None else None
        if packed is None:
            packed = cpu_quant.interleave_np(self.codes.numpy(), 4 if self.bits == 4 else 8)
        return packed

    @functools.cached_property
    def fp16_scales(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(scale, min) in fp16 as the native kernel takes them (signed codes: the + 128 offset folded into the
        min), and the float32 values they stand for: [N, K // group] each (NativeWeight.supports, pack)."""
        scale = self.scale.numpy()
        mins = self.min.numpy()
        if self.code_dtype == torch.int8:
            mins = mins - np.float32(128) * scale
        with np.errstate(over="ignore"):  # overflow to inf: supports() says no
            return scale.astype(np.float16), mins.astype(np.float16), scale, mins

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        n, k = self.codes.shape
        w = self.codes.float().view(n, k // self.group, self.group) * self.scale[..., None] + self.min[..., None]
        return w.view(n, k).to(dtype or self.dtype)

    def nibble_split(self) -> GroupQuant:
        """5/8-bit codes as two 4-bit halves side by side along K: [N, 2K] with w = hi half + lo half exactly
        (q = 16 * (q >> 4) + (q & 15)); the matmul then takes cat([x, x], -1)."""
        q = self.codes.to(torch.int16)
        off = -8 if self.codes.dtype == torch.int8 else 0  # signed codes: hi = (q >> 4) + 8 in [0, 15]
        codes = torch.cat([(q >> 4) - off, q & 15], 1).to(torch.uint8)
        scale = torch.cat([16 * self.scale, self.scale], 1)
        # min goes with the lo half: both kernel zeros (min + 8 * scale) then stay exact multiples of the
        # bf16-rounded scale for the _0 types (hi: 0 or 128 d, lo: 8 d - 16 d or 8 d)
        mins = torch.cat([16 * off * self.scale, self.min], 1)
        return GroupQuant(codes, scale, mins, self.group, 4, self.dtype)

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` dequantized: F.embedding on the codes. ids: [T] -> [T, K]."""
        return self[ids].dequantize()

    def to(self, device: torch.device | str) -> GroupQuant:
        return GroupQuant(self.codes.to(device), self.scale.to(device), self.min.to(device), self.group, self.bits,
                          self.dtype)

    def tensors(self) -> list[torch.Tensor]:
        return [self.codes, self.scale, self.min]
