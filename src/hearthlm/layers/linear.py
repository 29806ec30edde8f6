"""Linear layer holding (possibly fused) weights; the single place quantized matmuls plug in.

A weight is a dense tensor or a GroupQuant (GGUF blocks kept quantized, CPU); the latter is packed for
PyTorch's CPU int4 kernel (layers/quant_linear.py) or, lacking a layout, dequantized to its dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .quant_linear import Bf16Weight, GroupQuant, Int4Weight, pack

Weight = torch.Tensor | GroupQuant
DENSE_COPY_MAX_BYTES = 256 << 20  # dense_from_rows keeps a bf16 copy only up to this size


class Linear:
    def __init__(self, weight: Weight, bias: torch.Tensor | None = None, dense_from_rows: int | None = None):
        """weight: [out_features, in_features]. dense_from_rows: for a packed weight, also keep a dense bf16
        copy used for inputs of at least that many rows (memory for speed, e.g. the lm_head of many streams)."""
        self.packed: Int4Weight | None = None
        self.dense: Bf16Weight | None = None
        self.dense_from_rows = 1 << 62
        if isinstance(weight, GroupQuant):
            self.packed = pack(weight)
            if self.packed is not None and dense_from_rows and weight.codes.numel() * 2 <= DENSE_COPY_MAX_BYTES:
                self.dense, self.dense_from_rows = Bf16Weight(weight), dense_from_rows
            weight = weight.dequantize() if self.packed is None else None
        self.weight: torch.Tensor | None = weight
        self.bias = bias
        self.parts: list[Linear] | None = None

    @classmethod
    def fused(cls, weights: list[Weight], biases: list[torch.Tensor | None] | None = None) -> "Linear":
        bias = None
        if biases and all(b is not None for b in biases):
            bias = torch.cat(biases, dim=0)
        if len(weights) == 1:
            return cls(weights[0], bias)
        if all(isinstance(w, torch.Tensor) for w in weights):
            return cls(torch.cat(weights, dim=0), bias)
        if all(isinstance(w, GroupQuant) for w in weights) and len({(w.bits, w.group) for w in weights}) == 1:
            return cls(GroupQuant.cat(weights), bias)
        fused = cls(torch.empty(0), bias)  # mixed formats (e.g. Q4_K q/k with a Q6_K v): one matmul per part
        fused.parts = [cls(w) for w in weights]
        return fused

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in_features] -> [..., out_features]
        if self.parts is not None:
            y = torch.cat([p(x) for p in self.parts], dim=-1)
            return y if self.bias is None else y + self.bias
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        y = (self.dense if x2.shape[0] >= self.dense_from_rows else self.packed)(x2)
        y = y if x.dim() == 2 else y.view(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias

    def tensors(self) -> list[torch.Tensor]:
        if self.parts is not None:
            return [t for p in self.parts for t in p.tensors()] + ([self.bias] if self.bias is not None else [])
        ts = [self.weight] if self.packed is None else self.packed.tensors()
        ts += self.dense.tensors() if self.dense is not None else []
        return ts + ([self.bias] if self.bias is not None else [])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())
