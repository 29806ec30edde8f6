"""Rotary position embeddings (HF rotate_half layout), incl. Llama-3 frequency scaling."""
from __future__ import annotations

import torch

from ..kernels.rope import rope_inv_freq


class Rotary:
    """Holds inv_freq; computes cos/sin per step for the given positions (exactly as HF does)."""

    def __init__(self, head_dim: int, theta: float, rope_scaling: dict | None, device: torch.device,
                 freq_factors: torch.Tensor | None = None):
        self.inv_freq = rope_inv_freq(head_dim, theta, rope_scaling, freq_factors).to(device)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [num_tokens] -> cos, sin: [num_tokens, 1, head_dim]
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [num_tokens, heads, head_dim]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
