"""Gated activations: reference vs explicit formulas; Triton vs reference on CUDA."""
from __future__ import annotations

import math

import pytest
import torch

from hearthlm.kernels import gelu_tanh_and_mul, silu_and_mul
from hearthlm.kernels.activation import (
    gelu_tanh_and_mul_ref,
    gelu_tanh_and_mul_triton,
    silu_and_mul_ref,
    silu_and_mul_triton,
)


def test_refs_match_formulas():
    x = torch.randn(5, 2, 2 * 24, dtype=torch.float64)
    g, u = x[..., :24], x[..., 24:]
    torch.testing.assert_close(silu_and_mul(x), g / (1 + torch.exp(-g)) * u)
    gelu = 0.5 * g * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g ** 3)))
    torch.testing.assert_close(gelu_tanh_and_mul(x), gelu * u)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,inter", [(torch.bfloat16, 8192), (torch.float16, 1000), (torch.float32, 64)])
def test_triton_matches_ref_cuda(dtype, inter):
    x = (3 * torch.randn(37, 2 * inter, device="cuda")).to(dtype)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 2e-2}
    torch.testing.assert_close(silu_and_mul_triton(x), silu_and_mul_ref(x), **tol)
    torch.testing.assert_close(gelu_tanh_and_mul_triton(x), gelu_tanh_and_mul_ref(x), **tol)
