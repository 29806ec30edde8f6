"""Decode attention over the paged KV cache: one query token per sequence, split-K over the context.

Triton path: `_decode_kernel` runs one program per (kv head, sequence, context split), the kv heads of a
sequence side by side (they read interleaved rows of the same blocks: BENCHMARKS.md); the program
handles all query heads of its GQA group at once (padded to 16 rows for tl.dot), streams keys/values
through the block table with an online softmax in fp32, and either writes the output directly
(one split) or a partial (normalized output, running max, running sum) that `_reduce_kernel`
merges. The split count depends only on shapes (never on seq_lens values), so launches are
CUDA-graph safe; each program splits its own sequence, so any split count is correct.

Quantized pools (KV_QUANT, see kv_quant.py): codes are converted to fp16 in registers (exact for e4m3 and
int8; the query is cast to fp16 too, as e4m3 -> fp16 is one instruction per pair on SM 8.9+ and -> bf16 is
not) and the per-key scales applied outside the dots: scores = (q . k_codes) x k_scale, and p x v_scale
weights the value codes. Plain e4m3 pools (--kv-cache-dtype fp8_e4m3: codes, no scales) take the same path
without the scales (KV_QUANT without KV_SCALED).
"""
from __future__ import annotations

import numpy as np
import torch

from ._triton_utils import HAS_TRITON, next_pow2, num_sms, use_triton
from .kv_quant import KVPool, as_bytes, attention_pools, gather_dequant

_MIN_TOKENS_PER_SPLIT = 128
_MAX_SPLITS = 64
ORDERED_UNSPLIT_PER_SM = 3  # see _num_splits (32 sequences x 8 kv heads, 2 a SM, still gain from splits)

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _tanh(x):
        return 2.0 * tl.sigmoid(2.0 * x) - 1.0

    @triton.jit
    def _tile_scores(q, bt_row, pos, n_mask, offs_d, d_mask, kvh, scale, softcap, block_size,
                     k_cache_ptr, stride_kb, stride_kt, stride_kh, k_scale_ptr, stride_ksb, stride_kst,
                     USE_SOFTCAP: tl.constexpr, FP32_DOT: tl.constexpr, KV_QUANT: tl.constexpr,
                     KV_SCALED: tl.constexpr):
        """Scores of q against one tile of paged keys at positions pos: (q . k^T) * scale, softcapped.
        Returns (scores [rows, BLOCK_N] fp32, block ids, in-block offsets) of the tile."""
        blk = tl.load(bt_row + pos // block_size, mask=n_mask, other=0).to(tl.int64)
        off = pos % block_size
        k = tl.load(k_cache_ptr + blk[:, None] * stride_kb + off[:, None] * stride_kt + kvh * stride_kh
                    + offs_d[None, :], mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        if KV_QUANT:
            k = k.to(q.dtype)
        if FP32_DOT:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * scale
        if KV_SCALED:
            ks = tl.load(k_scale_ptr + blk * stride_ksb + off * stride_kst + kvh, mask=n_mask, other=0.0)
            s = s * ks[None, :]
        if USE_SOFTCAP:
            s = softcap * _tanh(s / softcap)
        return s, blk, off

    @triton.jit
    def _tile_accumulate(q, s, m_i, l_i, acc, blk, off, n_mask, offs_d, d_mask, kvh,
                         v_cache_ptr, stride_vb, stride_vt, stride_vh, v_scale_ptr, stride_vsb, stride_vst,
                         FP32_DOT: tl.constexpr, KV_QUANT: tl.constexpr, KV_SCALED: tl.constexpr):
        """Online-softmax step: fold one tile (s: masked scores in the log2 domain) into (m_i, l_i, acc)."""
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + blk[:, None] * stride_vb + off[:, None] * stride_vt + kvh * stride_vh
                    + offs_d[None, :], mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        pv = p
        if KV_QUANT:
            v = v.to(q.dtype)
        if KV_SCALED:
            vs = tl.load(v_scale_ptr + blk * stride_vsb + off * stride_vst + kvh, mask=n_mask, other=0.0)
            pv = p * vs[None, :]
        if FP32_DOT:
            acc = acc * alpha[:, None] + tl.dot(pv, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(pv.to(v.dtype), v)
        return m_new, l_i, acc

    @triton.jit
    def _decode_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, order_ptr,
        out_ptr, part_out_ptr, part_m_ptr, part_l_ptr,
        k_scale_ptr, v_scale_ptr, sinks_ptr,
        scale, softcap, window,
        stride_qs, stride_qh, stride_os, stride_oh,
        stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
        stride_ksb, stride_kst, stride_vsb, stride_vst,
        stride_bt, block_size, num_heads, num_splits,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
        BLOCK_N: tl.constexpr, WRITE_PARTIAL: tl.constexpr,
        USE_SOFTCAP: tl.constexpr, USE_WINDOW: tl.constexpr, FP32_DOT: tl.constexpr,
        KV_QUANT: tl.constexpr, KV_SCALED: tl.constexpr, HAS_ORDER: tl.constexpr, USE_SINKS: tl.constexpr,
    ):
        kvh = tl.program_id(0)  # the kv heads of one sequence run side by side: they share its blocks' DRAM rows
        seq = tl.program_id(1)
        if HAS_ORDER:  # programs take sequences longest context first: no long one starts in the last wave
            seq = tl.load(order_ptr + seq)
        split = tl.program_id(2)
        seq_len = tl.load(seq_lens_ptr + seq)
        start = 0
        if USE_WINDOW:  # query at p = seq_len - 1 sees keys p - window < pos <= p
            start = tl.maximum(seq_len - window, 0)
        per_split = (seq_len - start + num_splits - 1) // num_splits
        split_len = (per_split + BLOCK_N - 1) // BLOCK_N * BLOCK_N
        lo = start + split * split_len
        hi = tl.minimum(lo + split_len, seq_len)

        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        g_mask = offs_g < GROUP
        d_mask = offs_d < HEAD_DIM
        heads = kvh * GROUP + offs_g
        seq64 = seq.to(tl.int64)
        q = tl.load(q_ptr + seq64 * stride_qs + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=g_mask[:, None] & d_mask[None, :], other=0.0)
        if KV_QUANT and not FP32_DOT:  # codes -> fp16 is native (e4m3x2 -> f16x2); -> bf16 is emulated
            q = q.to(tl.float16)

        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        bt_row = block_tables_ptr + seq64 * stride_bt
        for n0 in range(lo, hi, BLOCK_N):
            pos = n0 + offs_n
            n_mask = pos < hi
            s, blk, off = _tile_scores(q, bt_row, pos, n_mask, offs_d, d_mask, kvh, scale, softcap, block_size,
                                       k_cache_ptr, stride_kb, stride_kt, stride_kh, k_scale_ptr, stride_ksb,
                                       stride_kst, USE_SOFTCAP, FP32_DOT, KV_QUANT, KV_SCALED)
            s = tl.where(n_mask[None, :], s * 1.4426950408889634, float("-inf"))  # log2 domain
            m_i, l_i, acc = _tile_accumulate(q, s, m_i, l_i, acc, blk, off, n_mask, offs_d, d_mask, kvh,
                                             v_cache_ptr, stride_vb, stride_vt, stride_vh, v_scale_ptr, stride_vsb,
                                             stride_vst, FP32_DOT, KV_QUANT, KV_SCALED)

        denom = l_i
        if USE_SINKS and not WRITE_PARTIAL:  # the sink joins the softmax once: here, or in the reduce
            denom += tl.exp2(tl.load(sinks_ptr + heads, mask=g_mask, other=0.0) * 1.4426950408889634 - m_i)
        out = acc / tl.where(denom == 0.0, 1.0, denom)[:, None]
        out_mask = g_mask[:, None] & d_mask[None, :]
        if not WRITE_PARTIAL:
            tl.store(out_ptr + seq64 * stride_os + heads[:, None] * stride_oh + offs_d[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=out_mask)
        else:
            row = (seq64 * num_heads + heads) * num_splits + split  # partials: [S, H, num_splits, (D)]
            tl.store(part_out_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], out, mask=out_mask)
            tl.store(part_m_ptr + row, m_i, mask=g_mask)
            tl.store(part_l_ptr + row, l_i, mask=g_mask)

    @triton.jit
    def _reduce_kernel(
        out_ptr, part_out_ptr, part_m_ptr, part_l_ptr, sinks_ptr, stride_os, stride_oh, num_splits,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, USE_SINKS: tl.constexpr,
    ):
        seq = tl.program_id(0)
        head = tl.program_id(1)
        num_heads = tl.num_programs(1)
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)
        s_mask = offs_s < num_splits
        d_mask = offs_d < HEAD_DIM
        row = (seq.to(tl.int64) * num_heads + head) * num_splits + offs_s
        m = tl.load(part_m_ptr + row, mask=s_mask, other=float("-inf"))
        l = tl.load(part_l_ptr + row, mask=s_mask, other=0.0)
        m_max = tl.max(m, 0)
        m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
        w = l * tl.exp2(m - m_max)  # empty splits: l = 0, m = -inf -> 0
        o = tl.load(part_out_ptr + row[:, None] * HEAD_DIM + offs_d[None, :],
                    mask=s_mask[:, None] & d_mask[None, :], other=0.0)
        denom = tl.sum(w, 0)
        if USE_SINKS:
            denom += tl.exp2(tl.load(sinks_ptr + head) * 1.4426950408889634 - m_max)
        out = tl.sum(o * w[:, None], 0) / tl.where(denom == 0.0, 1.0, denom)
        tl.store(out_ptr + seq.to(tl.int64) * stride_os + head * stride_oh + offs_d,
                 out.to(out_ptr.dtype.element_ty), mask=d_mask)


# ---------------------------------------------------------------------------------------------
# torch reference (shared with prefill_attention)
# ---------------------------------------------------------------------------------------------

def gather_kv(cache: KVPool, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    # cache: [num_blocks, block_size, num_kv_heads, head_dim]; block_table: [max_blocks] -> [seq_len, kv, D]
    # (quantized pools come back dequantized, in float32)
    block_size = cache.shape[1]
    num_blocks = -(-seq_len // block_size)
    ids = block_table[:num_blocks].long()
    if isinstance(cache, torch.Tensor):  # (fp8 gathered as bytes: no fp8 indexing kernels)
        return as_bytes(cache)[ids].view(cache.dtype).flatten(0, 1)[:seq_len]
    return gather_dequant(cache, ids, torch.float32).flatten(0, 1)[:seq_len]


def attend_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, scale: float,
               softcap: float | None, window: int | None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Dense masked attention of one sequence in fp32; key i sits at position i.

    q: [num_q, num_heads, head_dim]; k, v: [num_keys, num_kv_heads, head_dim]; q_pos: [num_q]
    returns [num_q, num_heads, head_dim] in q.dtype. Query at p attends p - window < pos <= p.
    """
    num_q, num_heads, head_dim = q.shape
    num_keys, num_kv_heads = k.shape[:2]
    group = num_heads // num_kv_heads
    kf, vf = k.float(), v.float()
    k_pos = torch.arange(num_keys, device=q.device)
    out = torch.empty(num_q, num_heads, v.shape[-1], dtype=q.dtype, device=q.device)
    chunk = max(1, (1 << 24) // max(1, num_heads * num_keys))  # bound the score matrix size
    for c0 in range(0, num_q, chunk):
        qc = q[c0:c0 + chunk].float().view(-1, num_kv_heads, group, head_dim)
        pc = q_pos[c0:c0 + chunk].to(q.device)
        s = torch.einsum("qkgd,tkd->kgqt", qc, kf) * scale
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        mask = k_pos[None, :] <= pc[:, None]
        if window is not None:
            mask &= k_pos[None, :] > pc[:, None] - window
        s = s.masked_fill(~mask, float("-inf"))
        if sinks is not None:  # [heads] -> [kv, g, 1, 1]: one more logit per head, with a zero value
            s = torch.cat([s, sinks.float().view(num_kv_heads, group, 1, 1).expand(*s.shape[:3], 1)], dim=-1)
        p = torch.softmax(s, dim=-1).nan_to_num_(0.0)  # rows without keys -> zeros
        if sinks is not None:
            p = p[..., :-1]
        o = torch.einsum("kgqt,tkd->qkgd", p, vf)
        out[c0:c0 + chunk] = o.reshape(-1, num_heads, v.shape[-1]).to(q.dtype)
    return out


def paged_decode_attention_ref(q: torch.Tensor, k_cache: KVPool, v_cache: KVPool,
                               block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                               softcap: float | None = None, window: int | None = None,
                               sinks: torch.Tensor | None = None) -> torch.Tensor:
    # q: [num_seqs, num_heads, head_dim]; caches: [num_blocks, block_size, num_kv_heads, head_dim]
    # block_tables: [num_seqs, max_blocks] int32; seq_lens: [num_seqs] int32 -> [num_seqs, num_heads, head_dim]
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    for i, seq_len in enumerate(seq_lens.tolist()):
        if seq_len <= 0:
            continue
        k = gather_kv(k_cache, block_tables[i], seq_len)
        v = gather_kv(v_cache, block_tables[i], seq_len)
        pos = torch.tensor([seq_len - 1], device=q.device)
        out[i:i + 1] = attend_ref(q[i:i + 1], k, v, pos, scale, softcap, window, sinks)
    return out


# ---------------------------------------------------------------------------------------------
# Triton launcher + dispatcher
# ---------------------------------------------------------------------------------------------

def _num_splits(num_seqs: int, num_kv_heads: int, max_ctx: int, device: torch.device,
                programs_per_sm: int = 20, ordered: bool = False) -> int:
    """About programs_per_sm programs per SM (rounded: one split while the batch alone nearly fills that),
    at least _MIN_TOKENS_PER_SPLIT keys each (programs_per_sm and ORDERED_UNSPLIT_PER_SM come from
    benchmarks/decode_attn_sweep.py; BENCHMARKS.md). Programs taking sequences longest first (ordered) need no
    split from ORDERED_UNSPLIT_PER_SM (sequence, kv head) programs per SM on."""
    if ordered and num_seqs * num_kv_heads >= ORDERED_UNSPLIT_PER_SM * num_sms(device):
        return 1
    by_length = -(-max_ctx // _MIN_TOKENS_PER_SPLIT)
    by_occupancy = round(programs_per_sm * num_sms(device) / max(1, num_seqs * num_kv_heads))
    return max(1, min(by_length, by_occupancy, _MAX_SPLITS))


def paged_decode_attention_triton(q: torch.Tensor, k_cache: KVPool, v_cache: KVPool,
                                  block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                                  softcap: float | None = None, window: int | None = None,
                                  max_seq_len: int | None = None, num_splits: int | None = None,
                                  block_n: int | None = None, num_warps: int = 4, num_stages: int = 2,
                                  out: torch.Tensor | None = None,
                                  seq_order: torch.Tensor | None = None,
                                  sinks: torch.Tensor | None = None) -> torch.Tensor:
    # q: [num_seqs, num_heads, head_dim] -> out: [num_seqs, num_heads, head_dim] (q.dtype)
    # max_seq_len: optional upper bound on seq_lens (only steers the split count; never read from GPU).
    # seq_order: [num_seqs] int32, a permutation, longest context first: the order programs take sequences in
    # sinks: [num_heads] float32 attention sinks or None
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    k_cache, k_scales, v_cache, v_scales, kv_quant, kv_scaled = attention_pools(k_cache, v_cache)
    assert num_heads % num_kv_heads == 0, "num_heads must be a multiple of num_kv_heads"
    assert q.stride(-1) == 1
    assert window is None or window > 0
    group = num_heads // num_kv_heads
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_seqs == 0:
        return out
    if num_splits is None:
        max_ctx = max_seq_len if max_seq_len is not None else block_tables.shape[1] * block_size
        if window is not None:
            max_ctx = min(max_ctx, window)
        num_splits = _num_splits(num_seqs, num_kv_heads, max_ctx, q.device, ordered=seq_order is not None)
    if num_splits > 1:
        part_out = torch.empty(num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        part_m = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
    else:
        part_out = part_m = part_l = out  # unused
    block_d = next_pow2(head_dim)
    if block_n is None:  # the faster tile on an H100 (tests/kernels/bench_paged_decode.py, BENCHMARKS.md)
        block_n = 128 if block_d <= 64 or (block_d <= 128 and num_splits == 1) else 64
    grid = (num_kv_heads, num_seqs, num_splits)
    _decode_kernel[grid](
        q, k_cache, v_cache, block_tables, seq_lens, seq_order if seq_order is not None else seq_lens, out,
        part_out, part_m, part_l, k_scales, v_scales, sinks if sinks is not None else seq_lens,
        float(scale), float(softcap or 0.0), int(window or 0),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        *((k_scales.stride(0), k_scales.stride(1), v_scales.stride(0), v_scales.stride(1)) if kv_scaled
          else (0, 0, 0, 0)),
        block_tables.stride(0), block_size, num_heads, num_splits,
        HEAD_DIM=head_dim, BLOCK_D=block_d, GROUP=group, BLOCK_G=max(16, next_pow2(group)),
        BLOCK_N=block_n, WRITE_PARTIAL=num_splits > 1,
        USE_SOFTCAP=softcap is not None, USE_WINDOW=window is not None,
        FP32_DOT=q.dtype == torch.float32, KV_QUANT=kv_quant, KV_SCALED=kv_scaled,
        HAS_ORDER=seq_order is not None, USE_SINKS=sinks is not None, num_warps=num_warps, num_stages=num_stages,
    )
    if num_splits > 1:
        _reduce_kernel[(num_seqs, num_heads)](
            out, part_out, part_m, part_l, sinks if sinks is not None else part_m, out.stride(0), out.stride(1),
            num_splits, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=next_pow2(num_splits),
            USE_SINKS=sinks is not None,
            num_warps=1 if block_d <= 64 else 2,
        )
    return out


def paged_decode_attention(q: torch.Tensor, k_cache: KVPool, v_cache: KVPool,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           softcap: float | None = None, window: int | None = None,
                           out: torch.Tensor | None = None, seq_order: torch.Tensor | None = None,
                           sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of each sequence's single new token (position seq_len - 1) over its cached context.

    q: [num_seqs, num_heads, head_dim]; k_cache/v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
    (or kv_quant.QuantizedKVCache pools: fp8/int8 codes of that shape + float32 scales)
    block_tables: [num_seqs, max_blocks_per_seq] int32; seq_lens: [num_seqs] int32 (incl. the new token)
    softcap: logits = softcap * tanh(logits / softcap) after scaling; window: attend p - window < pos <= p.
    returns [num_seqs, num_heads, head_dim] in q.dtype (zeros for seq_len == 0), in `out` when given.
    seq_order: optional [num_seqs] int32 permutation, longest context first (decode_order_of): only the order the
    kernel's programs take sequences in (and its split rule); results are the same.
    sinks: [num_heads] float32 (gpt-oss attention sinks: one more logit per head in the softmax, with a zero value).
    """
    if use_triton(q):
        return paged_decode_attention_triton(q, k_cache, v_cache, block_tables, seq_lens, scale, softcap, window,
                                             out=out, seq_order=seq_order, sinks=sinks)
    res = paged_decode_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, scale, softcap, window, sinks)
    return res if out is None else out.copy_(res)


def decode_order_of(seq_lens: np.ndarray) -> np.ndarray:
    """Sequence indices, longest context first (stable): a decode step's seq_order, computed on the host."""
    return np.argsort(-np.asarray(seq_lens, dtype=np.int64), kind="stable").astype(np.int32)


__all__ = ["attend_ref", "decode_order_of", "gather_kv", "paged_decode_attention",
           "paged_decode_attention_ref", "paged_decode_attention_triton"]
