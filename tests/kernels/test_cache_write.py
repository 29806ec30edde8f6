"""reshape_and_cache: reference vs a per-token loop; Triton vs reference on CUDA."""
from __future__ import annotations

import pytest
import torch

from hearthlm.kernels import reshape_and_cache
from hearthlm.kernels.cache_write import reshape_and_cache_ref, reshape_and_cache_triton


def _case(device: str, dtype: torch.dtype, num_blocks=6, block_size=4, kv_heads=2, head_dim=8, tokens=7):
    g = torch.Generator().manual_seed(0)
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype).to(device)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype).to(device)
    qkv = torch.randn(tokens, 3 * kv_heads, head_dim, generator=g).to(dtype).to(device)
    k, v = qkv[:, kv_heads:2 * kv_heads], qkv[:, 2 * kv_heads:]  # non-contiguous views
    slots = torch.randperm(num_blocks * block_size, generator=g)[:tokens]
    slots[1] = -1
    return k, v, k_cache, v_cache, slots.to(device)


def test_ref_matches_loop():
    k, v, k_cache, v_cache, slots = _case("cpu", torch.float32)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    bs = k_cache.shape[1]
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            want_k[s // bs, s % bs] = k[t]
            want_v[s // bs, s % bs] = v[t]
    reshape_and_cache(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,kv_heads,head_dim", [(torch.bfloat16, 8, 64), (torch.bfloat16, 2, 128),
                                                     (torch.float16, 4, 256), (torch.float32, 3, 80)])
def test_triton_matches_ref_cuda(dtype, kv_heads, head_dim):
    k, v, k_cache, v_cache, slots = _case("cuda", dtype, 40, 16, kv_heads, head_dim, 300)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    reshape_and_cache_ref(k, v, want_k, want_v, slots)
    reshape_and_cache_triton(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
