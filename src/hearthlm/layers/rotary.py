"""Rotary position embeddings (HF rotate_half layout), incl. Llama-3 frequency scaling."""
from __future__ import annotations

import torch

from ..kernels.rope import rope_attention_factor, rope_inv_freq


class Rotary:
    """Holds inv_freq; computes cos/sin per step for the given positions (exactly as HF does)."""

    def __init__(self, head_dim: int, theta: float, rope_scaling: dict | None, device: torch.device,
                 freq_factors: torch.Tensor | None = None):
        self.inv_freq = rope_inv_freq(head_dim, theta, rope_scaling, freq_factors).to(device)
        self.factor = rope_attention_factor(rope_scaling)  # YaRN scales cos and sin (HF's attention_scaling)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [num_tokens] -> cos, sin: [num_tokens, 1, head_dim]; sin carries rotate_half's sign (its
        first half negated), as apply_rotary expects. Computed once per step for all layers."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.factor != 1.0:
            cos, sin = cos * self.factor, sin * self.factor
        sin[:, :freqs.shape[1]].neg_()
        return cos.to(dtype)[:, None, :], sin.to(dtype)[:, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's x * cos + rotate_half(x) * sin, bit for bit: rotate_half(x) * sin == roll(x, half) * signed sin
    (negation is exact), in 4 ops instead of 7. x: [num_tokens, heads, head_dim] (any strides; bf16 x with
    float32 cos/sin gives float32, the same as x.float() would); cos, sin from Rotary.cos_sin."""
    return (x * cos).add_(x.roll(x.shape[-1] // 2, -1) * sin)
