"""Write this step's K/V into the paged cache through the slot mapping (slot -1 = skip)."""
from __future__ import annotations

import torch

from ._triton_utils import HAS_TRITON, next_pow2, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _cache_write_kernel(
        k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
        stride_kt, stride_kh, stride_vt, stride_vh,
        stride_ks, stride_kch, stride_vs, stride_vch,
        NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        tok = tl.program_id(0)
        slot = tl.load(slot_ptr + tok).to(tl.int64)
        if slot < 0:
            return
        offs_h = tl.arange(0, BLOCK_H)[:, None]
        offs_d = tl.arange(0, BLOCK_D)[None, :]
        mask = (offs_h < NUM_HEADS) & (offs_d < HEAD_DIM)
        t64 = tok.to(tl.int64)
        k = tl.load(k_ptr + t64 * stride_kt + offs_h * stride_kh + offs_d, mask=mask)
        v = tl.load(v_ptr + t64 * stride_vt + offs_h * stride_vh + offs_d, mask=mask)
        k_dst = k_cache_ptr + slot * stride_ks + offs_h * stride_kch + offs_d
        v_dst = v_cache_ptr + slot * stride_vs + offs_h * stride_vch + offs_d
        tl.store(k_dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def reshape_and_cache_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          slot_mapping: torch.Tensor) -> None:
    # k, v: [num_tokens, num_kv_heads, head_dim]; caches: [num_blocks, block_size, num_kv_heads, head_dim]
    # slot_mapping: [num_tokens] int64 (block_id * block_size + offset; -1 = do not write)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    num_kv_heads, head_dim = k_cache.shape[2:]
    k_cache.view(-1, num_kv_heads, head_dim)[slots] = k[keep].to(k_cache.dtype)
    v_cache.view(-1, num_kv_heads, head_dim)[slots] = v[keep].to(v_cache.dtype)


def reshape_and_cache_triton(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                             slot_mapping: torch.Tensor) -> None:
    num_tokens, num_kv_heads, head_dim = k.shape
    assert k_cache.is_contiguous() and v_cache.is_contiguous(), "KV cache must be contiguous"
    assert k.stride(-1) == 1 and v.stride(-1) == 1, "k/v last dim must be contiguous"
    assert k_cache.shape[2:] == (num_kv_heads, head_dim)
    if num_tokens == 0:
        return
    _cache_write_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(1), k_cache.stride(2), v_cache.stride(1), v_cache.stride(2),
        NUM_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_H=next_pow2(num_kv_heads), BLOCK_D=next_pow2(head_dim),
        num_warps=4,
    )


def reshape_and_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor) -> None:
    """Scatter new K/V rows into the paged cache in place; rows whose slot is -1 are skipped."""
    if use_triton(k):
        reshape_and_cache_triton(k, v, k_cache, v_cache, slot_mapping)
    else:
        reshape_and_cache_ref(k, v, k_cache, v_cache, slot_mapping)
