"""Linear layer holding (possibly fused) weights; the single place quantized matmuls plug in.

A weight is a dense tensor or a GroupQuant (GGUF blocks kept quantized, CPU); the latter is packed for
PyTorch's CPU int4 kernel (layers/quant_linear.py) or, lacking a layout, dequantized to its dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .quant_linear import GroupQuant, Int4Weight, pack

Weight = torch.Tensor | GroupQuant


class Linear:
    def __init__(self, weight: Weight, bias: torch.Tensor | None = None):
        """weight: [out_features, in_features]. A packed weight runs the same kernel for any number of rows,
        so a sequence's output does not depend on what it is batched with (greedy text alone == batched)."""
        self.packed: Int4Weight | None = None
        if isinstance(weight, GroupQuant):
            self.packed = pack(weight)
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
        y = self.packed(x2)
        y = y if x.dim() == 2 else y.view(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias

    def tensors(self) -> list[torch.Tensor]:
        if self.parts is not None:
            return [t for p in self.parts for t in p.tensors()] + ([self.bias] if self.bias is not None else [])
        ts = [self.weight] if self.packed is None else self.packed.tensors()
        return ts + ([self.bias] if self.bias is not None else [])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())
