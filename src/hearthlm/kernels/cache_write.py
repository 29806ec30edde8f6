"""Write this step's K/V into the paged cache through the slot mapping (slot -1 = skip).

Quantized pools (kv_quant.QuantizedKVCache) get codes + one fp32 scale per (slot, kv head), computed by
the same fp32 ops as `kv_quant.quantize_kv`.
"""
from __future__ import annotations

import torch

from ._triton_utils import HAS_TRITON, next_pow2, use_triton
from .kv_quant import QMAX, KVPool, split_pool, write_pool

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _round_to_e4m3(y):
        """Round fp32 y (|y| <= 448) to the nearest-even e4m3 value, in fp32. The final fp32 -> fp8 cast is
        then exact, which keeps codes identical across GPUs, torch and the Triton interpreter (whose
        fp8 rounding mishandles mantissa carries)."""
        bits = y.to(tl.int32, bitcast=True)
        # normal range: keep 3 mantissa bits, round to nearest even on bit 20
        bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576  # & ~0xFFFFF
        normal = bits.to(tl.float32, bitcast=True)
        # subnormal range (|y| < 2^-6): multiples of 2^-9, rounded to nearest even by the 1.5 * 2^14 trick
        # (on |y|, then the sign put back: tiny negatives round to -0 as in torch)
        sub = (tl.abs(y) + 24576.0) - 24576.0
        sub = tl.where(y < 0.0, -sub, sub)
        return tl.where(tl.abs(y) < 0.015625, sub, normal)

    @triton.jit
    def _store_e4m3(x, dst, mask, HW_CAST: tl.constexpr):
        y = tl.minimum(tl.maximum(x.to(tl.float32), -448.0), 448.0)
        if not HW_CAST:
            y = _round_to_e4m3(y)
        tl.store(dst, y.to(dst.dtype.element_ty), mask=mask)

    @triton.jit
    def _quantize_store(x, dst, scale_dst, mask, h_mask, QMAX_: tl.constexpr, FP8: tl.constexpr,
                        HW_CAST: tl.constexpr):
        """x: [BLOCK_H, BLOCK_D] -> codes at dst, absmax / QMAX per head at scale_dst (IEEE divisions)."""
        x = tl.where(mask, x.to(tl.float32), 0.0)
        scale = tl.math.div_rn(tl.max(tl.abs(x), 1), QMAX_)  # [BLOCK_H]
        y = tl.math.div_rn(x, tl.where(scale > 0.0, scale, 1.0)[:, None])
        y = tl.minimum(tl.maximum(y, -QMAX_), QMAX_)
        if FP8:
            if not HW_CAST:  # the interpreter's float32 -> fp8 cast misrounds; the GPU's cvt.rn is exact
                y = _round_to_e4m3(y)
        else:
            y = tl.floor(y + 0.5)  # halves round up (no fast-math-fragile tricks); quantize_kv does the same
        tl.store(dst, y.to(dst.dtype.element_ty), mask=mask)
        tl.store(scale_dst, scale, mask=h_mask)

    @triton.jit
    def _cache_write_kernel(
        k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, k_scale_ptr, v_scale_ptr,
        stride_kt, stride_kh, stride_vt, stride_vh,
        stride_ks, stride_kch, stride_vs, stride_vch, stride_kss, stride_vss,
        NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
        QUANT: tl.constexpr, QMAX_: tl.constexpr, FP8: tl.constexpr, HW_CAST: tl.constexpr,
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
        if QUANT:  # codes + one scale per (slot, head); scales: [slots, NUM_HEADS] contiguous
            heads = tl.arange(0, BLOCK_H)
            h_mask = heads < NUM_HEADS
            _quantize_store(k, k_dst, k_scale_ptr + slot * stride_kss + heads, mask, h_mask, QMAX_, FP8, HW_CAST)
            _quantize_store(v, v_dst, v_scale_ptr + slot * stride_vss + heads, mask, h_mask, QMAX_, FP8, HW_CAST)
        elif FP8:  # plain e4m3 pool (fp8_e4m3): saturate, then the same rounding as torch
            _store_e4m3(k, k_dst, mask, HW_CAST)
            _store_e4m3(v, v_dst, mask, HW_CAST)
        else:
            tl.store(k_dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
            tl.store(v_dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def reshape_and_cache_ref(k: torch.Tensor, v: torch.Tensor, k_cache: KVPool, v_cache: KVPool,
                          slot_mapping: torch.Tensor) -> None:
    # k, v: [num_tokens, num_kv_heads, head_dim]; caches: [num_blocks, block_size, num_kv_heads, head_dim]
    # (or QuantizedKVCache: codes of that shape + scales [num_blocks, block_size, num_kv_heads])
    # slot_mapping: [num_tokens] int64 (block_id * block_size + offset; -1 = do not write)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    write_pool(k_cache, k[keep], slots)
    write_pool(v_cache, v[keep], slots)


def reshape_and_cache_triton(k: torch.Tensor, v: torch.Tensor, k_cache: KVPool, v_cache: KVPool,
                             slot_mapping: torch.Tensor) -> None:
    num_tokens, num_kv_heads, head_dim = k.shape
    kc, ks = split_pool(k_cache)
    vc, vs = split_pool(v_cache)
    assert kc.is_contiguous() and vc.is_contiguous(), "KV cache must be contiguous"
    assert k.stride(-1) == 1 and v.stride(-1) == 1, "k/v last dim must be contiguous"
    assert kc.shape[2:] == (num_kv_heads, head_dim)
    quant = ks is not None
    assert quant == (vs is not None) and (not quant or (kc.dtype == vc.dtype and ks.is_contiguous()
                                                        and vs.is_contiguous()))
    if num_tokens == 0:
        return
    kind = k_cache.kind if quant else ""
    _cache_write_kernel[(num_tokens,)](
        k, v, kc, vc, slot_mapping, ks if quant else kc, vs if quant else vc,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kc.stride(1), kc.stride(2), vc.stride(1), vc.stride(2),
        ks.stride(1) if quant else 0, vs.stride(1) if quant else 0,
        NUM_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_H=next_pow2(num_kv_heads), BLOCK_D=next_pow2(head_dim),
        QUANT=quant, QMAX_=QMAX.get(kind, 0.0), FP8=kc.dtype == torch.float8_e4m3fn,
        HW_CAST=not triton.knobs.runtime.interpret,
        num_warps=4,
    )


def reshape_and_cache(k: torch.Tensor, v: torch.Tensor, k_cache: KVPool, v_cache: KVPool,
                      slot_mapping: torch.Tensor) -> None:
    """Scatter new K/V rows into the paged cache in place; rows whose slot is -1 are skipped."""
    if use_triton(k):
        reshape_and_cache_triton(k, v, k_cache, v_cache, slot_mapping)
    else:
        reshape_and_cache_ref(k, v, k_cache, v_cache, slot_mapping)
