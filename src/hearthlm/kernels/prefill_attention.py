"""Prefill (ragged, causal) attention over the paged KV cache, flash-attention style.

One program per (query tile, sequence, kv head). A tile holds BLOCK_Q query tokens times the GROUP
query heads sharing the kv head (rows = token * GROUP + head), so keys/values are read once per
group and q_len = 1 rows (decodes mixed into a prefill batch) are handled by the same code.
Keys (cached prefix + this step's tokens, already written) are gathered through the block table.
Quantized pools (KV_QUANT) are dequantized in registers as in paged_attention.py: codes in the query
dtype inside the dots, per-key scales applied to the scores and to p.
"""
from __future__ import annotations

import torch

from ._triton_utils import HAS_TRITON, next_pow2, use_triton
from .kv_quant import KVPool, attention_pools
from .paged_attention import attend_ref, gather_kv

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .paged_attention import _tile_accumulate, _tile_scores

    @triton.jit(do_not_specialize=["first_seq"])
    def _prefill_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, cu_seqlens_q_ptr, seq_lens_ptr,
        k_scale_ptr, v_scale_ptr, sinks_ptr, first_seq,
        scale, softcap, window,
        stride_qt, stride_qh, stride_ot, stride_oh,
        stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
        stride_ksb, stride_kst, stride_vsb, stride_vst,
        stride_bt, block_size,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
        USE_SOFTCAP: tl.constexpr, USE_WINDOW: tl.constexpr, FP32_DOT: tl.constexpr,
        KV_QUANT: tl.constexpr, KV_SCALED: tl.constexpr, USE_SINKS: tl.constexpr,
    ):
        q_tile = tl.program_id(0)
        seq = tl.program_id(1) + first_seq
        kvh = tl.program_id(2)
        q_start = tl.load(cu_seqlens_q_ptr + seq)
        q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
        t0 = q_tile * BLOCK_Q
        if t0 >= q_len:
            return
        seq_len = tl.load(seq_lens_ptr + seq)
        ctx_start = seq_len - q_len  # position of this step's first token

        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        tok = offs_m // GROUP
        heads = kvh * GROUP + offs_m % GROUP
        row_valid = (tok < BLOCK_Q) & (t0 + tok < q_len)
        d_mask = offs_d < HEAD_DIM
        q_pos = ctx_start + t0 + tok
        tok64 = (q_start + t0 + tok).to(tl.int64)
        q_mask = row_valid[:, None] & d_mask[None, :]
        q = tl.load(q_ptr + tok64[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=q_mask, other=0.0)
        if KV_QUANT and not FP32_DOT:  # codes -> fp16 is native (e4m3x2 -> f16x2); -> bf16 is emulated
            q = q.to(tl.float16)

        hi = tl.minimum(ctx_start + tl.minimum(t0 + BLOCK_Q, q_len), seq_len)  # last query pos + 1
        lo = 0
        if USE_WINDOW:  # key tiles start at multiples of BLOCK_N: a row's tiles do not depend on its query tile
            lo = tl.maximum(ctx_start + t0 - window + 1, 0) // BLOCK_N * BLOCK_N

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
        for n0 in range(lo, hi, BLOCK_N):
            pos = n0 + offs_n
            n_mask = pos < hi
            s, blk, off = _tile_scores(q, bt_row, pos, n_mask, offs_d, d_mask, kvh, scale, softcap, block_size,
                                       k_cache_ptr, stride_kb, stride_kt, stride_kh, k_scale_ptr, stride_ksb,
                                       stride_kst, USE_SOFTCAP, FP32_DOT, KV_QUANT, KV_SCALED)
            mask = n_mask[None, :] & (pos[None, :] <= q_pos[:, None])
            if USE_WINDOW:
                mask = mask & (pos[None, :] > q_pos[:, None] - window)
            s = tl.where(mask, s * 1.4426950408889634, float("-inf"))  # log2 domain
            m_i, l_i, acc = _tile_accumulate(q, s, m_i, l_i, acc, blk, off, n_mask, offs_d, d_mask, kvh,
                                             v_cache_ptr, stride_vb, stride_vt, stride_vh, v_scale_ptr, stride_vsb,
                                             stride_vst, FP32_DOT, KV_QUANT, KV_SCALED)

        denom = l_i
        if USE_SINKS:  # one more logit per head, with a zero value
            denom += tl.exp2(tl.load(sinks_ptr + heads) * 1.4426950408889634 - m_i)
        out = acc / tl.where(denom == 0.0, 1.0, denom)[:, None]
        tl.store(out_ptr + tok64[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=q_mask)


# --batch-invariant tiling by head_dim (<= 128, larger): (BLOCK_M, BLOCK_N, num_warps) for every step
INVARIANT_TILES = {False: (64, 64, 4), True: (32, 32, 4)}


def paged_prefill_attention_ref(q: torch.Tensor, k_cache: KVPool, v_cache: KVPool,
                                block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
                                scale: float, softcap: float | None = None, window: int | None = None,
                                max_seqlen_q: int | None = None, first_seq: int = 0,
                                out: torch.Tensor | None = None, sinks: torch.Tensor | None = None
                                ) -> torch.Tensor:
    # q: [num_tokens, num_heads, head_dim]; cu_seqlens_q: [num_seqs + 1] int32; seq_lens: [num_seqs] int32
    # -> [num_tokens, num_heads, head_dim]
    if out is None:
        out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    cu = cu_seqlens_q.tolist()
    for i, seq_len in enumerate(seq_lens.tolist()):
        if i < first_seq:
            continue
        q_len = cu[i + 1] - cu[i]
        if q_len == 0:
            continue
        k = gather_kv(k_cache, block_tables[i], seq_len)
        v = gather_kv(v_cache, block_tables[i], seq_len)
        pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
        out[cu[i]:cu[i + 1]] = attend_ref(q[cu[i]:cu[i + 1]], k, v, pos, scale, softcap, window, sinks)
    return out


def paged_prefill_attention_triton(q: torch.Tensor, k_cache: KVPool, v_cache: KVPool,
                                   block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
                                   scale: float, softcap: float | None = None, window: int | None = None,
                                   max_seqlen_q: int | None = None, block_m: int | None = None,
                                   block_n: int | None = None, num_warps: int = 4,
                                   num_stages: int = 2, first_seq: int = 0,
                                   out: torch.Tensor | None = None, invariant: bool = False,
                                   sinks: torch.Tensor | None = None) -> torch.Tensor:
    # invariant: one tiling (INVARIANT_TILES) whatever the step holds, so each row's arithmetic is fixed
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    k_cache, k_scales, v_cache, v_scales, kv_quant, kv_scaled = attention_pools(k_cache, v_cache)
    assert num_heads % num_kv_heads == 0, "num_heads must be a multiple of num_kv_heads"
    assert q.stride(-1) == 1
    assert window is None or window > 0
    group = num_heads // num_kv_heads
    num_seqs = seq_lens.shape[0]
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_tokens == 0 or num_seqs <= first_seq:
        return out
    if max_seqlen_q is None:  # host sync; callers usually know it already
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    block_d = next_pow2(head_dim)
    if invariant:
        block_m, block_n, num_warps = INVARIANT_TILES[block_d > 128]
    if block_m is None:
        big = 64 if block_d > 128 else 128
        block_m = 16 if max_seqlen_q * group <= 16 else big
    block_m = max(block_m, next_pow2(group))
    if block_n is None:
        block_n = 32 if block_d > 128 else 64
    block_q = block_m // group
    grid = (-(-max_seqlen_q // block_q), num_seqs - first_seq, num_kv_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, block_tables, cu_seqlens_q, seq_lens, k_scales, v_scales,
        sinks if sinks is not None else seq_lens, first_seq,
        float(scale), float(softcap or 0.0), int(window or 0),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        *((k_scales.stride(0), k_scales.stride(1), v_scales.stride(0), v_scales.stride(1)) if kv_scaled
          else (0, 0, 0, 0)),
        block_tables.stride(0), block_size,
        HEAD_DIM=head_dim, BLOCK_D=block_d, GROUP=group, BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=block_n,
        USE_SOFTCAP=softcap is not None, USE_WINDOW=window is not None, FP32_DOT=q.dtype == torch.float32,
        KV_QUANT=kv_quant, KV_SCALED=kv_scaled, USE_SINKS=sinks is not None,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


def paged_prefill_attention(q: torch.Tensor, k_cache: KVPool, v_cache: KVPool,
                            block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
                            scale: float, softcap: float | None = None, window: int | None = None,
                            max_seqlen_q: int | None = None, first_seq: int = 0,
                            out: torch.Tensor | None = None, invariant: bool = False,
                            sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention for a ragged batch of new tokens (any q_len >= 1 per sequence).

    q: [num_tokens, num_heads, head_dim], packed by sequence; cu_seqlens_q: [num_seqs + 1] int32
    k_cache/v_cache: [num_blocks, block_size, num_kv_heads, head_dim] (new K/V already written), or
    kv_quant.QuantizedKVCache pools (fp8/int8 codes of that shape + float32 scales)
    block_tables: [num_seqs, max_blocks_per_seq] int32; seq_lens: [num_seqs] int32 (incl. new tokens)
    Token i of sequence b sits at position seq_len_b - q_len_b + i. returns [num_tokens, num_heads, head_dim].
    first_seq: attend only sequences first_seq.. (their rows of `out`, which is returned; others untouched).
    invariant: one fixed tiling for every call (--batch-invariant), decode rows included.
    sinks: [num_heads] float32 attention sinks (gpt-oss) or None.
    """
    if use_triton(q):
        return paged_prefill_attention_triton(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens,
                                              scale, softcap, window, max_seqlen_q, first_seq=first_seq, out=out,
                                              invariant=invariant, sinks=sinks)
    return paged_prefill_attention_ref(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens,
                                       scale, softcap, window, max_seqlen_q, first_seq=first_seq, out=out,
                                       sinks=sinks)
