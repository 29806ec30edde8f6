"""Gated MLP activations: act(gate) * up on a fused [.., 2*I] projection."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def gated_act(gate_up: torch.Tensor, act: str) -> torch.Tensor:
    # gate_up: [num_tokens, 2 * intermediate] -> [num_tokens, intermediate]
    gate, up = gate_up.chunk(2, dim=-1)
    if act == "silu":
        return F.silu(gate).mul_(up)
    if act in ("gelu_pytorch_tanh", "gelu_tanh"):
        return F.gelu(gate, approximate="tanh").mul_(up)
    if act == "gelu":
        return F.gelu(gate).mul_(up)
    raise ValueError(f"unsupported activation {act!r}")
