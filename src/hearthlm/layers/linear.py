"""Linear layer holding (possibly fused) weights; the single place quantized matmuls plug in."""
from __future__ import annotations

import torch
import torch.nn.functional as F


class Linear:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        # weight: [out_features, in_features]
        self.weight = weight
        self.bias = bias

    @classmethod
    def fused(cls, weights: list[torch.Tensor], biases: list[torch.Tensor | None] | None = None) -> "Linear":
        bias = None
        if biases and all(b is not None for b in biases):
            bias = torch.cat(biases, dim=0)
        return cls(torch.cat(weights, dim=0) if len(weights) > 1 else weights[0], bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size() + (
            self.bias.numel() * self.bias.element_size() if self.bias is not None else 0)
