"""RoPE: cos/sin cache vs HF rotary embeddings (default, llama3), rotation vs HF; Triton vs reference."""
from __future__ import annotations

import pytest
import torch

from hearthlm.kernels import apply_rope_, build_cos_sin_cache, rope_inv_freq
from hearthlm.kernels.rope import apply_rope_ref_, apply_rope_triton_

LLAMA3 = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}


def _hf_rotary(head_dim: int, theta: float, rope_scaling: dict | None):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim, rope_theta=theta,
                      rope_scaling=rope_scaling, max_position_embeddings=131072)
    return LlamaRotaryEmbedding(cfg)


@pytest.mark.parametrize("rope_scaling,theta", [(None, 10000.0), (LLAMA3, 500000.0)])
def test_cache_matches_hf_exactly(rope_scaling, theta):
    hf = _hf_rotary(64, theta, rope_scaling)
    assert torch.equal(rope_inv_freq(64, theta, rope_scaling), hf.inv_freq)
    cache = build_cos_sin_cache(64, 4096, theta, rope_scaling)
    cos, sin = hf(torch.zeros(1), torch.arange(4096)[None])
    assert torch.equal(cache[:, :32], cos[0, :, :32]) and torch.equal(cache[:, 32:], sin[0, :, :32])


def test_inv_freq_divisors():
    divisors = torch.linspace(1.0, 8.0, 32)
    torch.testing.assert_close(rope_inv_freq(64, 1e4, None, divisors), rope_inv_freq(64, 1e4) / divisors)


def test_unsupported_scaling_raises():
    with pytest.raises(NotImplementedError, match="mrope"):
        rope_inv_freq(64, 1e4, {"rope_type": "mrope", "factor": 4.0})


def test_rotation_matches_hf_fp32():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    hf = _hf_rotary(64, 500000.0, LLAMA3)
    pos = torch.tensor([0, 1, 7, 4000, 4095, 12])
    q, k = torch.randn(6, 8, 64), torch.randn(6, 2, 64)
    cos, sin = hf(q, pos[None])
    want_q, want_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    apply_rope_(q, k, pos, build_cos_sin_cache(64, 4096, 500000.0, LLAMA3))
    torch.testing.assert_close(q, want_q[0].transpose(0, 1), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(k, want_k[0].transpose(0, 1), atol=1e-6, rtol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,heads,kv_heads,head_dim", [(torch.bfloat16, 32, 8, 64), (torch.float16, 28, 4, 128),
                                                           (torch.float32, 8, 4, 256)])
def test_triton_matches_ref_cuda(dtype, heads, kv_heads, head_dim):
    cache = build_cos_sin_cache(head_dim, 8192, 500000.0, LLAMA3, device="cuda")
    qkv = torch.randn(100, heads + 2 * kv_heads, head_dim, device="cuda").to(dtype)
    q, k = qkv[:, :heads], qkv[:, heads:heads + kv_heads]  # strided views, as the model passes them
    pos = torch.randint(0, 8192, (100,), device="cuda")
    q2, k2 = q.clone(), k.clone()
    apply_rope_ref_(q2, k2, pos, cache)
    apply_rope_triton_(q, k, pos, cache)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(q, q2, atol=tol, rtol=tol)
    torch.testing.assert_close(k, k2, atol=tol, rtol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("pool_dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_fused_kv_write_matches_reshape_and_cache_cuda(pool_dtype):
    from hearthlm.kernels.cache_write import reshape_and_cache_ref

    cache = build_cos_sin_cache(128, 4096, 1e6, device="cuda")
    qkv = torch.randn(64, 16 + 16, 128, device="cuda").to(torch.bfloat16)
    q, k, v = qkv[:, :16], qkv[:, 16:24], qkv[:, 24:]
    pos = torch.randint(0, 4096, (64,), device="cuda")
    slots = torch.randperm(20 * 16, device="cuda")[:64]
    slots[::7] = -1
    pools = [torch.zeros(20, 16, 8, 128, device="cuda").to(pool_dtype) for _ in range(4)]
    qn = (torch.rand(128, device="cuda") + 0.5).to(torch.bfloat16), (torch.rand(128, device="cuda") + 0.5).to(torch.bfloat16)
    q2, k2 = q.clone(), k.clone()
    apply_rope_triton_(q2, k2, pos, cache, (*qn, 1e-6))
    reshape_and_cache_ref(k2, v, pools[0], pools[1], slots)
    apply_rope_triton_(q, k, pos, cache, (*qn, 1e-6), kv_write=(v, pools[2], pools[3], slots))
    assert torch.equal(q, q2) and torch.equal(k, k2)
    for want, got in zip(pools[:2], pools[2:]):
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
