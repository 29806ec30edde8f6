"""y = x @ W^T with W kept as group-wise codes on the GPU: w[n, k] = code[n, k] * scale[n, g] + min[n, g],
g = k // group.

Codes are packed into 16-bit words, T = 16 // bits codes per word (bits 4: unsigned 0..15, T = 4; bits 8:
signed int8, T = 2), in chunks of 8 words (16 bytes, the vector one GPU thread loads) covering 8 T weights:
word j of chunk c holds, in its bits [bits * t, bits * (t + 1)), the code of weight k = 8 T c + 8 t + j.
So sub-code t of a chunk's 8 words pairs with 8 consecutive x values (one 16-byte vector of bf16/fp16 x),
and a word tile [rows, words] and an x tile [words] have the same element size: the GEMV needs no layout
conversion. Group: a multiple of 8 T (32 for 4-bit, 16 for 8-bit), so a chunk has one scale.
  bits=4  Q4_0, Q4_1, Q4_K (exact up to the rounding of scale/min to their storage dtype) and int4-g32
  bits=8  Q8_0, int8-g32; Q5_0/1, Q5_K, Q6_K repacked one code per byte
scale, min: [N, K // group] float16 or float32 (min None = symmetric codes, e.g. Q8_0, Q6_K, int8).

Kernels (fp32 accumulation both):
  _gemv_kernel  decode (M <= QUANT_GEMV_MAX_ROWS): kernels/gemv.py's design -- one program per BLOCK_N rows over
                all of K; per chunk a thread sums code * x in registers and applies the chunk's scale once (and
                min * sum(x)); no shared memory or barriers inside the K loop, no split-K
  _mm_kernel    M <= QUANT_MM_MAX_ROWS: tl.dot per sub-code plane on tiles dequantized in registers, optional
                split-K
  _mmv_kernel   _mm_kernel with switches (KernelConfig.variant -> MM_VARIANTS); variant 9, the default on Hopper, is
                the one the product runs (benchmarks/quant_matmul_variants.py adds the others for A/B runs)
  _dequant_kernel  larger M (prefill): W to bf16/fp16 in one pass, then torch.matmul
`quant_matmul` dispatches by row count (kernels/row_dispatch.py; Triton for CUDA tensors, else the torch
reference `quant_matmul_ref`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._triton_utils import HAS_TRITON, interpreting, next_pow2, num_sms, use_triton
from .gemv import _SMS_GUESS
from .row_dispatch import QUANT_GEMV_MAX_ROWS, QUANT_MM_MAX_ROWS

GEMV_ROWS = 4  # rows the GEMV kernel's accumulators hold (a0..a3)
assert QUANT_GEMV_MAX_ROWS <= GEMV_ROWS


# ----------------------------------------------------------------------------------------- layouts + reference
def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[N, K] codes (4-bit: 0..15; 8-bit: -128..127; any int dtype; K % (128 // bits) == 0) -> [N, K * bits // 16]
    int16 words in the kernels' layout (see the module docstring)."""
    n, k = codes.shape
    t = 16 // bits
    assert bits in (4, 8) and k % (8 * t) == 0, f"{bits}-bit codes need K % {8 * t} == 0, got {k}"
    c = (codes.to(torch.int32) & ((1 << bits) - 1)).view(n, k // (8 * t), t, 8)
    words = sum(c[:, :, i] << (bits * i) for i in range(t))  # [N, chunks, 8], 0..65535
    return torch.where(words >= 32768, words - 65536, words).to(torch.int16).reshape(n, -1).contiguous()


def unpack_codes(words: torch.Tensor, bits: int) -> torch.Tensor:
    """[N, W] int16 words -> [N, W * 16 // bits] codes (4-bit: uint8 0..15; 8-bit: int8); inverse of pack_codes."""
    n, w = words.shape
    t = 16 // bits
    v = words.to(torch.int32).view(n, w // 8, 1, 8)
    c = (v >> (bits * torch.arange(t, device=words.device, dtype=torch.int32)[:, None])) & ((1 << bits) - 1)
    if bits == 8:
        return ((c ^ 128) - 128).to(torch.int8).reshape(n, -1)
    return c.to(torch.uint8).reshape(n, -1)


def code_width(codes: torch.Tensor, bits: int) -> int:
    """K of a packed [N, W] word tensor."""
    return codes.shape[1] * 16 // bits


def dequantize_ref(codes: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor | None, bits: int,
                   group: int) -> torch.Tensor:
    """-> W [N, K] float32."""
    q = unpack_codes(codes, bits)
    n, k = q.shape
    w = q.float().view(n, k // group, group) * scale.float()[..., None]
    if mins is not None:
        w = w + mins.float()[..., None]
    return w.view(n, k)


def quant_matmul_ref(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor | None,
                     bits: int, group: int) -> torch.Tensor:
    """x: [M, K] -> [M, N] in x.dtype (dequantize, then matmul in fp32)."""
    return (x.float() @ dequantize_ref(codes, scale, mins, bits, group).t()).to(x.dtype)


# ----------------------------------------------------------------------------------------------- Triton kernels
if HAS_TRITON:
    import triton
    import triton.language as tl

    from .gemv import _join_rows

    @triton.jit
    def _sub(q, t: tl.constexpr, T: tl.constexpr):
        """Sub-code t (of T per 16-bit word) as fp32: 4-bit unsigned (T = 4) or 8-bit signed (T = 2).
        Converted without I2F (a quarter-rate instruction that would bound the kernel): the code c (biased to
        c + 128 >= 0 for signed bytes) is OR-ed into the mantissa of 2^23, whose float value is then 2^23 + c."""
        if T == 4:
            v = ((q >> (4 * t)) & 15) | 0x4B000000
            return v.to(tl.float32, bitcast=True) - 8388608.0
        else:
            v = (((q >> (8 * t)) & 255) ^ 128) | 0x4B000000
            return v.to(tl.float32, bitcast=True) - 8388736.0

    @triton.jit
    def _xdot(p, xs, v, x_row, kk, w_mask, MASKED: tl.constexpr):
        if MASKED:
            x = tl.load(x_row + kk, mask=w_mask, other=0.0).to(tl.float32)
        else:
            x = tl.load(x_row + kk).to(tl.float32)
        return p + v * x[None, :], xs + x

    @triton.jit
    def _row_chunks(acc, v0, v1, v2, v3, x_row, kbase, w_mask, s, mn, MASKED: tl.constexpr, T: tl.constexpr,
                    HAS_MIN: tl.constexpr, NCH: tl.constexpr):
        """acc [BN, NCH] += per-chunk dot(codes, x) * scale (+ min * sum(x)); v_t: [BN, BW] sub-codes at K
        kbase + 8 t (kbase: [BW])."""
        p, xs = _xdot(0.0, 0.0, v0, x_row, kbase, w_mask, MASKED)
        p, xs = _xdot(p, xs, v1, x_row, kbase + 8, w_mask, MASKED)
        if T == 4:
            p, xs = _xdot(p, xs, v2, x_row, kbase + 16, w_mask, MASKED)
            p, xs = _xdot(p, xs, v3, x_row, kbase + 24, w_mask, MASKED)
        bn: tl.constexpr = p.shape[0]
        acc += tl.sum(tl.reshape(p, [bn, NCH, 8]), axis=2) * s
        if HAS_MIN:  # sum(x) per chunk, in the accumulator's layout (a broadcast, then the same reduction as p)
            acc += tl.sum(tl.reshape(tl.broadcast_to(xs[None, :], p.shape), [bn, NCH, 8]), axis=2) * mn
        return acc

    @triton.jit
    def _chunk_scales(wid, q, s_rows, m_rows, W, MASKED: tl.constexpr, WPC: tl.constexpr, T: tl.constexpr,
                      GROUP: tl.constexpr, HAS_MIN: tl.constexpr):
        """For a [BLOCK_N, words] tile q of code words (WPC words a chunk; wid: their index along the row): each
        chunk's index, mask, scale and min as [BLOCK_N, chunks], computed in the per-chunk accumulators' layout
        (no layout conversion inside the K loop)."""
        bn: tl.constexpr = q.shape[0]
        nch: tl.constexpr = q.shape[1] // WPC
        chunk = tl.max(tl.reshape(tl.broadcast_to((wid // WPC)[None, :], q.shape), [bn, nch, WPC]), axis=2)
        g = chunk * (8 * T) // GROUP
        c_mask = chunk < W // WPC
        if MASKED:
            s = tl.load(s_rows + g, mask=c_mask, other=0.0).to(tl.float32)
        else:
            s = tl.load(s_rows + g).to(tl.float32)
        mn = s
        if HAS_MIN:
            mn = tl.load(m_rows + g, mask=c_mask, other=0.0).to(tl.float32)
        return chunk, c_mask, s, mn

    @triton.jit
    def _w_rows(pid, w_ptr, s_ptr, m_ptr, N, stride_wn, stride_sn, BLOCK_N: tl.constexpr):
        """Program pid's BLOCK_N rows of W: (offs_n, n_mask, code/scale/min row pointers [BLOCK_N, 1]); rows
        past N are clamped to N - 1, so W loads need no mask along N."""
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = tl.minimum(offs_n, N - 1).to(tl.int64)
        return (offs_n, offs_n < N, w_ptr + rows[:, None] * stride_wn, s_ptr + rows[:, None] * stride_sn,
                m_ptr + rows[:, None] * stride_sn)

    @triton.jit
    def _store_rows(a0, a1, a2, a3, y_ptr, stride_ym, offs_n, n_mask, BLOCK_M: tl.constexpr, P: tl.constexpr):
        """y[m, n] = sum over chunks of a_m[n, :] for the BLOCK_M (<= 4) rows: one reduction for all rows."""
        bn: tl.constexpr = a0.shape[0]
        acc = tl.reshape(tl.sum(_join_rows(a0, a1, a2, a3, a0, a0, a0, a0, P), axis=1), [bn, P])
        r0 = tl.zeros_like(offs_n)
        m = tl.reshape(_join_rows(r0, r0 + 1, r0 + 2, r0 + 3, r0, r0, r0, r0, P), [bn, P])
        tl.store(y_ptr + m * stride_ym + offs_n[:, None], acc.to(y_ptr.dtype.element_ty),
                 mask=n_mask[:, None] & (m < BLOCK_M))

    @triton.jit
    def _qtile(a0, a1, a2, a3, w_rows, s_rows, m_rows, x_ptr, stride_xm, w0, W,
               MASKED: tl.constexpr, T: tl.constexpr, GROUP: tl.constexpr, HAS_MIN: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr):
        """One [BLOCK_N, BLOCK_W]-word tile of codes (read once) against up to 4 rows of x."""
        NCH: tl.constexpr = BLOCK_W // 8
        wid = w0 + tl.arange(0, BLOCK_W)  # word index along the row
        w_mask = wid < W
        if MASKED:
            q = tl.load(w_rows + wid[None, :], mask=w_mask[None, :], other=0).to(tl.int32)
        else:
            q = tl.load(w_rows + wid[None, :]).to(tl.int32)
        _, _, s, mn = _chunk_scales(wid, q, s_rows, m_rows, W, MASKED, 8, T, GROUP, HAS_MIN)
        kbase = (wid // 8) * (8 * T) + wid % 8
        v0 = _sub(q, 0, T)
        v1 = _sub(q, 1, T)
        v2 = v0
        v3 = v0
        if T == 4:
            v2 = _sub(q, 2, T)
            v3 = _sub(q, 3, T)
        a0 = _row_chunks(a0, v0, v1, v2, v3, x_ptr, kbase, w_mask, s, mn, MASKED, T, HAS_MIN, NCH)
        if BLOCK_M > 1:
            a1 = _row_chunks(a1, v0, v1, v2, v3, x_ptr + stride_xm, kbase, w_mask, s, mn, MASKED, T, HAS_MIN, NCH)
        if BLOCK_M > 2:
            a2 = _row_chunks(a2, v0, v1, v2, v3, x_ptr + 2 * stride_xm, kbase, w_mask, s, mn, MASKED, T, HAS_MIN,
                             NCH)
        if BLOCK_M > 3:
            a3 = _row_chunks(a3, v0, v1, v2, v3, x_ptr + 3 * stride_xm, kbase, w_mask, s, mn, MASKED, T, HAS_MIN,
                             NCH)
        return a0, a1, a2, a3

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, s_ptr, m_ptr, y_ptr, N, W, stride_xm, stride_wn, stride_sn, stride_ym,
                     T: tl.constexpr, GROUP: tl.constexpr, HAS_MIN: tl.constexpr, BLOCK_M: tl.constexpr,
                     P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, NUM_STAGES: tl.constexpr):
        # kernels/gemv.py's design: one program per BLOCK_N rows of W over all of K. Codes are read as 16-bit
        # words, the same element size as x, so a thread's 16-byte vector of words (one chunk) lines up with
        # its 16-byte vectors of x: no layout conversion (shared memory, barriers) inside the K loop. Per chunk
        # the thread sums code * x in registers and applies the chunk's scale once (and min * sum(x)).
        stride_xm = tl.multiple_of(stride_xm, 8)
        offs_n, n_mask, w_rows, s_rows, m_rows = _w_rows(tl.program_id(0), w_ptr, s_ptr, m_ptr, N,
                                                         tl.multiple_of(stride_wn, 8),
                                                         stride_sn, BLOCK_N)
        a0 = tl.zeros([BLOCK_N, BLOCK_W // 8], dtype=tl.float32)
        a1 = tl.zeros([BLOCK_N, BLOCK_W // 8], dtype=tl.float32)  # a1..a3: dead for rows >= BLOCK_M
        a2 = tl.zeros([BLOCK_N, BLOCK_W // 8], dtype=tl.float32)
        a3 = tl.zeros([BLOCK_N, BLOCK_W // 8], dtype=tl.float32)
        w_full = (W // BLOCK_W) * BLOCK_W
        for w0 in tl.range(0, w_full, BLOCK_W, num_stages=NUM_STAGES):
            a0, a1, a2, a3 = _qtile(a0, a1, a2, a3, w_rows, s_rows, m_rows, x_ptr, stride_xm,
                                    tl.multiple_of(w0, BLOCK_W), W, False, T, GROUP, HAS_MIN, BLOCK_M, BLOCK_W)
        if w_full < W:
            a0, a1, a2, a3 = _qtile(a0, a1, a2, a3, w_rows, s_rows, m_rows, x_ptr, stride_xm, w_full, W,
                                    True, T, GROUP, HAS_MIN, BLOCK_M, BLOCK_W)
        _store_rows(a0, a1, a2, a3, y_ptr, stride_ym, offs_n, n_mask, BLOCK_M, P)

    @triton.jit
    def _mm_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """This program's K split, rows and columns of the output tile, and their masks."""
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        return tl.program_id(2), offs_m, offs_n, offs_m < M, offs_n < N

    @triton.jit
    def _mm_kernel(x_ptr, w_ptr, s_ptr, m_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_sn,
                   stride_os, stride_om, W, w_per_split,
                   T: tl.constexpr, GROUP: tl.constexpr, HAS_MIN: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
        pid_s, offs_m, offs_n, m_mask, n_mask = _mm_tile(M, N, BLOCK_M, BLOCK_N)
        # W tiles are read as [words, n] so that each sub-code plane feeds tl.dot as the right operand
        w_cols = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn
        s_cols = s_ptr + offs_n.to(tl.int64)[None, :] * stride_sn
        m_cols = m_ptr + offs_n.to(tl.int64)[None, :] * stride_sn
        x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        w_start = pid_s * w_per_split
        w_end = tl.minimum(w_start + w_per_split, W)
        for w0 in range(w_start, w_end, BLOCK_W):
            wid = w0 + tl.arange(0, BLOCK_W)
            wm = (wid < w_end)[:, None] & n_mask[None, :]
            q = tl.load(w_cols + wid[:, None], mask=wm, other=0).to(tl.int32)  # [BLOCK_W, BLOCK_N]
            kbase = (wid // 8) * (8 * T) + wid % 8  # K of sub-code 0 of each word; sub-code t: + 8 t
            g = (kbase // GROUP)[:, None]
            s = tl.load(s_cols + g, mask=wm, other=0.0).to(tl.float32)
            mn = s
            if HAS_MIN:
                mn = tl.load(m_cols + g, mask=wm, other=0.0).to(tl.float32)
            xm = m_mask[:, None] & (wid < w_end)[None, :]
            for t in tl.static_range(T):
                x = tl.load(x_rows + (kbase + 8 * t)[None, :], mask=xm, other=0.0)  # [BLOCK_M, BLOCK_W]
                v = _sub(q, t, T) * s
                if HAS_MIN:
                    v += mn
                acc = tl.dot(x, v.to(x.dtype), acc)
        out = out_ptr + pid_s * stride_os + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])

    # ---- variants of the tl.dot kernel (KernelConfig.variant >= 1; 0 is _mm_kernel above). They share:
    #  * W tiles read as [BLOCK_N, BLOCK_W] words, rows contiguous (16-byte loads, no per-element gathers);
    #  * scale/min loaded once per group as a [BLOCK_N, groups] tile and broadcast over the group's words;
    #  * SWAP: acc^T[BLOCK_N, BLOCK_M] = dot(W tile, x^T) (W is the left operand, kept in registers; wgmma
    #    at small M) instead of acc = dot(x, W tile^T);
    #  * MATH 0: codes to fp32 by the 2^23 trick, fp32 fma, one conversion to x.dtype (as _mm_kernel);
    #    MATH 1: codes straight to x.dtype (bf16: 0x4300 | q = 128 + q; fp16: 0x6400 | u = 1024 + u), then
    #    (v - offset) * scale + min in x.dtype (bf16x2/f16x2 math on sm_90, no conversion instruction);
    #    MATH 2: MATH 1 as 4 PTX instructions per word pair (GPU only; the interpreter runs MATH 1).
    #    Half math needs x in bf16/fp16 and, for bf16, 4-bit codes (8-bit codes don't fit a bf16 mantissa
    #    after the bias): other cases run MATH 0;
    #  * KCAT: the T sub-code planes of a word tile interleaved back into K order (a register permutation), so
    #    one contiguous x tile and one dot per K step instead of T dots on x columns gathered 8 at a time;
    #  * PREFETCH: scales/mins of the next K step loaded during this one;
    #  * RED (set at launch only with several K splits): the last split of each tile sums the partials.
    @triton.jit
    def _half_pairs(q32, t: tl.constexpr, T: tl.constexpr, BF16: tl.constexpr):
        """int32 word pairs [R, C] -> [R, 2 C] sub-code t as bf16/fp16, words in memory order. Each 16-bit half
        becomes biased code | exponent bits, exact: bf16 128 + q (4-bit), fp16 1024 + q (4-bit) or
        1024 + (c ^ 128) (8-bit); the caller subtracts the bias (128, 1024 or 1152)."""
        if T == 4:
            p = ((q32 >> (4 * t)) & 0x000F000F) | (0x43004300 if BF16 else 0x64006400)
        else:
            p = ((q32 >> (8 * t)) & 0x00FF00FF) ^ 0x64806480
        dt: tl.constexpr = tl.bfloat16 if BF16 else tl.float16
        lo = p.to(tl.int16).to(dt, bitcast=True)
        hi = (p >> 16).to(tl.int16).to(dt, bitcast=True)
        return tl.reshape(tl.join(lo, hi), [q32.shape[0], 2 * q32.shape[1]])

    @triton.jit
    def _half_asm(q, s, mn, t: tl.constexpr, T: tl.constexpr, BF16: tl.constexpr):
        """(code - bias) * s + mn on two 16-bit words per register: shift, one lop3 for mask + exponent bits,
        sub and fma on packed halves (sm_90 for bf16x2 sub)."""
        if (16 // T) * t == 0:
            sh: tl.constexpr = "mov.b32 c, $1; "
        elif (16 // T) * t == 4:
            sh: tl.constexpr = "shr.b32 c, $1, 4; "
        elif (16 // T) * t == 8:
            sh: tl.constexpr = "shr.b32 c, $1, 8; "
        else:
            sh: tl.constexpr = "shr.b32 c, $1, 12; "
        if T == 4:  # (c & mask) | magic
            lop: tl.constexpr = "lop3.b32 c, c, 0x000F000F, k, 0xEA; "
        else:  # (c & mask) ^ magic: exponent bits and the sign bit of the byte flipped
            lop: tl.constexpr = "lop3.b32 c, c, 0x00FF00FF, k, 0x6A; "
        if BF16:
            k: tl.constexpr = "mov.b32 k, 0x43004300; "
            ops: tl.constexpr = "sub.rn.bf16x2 c, c, k; fma.rn.bf16x2 $0, c, $2, $3; }"
        elif T == 4:
            k: tl.constexpr = "mov.b32 k, 0x64006400; "
            ops: tl.constexpr = "sub.rn.f16x2 c, c, k; fma.rn.f16x2 $0, c, $2, $3; }"
        else:
            k: tl.constexpr = "mov.b32 k, 0x64806480; "
            ops: tl.constexpr = "sub.rn.f16x2 c, c, k; fma.rn.f16x2 $0, c, $2, $3; }"
        return tl.inline_asm_elementwise("{ .reg .b32 c, k; " + k + sh + lop + ops, "=r,r,r,r", [q, s, mn],
                                         dtype=s.dtype, is_pure=True, pack=2)

    @triton.jit
    def _scale_tile(s_rows, m_rows, g, w_end, WPG: tl.constexpr, HAS_MIN: tl.constexpr):
        """Scales (and mins) of groups g ([groups]) of the tile's rows, as stored: [BLOCK_N, groups] each."""
        g_in = (g * WPG < w_end)[None, :]
        s = tl.load(s_rows + g[None, :], mask=g_in, other=0.0)
        mn = s
        if HAS_MIN:
            mn = tl.load(m_rows + g[None, :], mask=g_in, other=0.0)
        return s, mn

    @triton.jit
    def _dq_plane(q, s, mn, t: tl.constexpr, T: tl.constexpr, HAS_MIN: tl.constexpr, MATH: tl.constexpr,
                  HALF: tl.constexpr, PAIRS: tl.constexpr, BF16: tl.constexpr, xdt: tl.constexpr):
        """Sub-code plane t of the word tile q, dequantized to xdt ([BLOCK_N, BLOCK_W])."""
        if HALF and MATH == 2:
            v = _half_asm(q, s, mn, t, T, BF16)
        else:
            if PAIRS:
                v = _half_pairs(q, t, T, BF16) - (128.0 if BF16 else (1024.0 if T == 4 else 1152.0))
            else:
                v = _sub(q, t, T)
            v = v * s
            if HAS_MIN:
                v += mn
        return v.to(xdt)

    @triton.jit
    def _mmv_kernel(x_ptr, w_ptr, s_ptr, m_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_sn,
                    stride_os, stride_om, W, w_per_split, y_ptr, cnt_ptr,
                    T: tl.constexpr, GROUP: tl.constexpr, HAS_MIN: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, SWAP: tl.constexpr, MATH: tl.constexpr,
                    KCAT: tl.constexpr, PREFETCH: tl.constexpr, RED: tl.constexpr):
        # out: [splits, M, N], row stride stride_om; with RED fp32 partials, and the result goes to y ([M, N],
        # same row stride; cnt: int32 zeros, one per (M, N) tile); else the result itself
        pid_s, offs_m, offs_n, m_mask, n_mask = _mm_tile(M, N, BLOCK_M, BLOCK_N)
        xdt: tl.constexpr = x_ptr.dtype.element_ty
        BF16: tl.constexpr = xdt == tl.bfloat16
        HALF: tl.constexpr = MATH > 0 and ((BF16 and T == 4) or xdt == tl.float16)
        PAIRS: tl.constexpr = HALF and MATH == 1  # codes read as int32 word pairs
        WPG: tl.constexpr = GROUP // T  # words per group
        NG: tl.constexpr = BLOCK_W // WPG if BLOCK_W >= WPG else 1  # groups per K step
        SPAN: tl.constexpr = WPG if BLOCK_W >= WPG else BLOCK_W  # words per scale in the tile
        rows = tl.minimum(offs_n, N - 1).to(tl.int64)  # clamped: W loads need no mask along N
        if PAIRS:
            w_rows = w_ptr.to(tl.pointer_type(tl.int32)) + rows[:, None] * (stride_wn // 2)
        else:
            w_rows = w_ptr + rows[:, None] * stride_wn
        s_rows = s_ptr + rows[:, None] * stride_sn
        m_rows = m_ptr + rows[:, None] * stride_sn
        x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
        if SWAP:
            acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        w_start = pid_s * w_per_split
        w_end = tl.minimum(w_start + w_per_split, W)
        if PREFETCH:  # scales and mins are read one K step ahead (their loads are not pipelined by Triton)
            s_next, mn_next = _scale_tile(s_rows, m_rows, w_start // WPG + tl.arange(0, NG), w_end, WPG, HAS_MIN)
        for w0 in range(w_start, w_end, BLOCK_W):
            wid = w0 + tl.arange(0, BLOCK_W)
            w_in = wid < w_end
            if PREFETCH:
                s, mn = s_next, mn_next
                s_next, mn_next = _scale_tile(s_rows, m_rows, (w0 + BLOCK_W) // WPG + tl.arange(0, NG), w_end, WPG,
                                              HAS_MIN)
            else:
                s, mn = _scale_tile(s_rows, m_rows, w0 // WPG + tl.arange(0, NG), w_end, WPG, HAS_MIN)
            if PAIRS:  # w_end is even (whole chunks)
                pid2 = w0 // 2 + tl.arange(0, BLOCK_W // 2)
                q = tl.load(w_rows + pid2[None, :], mask=(pid2 < w_end // 2)[None, :], other=0)
            else:
                q = tl.load(w_rows + wid[None, :], mask=w_in[None, :], other=0)
                if not HALF:
                    q = q.to(tl.int32)
            # one scale (and min) per group and row, broadcast over the group's words
            cdt: tl.constexpr = xdt if HALF else tl.float32
            s = tl.reshape(tl.broadcast_to(s.to(cdt)[:, :, None], [BLOCK_N, NG, SPAN]), [BLOCK_N, BLOCK_W])
            if HAS_MIN:
                mn = tl.reshape(tl.broadcast_to(mn.to(cdt)[:, :, None], [BLOCK_N, NG, SPAN]), [BLOCK_N, BLOCK_W])
            elif MATH == 2 and HALF:
                mn = tl.zeros_like(s)
            if KCAT:  # the T planes interleaved back into K order: one x tile, one dot per step
                v0 = _dq_plane(q, s, mn, 0, T, HAS_MIN, MATH, HALF, PAIRS, BF16, xdt)
                v1 = _dq_plane(q, s, mn, 1, T, HAS_MIN, MATH, HALF, PAIRS, BF16, xdt)
                if T == 4:  # [BN, BW, 2, 2][..., a, b] = plane 2 a + b
                    v2 = _dq_plane(q, s, mn, 2, T, HAS_MIN, MATH, HALF, PAIRS, BF16, xdt)
                    v3 = _dq_plane(q, s, mn, 3, T, HAS_MIN, MATH, HALF, PAIRS, BF16, xdt)
                    v = tl.join(tl.join(v0, v2), tl.join(v1, v3))
                else:
                    v = tl.join(v0, v1)
                # [n, chunk, word j, plane t] -> [n, chunk, t, j]: K = 8 T chunk + 8 t + j
                v = tl.reshape(tl.permute(tl.reshape(v, [BLOCK_N, BLOCK_W // 8, 8, T]), (0, 1, 3, 2)),
                               [BLOCK_N, BLOCK_W * T])
                kk = w0 * T + tl.arange(0, BLOCK_W * T)
                x = tl.load(x_rows + kk[None, :], mask=m_mask[:, None] & (kk < w_end * T)[None, :], other=0.0)
                if SWAP:
                    acc = tl.dot(v, tl.trans(x), acc)
                else:
                    acc = tl.dot(x, tl.trans(v), acc)
            else:  # one dot per plane, on x columns gathered 8 at a time
                kbase = (wid // 8) * (8 * T) + wid % 8  # K of sub-code 0 of each word; sub-code t: + 8 t
                xm = m_mask[:, None] & w_in[None, :]
                for t in tl.static_range(T):
                    x = tl.load(x_rows + (kbase + 8 * t)[None, :], mask=xm, other=0.0)  # [BLOCK_M, BLOCK_W]
                    v = _dq_plane(q, s, mn, t, T, HAS_MIN, MATH, HALF, PAIRS, BF16, xdt)
                    if SWAP:
                        acc = tl.dot(v, tl.trans(x), acc)
                    else:
                        acc = tl.dot(x, tl.trans(v), acc)
        if SWAP:
            offs = offs_m.to(tl.int64)[None, :] * stride_om + offs_n[:, None]
            mask = n_mask[:, None] & m_mask[None, :]
        else:
            offs = offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
            mask = m_mask[:, None] & n_mask[None, :]
        if RED:  # split-K summed here: each split stores its partial; the split that finishes last (per-tile
            # counter, reset to 0 after use) adds them up in split order (deterministic) and writes y
            tl.store(out_ptr + pid_s * stride_os + offs, acc, mask=mask)
            tl.debug_barrier()  # the whole CTA's partial is written before the counter moves
            tile = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
            if tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu") == tl.num_programs(2) - 1:
                total = tl.zeros_like(acc)
                for i in range(0, tl.num_programs(2)):
                    total += tl.load(out_ptr + i * stride_os + offs, mask=mask, other=0.0, cache_modifier=".cg")
                tl.store(y_ptr + offs, total.to(y_ptr.dtype.element_ty), mask=mask)
                tl.atomic_xchg(cnt_ptr + tile, 0)
        else:
            tl.store(out_ptr + pid_s * stride_os + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _dequant_kernel(w_ptr, s_ptr, m_ptr, out_ptr, N, W, stride_wn, stride_sn, stride_on,
                        T: tl.constexpr, GROUP: tl.constexpr, HAS_MIN: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_W: tl.constexpr):
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        wid = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
        mask = (offs_n < N)[:, None] & (wid < W)[None, :]
        rows = offs_n.to(tl.int64)[:, None]
        q = tl.load(w_ptr + rows * stride_wn + wid[None, :], mask=mask, other=0).to(tl.int32)
        kbase = (wid // 8) * (8 * T) + wid % 8
        g = (kbase // GROUP)[None, :]
        s = tl.load(s_ptr + rows * stride_sn + g, mask=mask, other=0.0).to(tl.float32)
        mn = s
        if HAS_MIN:
            mn = tl.load(m_ptr + rows * stride_sn + g, mask=mask, other=0.0).to(tl.float32)
        for t in tl.static_range(T):
            v = _sub(q, t, T) * s
            if HAS_MIN:
                v += mn
            tl.store(out_ptr + rows * stride_on + (kbase + 8 * t)[None, :], v.to(out_ptr.dtype.element_ty),
                     mask=mask)


@dataclass(frozen=True)
class KernelConfig:
    """Tiles of the tl.dot kernel; block_k counts weights (block_k * bits // 16 words >= 16, for tl.dot)."""
    block_m: int
    block_n: int
    block_k: int
    split_k: int  # 0 = choose from the grid size
    num_warps: int = 4
    num_stages: int = 3
    variant: int = 0  # kernel variant, see MM_VARIANTS (0: _mm_kernel)


# _mmv_kernel's switches (see the comment above it) over MM_VARIANT_BASE, by KernelConfig.variant; 0 is _mm_kernel.
# Only the variants mm_config picks live here; benchmarks/quant_matmul_variants.py registers the others for A/B runs.
MM_VARIANT_BASE = dict(SWAP=False, MATH=0, KCAT=False, PREFETCH=True, RED=False)
MM_VARIANTS = {
    9: dict(SWAP=True, MATH=2, KCAT=True),  # W the left dot operand, dequantized by inline PTX into K order
}


@dataclass(frozen=True)
class GemvConfig:
    block_n: int  # rows of W per program, power of two
    block_w: int  # 16-bit code words per row per K step, power of two >= 8; fastest at 8 * 32 * num_warps
    num_warps: int = 4
    num_stages: int = 1


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def gemv_config(m: int, n: int, w: int, bits: int = 4) -> GemvConfig:
    """Default tiles for M rows, N outputs, W code words per row (the winners of benchmarks/quant_matmul_bench.py
    --sweep): 2 warps over 512 words (1 KB) of up to 8 rows per step; 4-bit
    codes with 2+ rows of x: 256 words, prefetched one step ahead. block_n stays small enough for >= 2
    programs per SM (N = 1024 projections)."""
    block_n = 8
    while block_n > 1 and -(-n // block_n) < 2 * _SMS_GUESS:
        block_n //= 2
    if bits == 4 and m > 1:
        return GemvConfig(block_n, min(256, max(8, next_pow2(w))), 2, 2 if w > 256 else 1)
    return GemvConfig(block_n, min(512, max(8, next_pow2(w))), 2, 1)


def mm_config(m: int, n: int, k: int, bits: int, hopper: bool = False) -> KernelConfig:
    """Tiles of the tl.dot kernel (the winners of benchmarks/quant_matmul_bench.py --sweep / --mm-variants at
    M = 16, 64, 128; figures in BENCHMARKS.md): 64 code words of K per step (256 4-bit weights, 128 8-bit).
    Hopper: variant 9 (W tiles dequantized by bf16x2/f16x2 PTX into K order, W the left dot operand); else
    variant 0: wide-N projections (N >= 2 K) take narrower N tiles without split-K."""
    wide = n >= 2 * k
    bk = 256 if bits == 4 else 128  # the same 64 code words a step (8-bit codes at 256 overflow shared memory)
    if hopper:
        if m <= 16:
            return KernelConfig(16, 64, bk, 1 if wide else 0, 4, 4, 9)
        if m <= 64:
            return KernelConfig(64, 64, bk, 1 if wide else 0, 4, 3, 9)
        if wide or k >= 2 * n:
            return KernelConfig(128, 128, bk, 1 if wide else 0, 8, 3, 9)
        return KernelConfig(64, 64, bk, 1, 4, 3, 9)
    if m <= 16:
        return KernelConfig(16, 64, bk, 1, 4, 4) if wide else KernelConfig(16, 128, bk, 0, 8, 4)
    if m <= 64:
        return KernelConfig(64, 64, bk, 1, 4, 2) if wide else KernelConfig(64, 128, bk, 0, 4, 2)
    return KernelConfig(128, 128, bk, 1 if wide else 0, 8, 2)


def _splits(tiles: int, k: int, block_k: int, device: torch.device) -> int:
    """Enough K splits for ~2 waves of CTAs, each split keeping >= 4 K tiles of work."""
    want = _cdiv(2 * num_sms(device), tiles)
    return max(1, min(want, k // (4 * block_k)))


_SPLIT_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _split_counters(device: torch.device, n: int) -> torch.Tensor:
    """Zeroed int32 per-tile counters for split-K sums in the kernel (variants with RED). The kernel resets each
    counter after use, so one buffer per device serves all launches as long as they run one at a time."""
    buf = _SPLIT_COUNTERS.get(device)
    if buf is None or buf.numel() < n:
        buf = _SPLIT_COUNTERS[device] = torch.zeros(max(n, 1 << 14), device=device, dtype=torch.int32)
    return buf


def _launch_mm(grid_mn: tuple[int, int], cfg: KernelConfig, x, codes, scale, mins, bits, group, out_dtype,
               compile_only: bool = False):
    m, k = x.shape
    n = codes.shape[0]
    t = 16 // bits
    split = cfg.split_k or _splits(grid_mn[0] * grid_mn[1], k, cfg.block_k, x.device)
    k_per_split = _cdiv(_cdiv(k, split), cfg.block_k) * cfg.block_k
    split = _cdiv(k, k_per_split)
    out = torch.empty((split, m, n) if split > 1 else (1, m, n), device=x.device,
                      dtype=torch.float32 if split > 1 else out_dtype)
    args = (x, codes, scale, mins if mins is not None else scale, out, m, n, k, x.stride(0), codes.stride(0),
            scale.stride(0), out.stride(0), out.stride(1), codes.shape[1], k_per_split // t)
    kw = dict(T=t, GROUP=group, HAS_MIN=mins is not None, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
              BLOCK_W=cfg.block_k // t, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    kernel = _mm_kernel
    y = None
    if cfg.variant:
        kernel = _mmv_kernel
        kw.update(MM_VARIANT_BASE, **MM_VARIANTS[cfg.variant])
        if kw["MATH"] == 2 and (not x.is_cuda or interpreting()):
            kw["MATH"] = 1  # inline PTX: the interpreter runs the same math written in Triton
        kw["RED"] = kw["RED"] and split > 1
        if kw["RED"]:
            y = torch.empty((m, n), device=x.device, dtype=out_dtype)
            args += (y, _split_counters(x.device, grid_mn[0] * grid_mn[1]))
        else:
            args += (out, out)  # unused
    if compile_only:  # compile (asynchronously inside triton.AsyncCompileMode), don't run
        kernel.warmup(*args, grid=(*grid_mn, split), **kw)
        return None
    kernel[(*grid_mn, split)](*args, **kw)
    if y is not None:
        return y
    return out[0] if split == 1 else out.sum(0).to(out_dtype)


def _check(x, codes, scale, mins, bits, group):
    assert x.dim() == 2 and bits in (4, 8) and group % (128 // bits) == 0 and group & (group - 1) == 0, \
        (x.shape, bits, group)
    k = code_width(codes, bits)
    assert codes.dtype == torch.int16 and x.shape[1] == k and k % group == 0, (codes.dtype, x.shape, k)
    assert scale.shape == (codes.shape[0], k // group), (scale.shape, codes.shape)
    assert codes.is_contiguous() and scale.is_contiguous() and (mins is None or mins.shape == scale.shape)


def quant_gemv_triton(x, codes, scale, mins, bits: int, group: int, cfg: GemvConfig | None = None,
                      out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Decode kernel. x: [M, K] (M <= GEMV_ROWS) -> [M, N]."""
    x = x.contiguous()
    _check(x, codes, scale, mins, bits, group)
    m = x.shape[0]
    n, w = codes.shape
    assert 1 <= m <= GEMV_ROWS, m
    cfg = cfg or gemv_config(m, n, w, bits)
    out = torch.empty((m, n), device=x.device, dtype=out_dtype or x.dtype)
    _gemv_kernel[(triton.cdiv(n, cfg.block_n),)](
        x, codes, scale, mins if mins is not None else scale, out, n, w, x.stride(0), codes.stride(0),
        scale.stride(0), out.stride(0), T=16 // bits, GROUP=group, HAS_MIN=mins is not None, BLOCK_M=m,
        P=next_pow2(m), BLOCK_N=cfg.block_n, BLOCK_W=cfg.block_w, NUM_STAGES=cfg.num_stages,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def _hopper(x: torch.Tensor) -> bool:
    """Variant 9's inline PTX (sub.rn.bf16x2) needs SM 9.0; bf16/fp16 x (its dequantization dtype)."""
    return x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and \
        torch.cuda.get_device_capability(x.device)[0] >= 9 and not interpreting()


def quant_mm_triton(x, codes, scale, mins, bits: int, group: int, cfg: KernelConfig | None = None,
                    out_dtype: torch.dtype | None = None, compile_only: bool = False) -> torch.Tensor | None:
    """tl.dot kernel. x: [M, K] -> [M, N] (compile_only: compile this launch's kernel, return None)."""
    x = x.contiguous()
    _check(x, codes, scale, mins, bits, group)
    cfg = cfg or mm_config(x.shape[0], codes.shape[0], x.shape[1], bits, _hopper(x))
    grid = (triton.cdiv(x.shape[0], cfg.block_m), triton.cdiv(codes.shape[0], cfg.block_n))
    return _launch_mm(grid, cfg, x, codes, scale, mins, bits, group, out_dtype or x.dtype, compile_only)


def dequantize_triton(codes: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor | None, bits: int, group: int,
                      dtype: torch.dtype) -> torch.Tensor:
    """W [N, K] in `dtype`, one pass over the codes (the large-M path: dequantize, then a dense matmul)."""
    n, w = codes.shape
    out = torch.empty((n, code_width(codes, bits)), device=codes.device, dtype=dtype)
    bn, bw = 16, 256
    _dequant_kernel[(triton.cdiv(n, bn), triton.cdiv(w, bw))](
        codes, scale, mins if mins is not None else scale, out, n, w, codes.stride(0), scale.stride(0),
        out.stride(0), T=16 // bits, GROUP=group, HAS_MIN=mins is not None, BLOCK_N=bn, BLOCK_W=bw, num_warps=4)
    return out


def quant_matmul(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor | None,
                 bits: int, group: int) -> torch.Tensor:
    """x: [M, K] -> [M, N] in x.dtype. Triton on CUDA, else the reference: the GEMV for M <= QUANT_GEMV_MAX_ROWS,
    the tl.dot kernel up to QUANT_MM_MAX_ROWS; above, W is dequantized to x.dtype for one dense matmul (prefill:
    the matmul's own cost dwarfs the extra pass over W)."""
    if not use_triton(x):
        return quant_matmul_ref(x, codes, scale, mins, bits, group)
    if x.shape[0] <= QUANT_GEMV_MAX_ROWS:
        return quant_gemv_triton(x, codes, scale, mins, bits, group)
    if x.shape[0] <= QUANT_MM_MAX_ROWS:
        return quant_mm_triton(x, codes, scale, mins, bits, group)
    return torch.matmul(x, dequantize_triton(codes, scale, mins, bits, group, x.dtype).t())


__all__ = ["GEMV_ROWS", "MM_VARIANTS", "GemvConfig", "KernelConfig", "code_width", "dequantize_ref",
           "dequantize_triton", "gemv_config", "mm_config", "pack_codes", "quant_gemv_triton", "quant_matmul",
           "quant_matmul_ref", "quant_mm_triton", "unpack_codes"]
