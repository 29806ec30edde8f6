"""Rotary embeddings, neox / HF rotate_half layout, applied in place from a cos|sin cache.

cos_sin_cache[p] = [cos(p * inv_freq) | sin(p * inv_freq)], shape [max_pos, head_dim] fp32.
For x = [x1 | x2] (halves of head_dim): out = [x1 cos - x2 sin | x2 cos + x1 sin], computed in fp32.
Optionally each head is RMS-normalised first (Qwen3's q_norm / k_norm), in the same pass, and the rotated k
with v is written into an unscaled paged KV pool (what `reshape_and_cache` does, one launch less per layer).
"""
from __future__ import annotations

import math

import torch

from ._triton_utils import HAS_TRITON, next_pow2, use_triton
from .kv_quant import KVPool, QuantizedKVCache
from .rmsnorm import rms_norm_ref

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .cache_write import _store_e4m3

    @triton.jit
    def _rotate(x_ptr, tok, stride_t, stride_h, num_heads, cos, sin, w_ptr, eps,
                HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, NORM: tl.constexpr):
        offs_h = tl.arange(0, BLOCK_H)[:, None]
        offs_i = tl.arange(0, BLOCK_HALF)[None, :]
        mask = (offs_h < num_heads) & (offs_i < HALF)
        p1 = x_ptr + tok * stride_t + offs_h * stride_h + offs_i
        x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(p1 + HALF, mask=mask, other=0.0).to(tl.float32)
        if NORM:  # per-head RMSNorm, rounded to the activation dtype like the unfused norm
            rstd = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF) + eps)[:, None]
            w1 = tl.load(w_ptr + offs_i, mask=offs_i < HALF, other=0.0).to(tl.float32)
            w2 = tl.load(w_ptr + HALF + offs_i, mask=offs_i < HALF, other=0.0).to(tl.float32)
            x1 = (x1 * rstd).to(x_ptr.dtype.element_ty).to(tl.float32) * w1
            x2 = (x2 * rstd).to(x_ptr.dtype.element_ty).to(tl.float32) * w2
            x1 = x1.to(x_ptr.dtype.element_ty).to(tl.float32)
            x2 = x2.to(x_ptr.dtype.element_ty).to(tl.float32)
        o1 = (x1 * cos - x2 * sin).to(x_ptr.dtype.element_ty)
        o2 = (x2 * cos + x1 * sin).to(x_ptr.dtype.element_ty)
        tl.store(p1, o1, mask=mask)
        tl.store(p1 + HALF, o2, mask=mask)
        return o1, o2, mask

    @triton.jit
    def _store_row(x, dst, mask, FP8: tl.constexpr, HW_CAST: tl.constexpr):
        if FP8:
            _store_e4m3(x, dst, mask, HW_CAST)
        else:
            tl.store(dst, x.to(dst.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_kernel(q_ptr, k_ptr, pos_ptr, cache_ptr, qw_ptr, kw_ptr, eps,
                     v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                     stride_qt, stride_qh, stride_kt, stride_kh, stride_cache,
                     stride_vt, stride_vh, stride_ks, stride_kch, stride_vs, stride_vch,
                     num_q_heads, num_k_heads,
                     HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
                     BLOCK_HALF: tl.constexpr, NORM: tl.constexpr, WRITE_KV: tl.constexpr,
                     FP8: tl.constexpr, HW_CAST: tl.constexpr):
        tok = tl.program_id(0).to(tl.int64)
        pos = tl.load(pos_ptr + tok).to(tl.int64)
        offs_i = tl.arange(0, BLOCK_HALF)[None, :]
        c_mask = offs_i < HALF
        cos = tl.load(cache_ptr + pos * stride_cache + offs_i, mask=c_mask, other=0.0)
        sin = tl.load(cache_ptr + pos * stride_cache + HALF + offs_i, mask=c_mask, other=0.0)
        _rotate(q_ptr, tok, stride_qt, stride_qh, num_q_heads, cos, sin, qw_ptr, eps, HALF, BLOCK_HQ, BLOCK_HALF, NORM)
        k1, k2, mask = _rotate(k_ptr, tok, stride_kt, stride_kh, num_k_heads, cos, sin, kw_ptr, eps, HALF, BLOCK_HK,
                               BLOCK_HALF, NORM)
        if WRITE_KV:  # slot -1: nothing to write (padded rows)
            slot = tl.load(slot_ptr + tok)
            if slot >= 0:
                offs_h = tl.arange(0, BLOCK_HK)[:, None]
                k_dst = k_cache_ptr + slot * stride_ks + offs_h * stride_kch + offs_i
                _store_row(k1, k_dst, mask, FP8, HW_CAST)
                _store_row(k2, k_dst + HALF, mask, FP8, HW_CAST)
                v_src = v_ptr + tok * stride_vt + offs_h * stride_vh + offs_i
                v_dst = v_cache_ptr + slot * stride_vs + offs_h * stride_vch + offs_i
                _store_row(tl.load(v_src, mask=mask), v_dst, mask, FP8, HW_CAST)
                _store_row(tl.load(v_src + HALF, mask=mask), v_dst + HALF, mask, FP8, HW_CAST)


def rope_inv_freq(head_dim: int, theta: float, rope_scaling: dict | None = None,
                  inv_freq_divisors: torch.Tensor | None = None) -> torch.Tensor:
    """inv_freq [head_dim // 2] fp32, exactly as HF computes it (default, linear, llama3, yarn, dynamic with a static
    base; yarn's cos/sin scale: rope_attention_factor).

    inv_freq_divisors: GGUF `rope_freqs` tensor (llama.cpp's form of Llama-3 scaling): inv_freq / divisors,
    applied instead of rope_scaling.
    """
    rotary_dim = (rope_scaling or {}).get("rotary_dim")
    if rotary_dim and rotary_dim < head_dim:  # partial rotary: the rest 0 (cos 1, sin 0; models/phi3.py's layout)
        inner = rope_inv_freq(rotary_dim, theta, {k: v for k, v in rope_scaling.items() if k != "rotary_dim"},
                              inv_freq_divisors)
        return torch.cat([inner, inner.new_zeros((head_dim - rotary_dim) // 2)])
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if inv_freq_divisors is not None:
        return inv_freq / inv_freq_divisors.float().cpu()
    rope_type = (rope_scaling or {}).get("rope_type", (rope_scaling or {}).get("type", "default"))
    if rope_type in (None, "default"):
        return inv_freq
    if rope_type == "linear":
        return inv_freq / rope_scaling["factor"]
    if rope_type == "llama3":  # mirrors transformers' _compute_llama3_parameters line by line
        factor = rope_scaling["factor"]
        low_freq_factor = rope_scaling["low_freq_factor"]
        high_freq_factor = rope_scaling["high_freq_factor"]
        old_context_len = rope_scaling["original_max_position_embeddings"]
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed_inv_freq = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
        is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium_freq, smoothed_inv_freq, inv_freq_llama)
    if rope_type == "yarn":  # mirrors transformers' _compute_yarn_parameters
        factor = rope_scaling["factor"]
        original = rope_scaling["original_max_position_embeddings"]
        beta_fast, beta_slow = rope_scaling.get("beta_fast") or 32, rope_scaling.get("beta_slow") or 1

        def correction_dim(rotations: float) -> float:
            return (head_dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if rope_scaling.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, head_dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        pos_freqs = theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
        extrapolation = 1 - ramp
        return (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    if rope_type == "dynamic":
        # Dynamic NTK with a static base, as vLLM does: HF rescales per forward from the batch's longest sequence,
        # which would make a request's tokens depend on its neighbours. The base is HF's at seq_len = factor *
        # original_max_position_embeddings (the longest context the scaling is meant for), fixed for the engine.
        factor = rope_scaling["factor"]
        original = rope_scaling["original_max_position_embeddings"]
        seq_len = factor * original
        base = theta * ((factor * seq_len / original) - (factor - 1)) ** (head_dim / (head_dim - 2))
        return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope_type in ("longrope", "su"):
        # LongRoPE (Phi-3): HF picks long_factor when the current sequence exceeds original_max_position_embeddings,
        # which would re-rotate earlier positions as a request grows. As vLLM, the choice is fixed for the engine:
        # long when its context (max_model_len, else max_position_embeddings) exceeds the original length.
        ext = torch.tensor(rope_scaling["long_factor" if longrope_uses_long(rope_scaling) else "short_factor"],
                           dtype=torch.float32)
        return 1.0 / (ext * theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    raise NotImplementedError(
        f"rope_scaling type {rope_type!r} is not supported (supported: default, linear, llama3, yarn, dynamic, "
        "longrope); "
        "use a model without it or add it to hearthlm/kernels/rope.py")


def longrope_uses_long(rope_scaling: dict) -> bool:
    """LongRoPE's factor choice for the engine: long_factor iff its context (the dict's max_model_len, else
    max_position_embeddings) exceeds original_max_position_embeddings."""
    ctx = rope_scaling.get("max_model_len") or rope_scaling.get("max_position_embeddings") or 0
    return ctx > rope_scaling["original_max_position_embeddings"]


def rope_attention_factor(rope_scaling: dict | None) -> float:
    """The factor YaRN and LongRoPE scale cos and sin by (HF's attention_scaling): attention_factor, else YaRN's
    from factor and mscale / mscale_all_dim, LongRoPE's from factor (else max_position_embeddings / original);
    1.0 for every other kind."""
    rs = rope_scaling or {}
    kind = rs.get("rope_type", rs.get("type"))
    if kind in ("longrope", "su"):
        if rs.get("attention_factor") is not None:
            return float(rs["attention_factor"])
        original = rs["original_max_position_embeddings"]
        factor = rs.get("factor") or (rs.get("max_position_embeddings") or original) / original
        return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    if kind != "yarn":
        return 1.0
    if rs.get("attention_factor") is not None:
        return float(rs["attention_factor"])

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    factor = rs["factor"]
    if rs.get("mscale") and rs.get("mscale_all_dim"):
        return float(mscale(factor, rs["mscale"]) / mscale(factor, rs["mscale_all_dim"]))
    return mscale(factor)


def build_cos_sin_cache(head_dim: int, max_pos: int, theta: float, rope_scaling: dict | None = None,
                        inv_freq_divisors: torch.Tensor | None = None,
                        device: torch.device | str | None = None) -> torch.Tensor:
    """-> [max_pos, head_dim] fp32: cos(p * inv_freq) in the first half, sin in the second (HF values)."""
    inv_freq = rope_inv_freq(head_dim, theta, rope_scaling, inv_freq_divisors)
    freqs = torch.arange(max_pos, dtype=torch.float32)[:, None] * inv_freq[None, :]  # [max_pos, head_dim/2]
    cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
    factor = rope_attention_factor(rope_scaling)
    return (cache if factor == 1.0 else cache * factor).to(device)


QKNorm = tuple  # (q_norm weight, k_norm weight, eps)


def apply_rope_ref_(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                    qk_norm: QKNorm | None = None) -> None:
    # q: [num_tokens, num_heads, head_dim]; k: [num_tokens, num_kv_heads, head_dim] (both rotated in place)
    # positions: [num_tokens] int; cos_sin_cache: [max_pos, head_dim] fp32
    half = cos_sin_cache.shape[-1] // 2
    cs = cos_sin_cache[positions.long()]
    cos, sin = cs[:, None, :half], cs[:, None, half:]
    for i, x in enumerate((q, k)):
        if qk_norm is not None:
            x.copy_(rms_norm_ref(x, qk_norm[i], qk_norm[2]).view_as(x))
        x1, x2 = x[..., :half].float(), x[..., half:].float()
        rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        x.copy_(rotated.to(x.dtype))


def apply_rope_triton_(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                       cos_sin_cache: torch.Tensor, qk_norm: QKNorm | None = None,
                       kv_write: tuple[torch.Tensor, KVPool, KVPool, torch.Tensor] | None = None) -> None:
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    assert cos_sin_cache.shape[-1] == head_dim and k.shape[-1] == head_dim, "rotary_dim must equal head_dim"
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and cos_sin_cache.is_contiguous()
    assert cos_sin_cache.dtype == torch.float32
    if num_tokens == 0:
        return
    half = head_dim // 2
    qw, kw, eps = qk_norm if qk_norm is not None else (cos_sin_cache, cos_sin_cache, 0.0)
    if kv_write is not None:
        v, kc, vc, slots = kv_write
        assert can_fuse_kv_write(kc, vc) and v.stride(-1) == 1 and kc.shape[2:] == (num_kv_heads, head_dim)
        kv_args = (v, kc, vc, slots)
        kv_strides = (v.stride(0), v.stride(1), kc.stride(1), kc.stride(2), vc.stride(1), vc.stride(2))
    else:
        kv_args, kv_strides = (k, k, k, positions), (0,) * 6
    _rope_kernel[(num_tokens,)](
        q, k, positions, cos_sin_cache, qw, kw, eps, *kv_args,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin_cache.stride(0), *kv_strides,
        num_heads, num_kv_heads,
        HALF=half, BLOCK_HQ=next_pow2(num_heads), BLOCK_HK=next_pow2(num_kv_heads),
        BLOCK_HALF=next_pow2(half), NORM=qk_norm is not None, WRITE_KV=kv_write is not None,
        FP8=kv_write is not None and kv_write[1].dtype == torch.float8_e4m3fn,
        HW_CAST=not triton.knobs.runtime.interpret, num_warps=4,
    )


def can_fuse_kv_write(k_cache: KVPool, v_cache: KVPool) -> bool:
    """Whether apply_rope_ can write K/V into these pools itself: unscaled, contiguous pools."""
    return not isinstance(k_cache, QuantizedKVCache) and not isinstance(v_cache, QuantizedKVCache) \
        and k_cache.is_contiguous() and v_cache.is_contiguous()


def apply_rope_(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                qk_norm: QKNorm | None = None,
                kv_write: tuple[torch.Tensor, KVPool, KVPool, torch.Tensor] | None = None) -> None:
    """Rotate q and k in place (rotate_half style), after a per-head RMSNorm when qk_norm = (q weight,
    k weight, eps) is given. q: [T, H, D], k: [T, KVH, D], positions: [T].
    kv_write = (v, k_cache, v_cache, slot_mapping): also store the rotated k and v into those (unscaled) pools,
    as reshape_and_cache would (slot -1: skipped)."""
    if use_triton(q):
        apply_rope_triton_(q, k, positions, cos_sin_cache, qk_norm, kv_write)
        return
    apply_rope_ref_(q, k, positions, cos_sin_cache, qk_norm)
    if kv_write is not None:
        from .cache_write import reshape_and_cache_ref

        v, kc, vc, slots = kv_write
        reshape_and_cache_ref(k, v, kc, vc, slots)
