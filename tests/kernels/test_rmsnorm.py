"""rms_norm: reference vs HF LlamaRMSNorm / Gemma2RMSNorm (bit-exact); Triton vs reference on CUDA."""
from __future__ import annotations

import pytest
import torch

from hearthlm.kernels import rms_norm
from hearthlm.kernels.rmsnorm import rms_norm_ref, rms_norm_triton


def test_llama_style_matches_hf_bitwise():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x = torch.randn(4, 7, 64).bfloat16()
    hf = LlamaRMSNorm(64, eps=1e-5).bfloat16()
    torch.nn.init.normal_(hf.weight)
    assert torch.equal(rms_norm(x, hf.weight, 1e-5), hf(x))


def test_gemma_style_matches_hf_bitwise():
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm

    x = torch.randn(4, 7, 64).bfloat16()
    hf = Gemma2RMSNorm(64, eps=1e-6).bfloat16()
    torch.nn.init.normal_(hf.weight)
    assert torch.equal(rms_norm(x, hf.weight, 1e-6, weight_offset=1.0, gemma_style=True), hf(x))


def test_residual_add_matches_eager_sequence():
    x, res = torch.randn(2, 5, 32).bfloat16().unbind(0)
    w = torch.randn(32).bfloat16()
    out, new_res = rms_norm(x, w, 1e-6, residual=res)
    assert torch.equal(new_res, x + res)
    assert torch.equal(out, rms_norm(x + res, w, 1e-6))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,hidden", [(torch.bfloat16, 2048), (torch.bfloat16, 3000), (torch.float16, 64),
                                          (torch.float32, 4096)])
@pytest.mark.parametrize("gemma", [False, True])
def test_triton_matches_ref_cuda(dtype, hidden, gemma):
    x, res = torch.randn(2, 33, hidden, device="cuda").to(dtype).unbind(0)
    w = torch.randn(hidden, device="cuda").to(dtype)
    kw = {"weight_offset": 1.0 if gemma else 0.0, "gemma_style": gemma}
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 1e-2}  # <= 1 ulp
    torch.testing.assert_close(rms_norm_triton(x, w, 1e-6, **kw), rms_norm_ref(x, w, 1e-6, **kw), **tol)
    out, new_res = rms_norm_triton(x, w, 1e-6, residual=res, **kw)
    want, want_res = rms_norm_ref(x, w, 1e-6, residual=res, **kw)
    assert torch.equal(new_res, want_res)
    torch.testing.assert_close(out, want, **tol)
