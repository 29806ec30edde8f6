"""RMSNorm in the two flavours HF uses (Llama: w * x_norm.to(dtype); Gemma: (1 + w) * x_norm in fp32)."""
from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool = False) -> torch.Tensor:
    # x: [..., hidden]
    if not gemma and x.dtype == torch.float32 and weight.dtype == torch.float32:
        # F.rms_norm's op (one call instead of six): the same ops in the same order, bit for bit
        # (tests/layers/test_cpu_decode.py)
        return torch.rms_norm(x, weight.shape, weight, eps)
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if gemma:
        return (h * (1.0 + weight.float())).to(x.dtype)
    return weight * h.to(x.dtype)
