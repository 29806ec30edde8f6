"""Decode GEMV over kernels/quant_matmul.py's group-wise codes with int8 activations (llama.cpp's Q8_1 idea).

x is quantized per chunk -- the 8 T weights one 16-byte vector of code words covers (32 K for 4-bit codes,
16 K for 8-bit) -- to int8 codes with one float32 scale dx = max|x| / 127 and the chunk's exact float sum xs.
The x codes are stored permuted so that each 32-bit word of weight codes meets, byte for byte, a 32-bit word
of x codes; the kernel multiplies with dp4a (four int8 products and their sum in one instruction) instead of
converting every code to float: under one instruction a weight instead of ~5, which bounded the float GEMV
(quant_matmul._gemv_kernel) well below the memory bandwidth.

32-bit word p of a chunk is 16-bit words 2p, 2p+1; its byte b holds sub-codes of word 2p + (b >> 1):
  4-bit: the low nibbles (plane h = 0) sub-code t = 2 (b & 1), the high nibbles (h = 1) t = 2 (b & 1) + 1
  8-bit: sub-code t = b & 1 (one plane)
i.e. K offset 8 t + 2p + (b >> 1) within the chunk. x codes are stored per chunk as [plane h, word p, byte b].

  y[m, n] = sum over chunks c of  scale[n, g(c)] * dx[m, c] * sum(code * xq)  +  min[n, g(c)] * xs[m, c]

Rounding of x to int8 (about 0.4% of a chunk's largest |x|) is the cost; llama.cpp's and vLLM's GGUF decode
kernels make the same trade. EngineConfig.gemv a16 keeps the float GEMV (layers/gpu_quant.QuantWeight).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._triton_utils import HAS_TRITON, interpreting, next_pow2
from .gemv import _SMS_GUESS
from .quant_matmul import unpack_codes
from .row_dispatch import A8_GEMV_MAX_ROWS

MAX_M = 4  # rows one program takes (the kernel's 4 accumulators)
# more rows: groups of MAX_M, one program per group and N block (W read once, from L2 after), up to
# row_dispatch.A8_GEMV_MAX_ROWS
MAX_ROWS = A8_GEMV_MAX_ROWS  # old name


def rows_supported(m: int) -> bool:
    """Whether the dp4a GEMV takes m rows: up to MAX_M, or whole groups of MAX_M up to MAX_ROWS."""
    return 1 <= m <= MAX_M or (m <= A8_GEMV_MAX_ROWS and m % MAX_M == 0)


def x_perm(bits: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[8 T] K offsets within a chunk of the stored x codes, in storage order (see the module docstring)."""
    t_per = 16 // bits
    i = torch.arange(8 * t_per, device=device)
    h, p, b = i // 16, (i // 4) % 4, i % 4
    t = (b & 1) * (t_per // 2) + h
    return 8 * t + 2 * p + (b >> 1)


def quantize_x_ref(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: [M, K] -> xq [M, K] int8 in storage order, dx [M, C] float32, xs [M, C] float32 (C = K / (8 T)).
    Rounds half away from zero."""
    ch = 128 // bits
    m, k = x.shape
    xf = x.float().view(m, k // ch, ch)
    amax = xf.abs().amax(-1)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    v = xf * inv[..., None]
    q = (torch.sign(v) * torch.floor(v.abs() + 0.5)).clamp(-127, 127)
    xq = q[..., x_perm(bits, x.device)].to(torch.int8).reshape(m, k)
    return xq, amax / 127.0, xf.sum(-1)


def quant_gemv_a8_ref(xq: torch.Tensor, dx: torch.Tensor, xs: torch.Tensor, codes: torch.Tensor,
                      scale: torch.Tensor, mins: torch.Tensor | None, bits: int, group: int) -> torch.Tensor:
    """The kernel's arithmetic in torch (float32): xq/dx/xs from quantize_x_ref -> [M, N] float32."""
    ch = 128 // bits
    m, k = xq.shape
    n = codes.shape[0]
    unperm = torch.empty_like(x_perm(bits, xq.device))
    unperm[x_perm(bits, xq.device)] = torch.arange(ch, device=xq.device)
    xc = xq.view(m, k // ch, ch)[..., unperm].float()  # [M, C, ch] in K order
    qc = unpack_codes(codes, bits).float().view(n, k // ch, ch)
    idot = torch.einsum("ncj,mcj->mnc", qc, xc)
    rep = group // ch
    y = (idot * scale.float().repeat_interleave(rep, 1)[None] * dx[:, None, :]).sum(-1)
    if mins is not None:
        y = y + (mins.float().repeat_interleave(rep, 1)[None] * xs[:, None, :]).sum(-1)
    return y


@dataclass(frozen=True)
class QuantizedX:
    """x as the dp4a GEMV reads it: xq [M, K] int8 in storage order, dx / xs [M, C] float32, for `bits`-bit
    codes. Producers of a decode GEMV's input (RMSNorm, SiLU*mul) can emit it in their own launch."""
    xq: torch.Tensor
    dx: torch.Tensor
    xs: torch.Tensor
    bits: int


def empty_quantized_x(m: int, k: int, bits: int, device: torch.device) -> QuantizedX:
    c = k * bits // 128
    d = torch.empty((2, m, c), device=device, dtype=torch.float32)
    return QuantizedX(torch.empty((m, k), device=device, dtype=torch.int8), d[0], d[1], bits)


@dataclass(frozen=True)
class A8Config:
    block_n: int  # rows of W per program
    block_w: int  # 32-bit code words per row per K step (4 per chunk)
    num_warps: int = 2
    num_stages: int = 1


def a8_config(m: int, n: int, w32: int, bits: int = 4) -> A8Config:
    """Default tiles (the winners of benchmarks/quant_matmul_bench.py --sweep; figures in BENCHMARKS.md): one row
    of W per 1-warp program over 1 KB (4-bit) / 2 KB (8-bit) of codes a step at M = 1; more rows: 2 warps, >= 2
    programs per SM for N = 1024 projections."""
    if m == 1:
        return A8Config(1, min(256 if bits == 4 else 512, max(4, next_pow2(w32))), 1, 1)
    block_n = 8
    while block_n > 1 and -(-n // block_n) < 2 * _SMS_GUESS:
        block_n //= 2
    return A8Config(block_n, min(256, max(4, next_pow2(w32))), 2, 1)


if HAS_TRITON:
    import triton
    import triton.language as tl

    from .quant_matmul import _chunk_scales, _store_rows, _w_rows

    @triton.jit
    def _quantize_store(v, c0, n_chunks, q_row, d_row, s_row, T: tl.constexpr, BLOCK: tl.constexpr):
        """v: [BLOCK] float32 x values in K order from chunk c0 on (BLOCK a multiple of the chunk; values past
        the row zero): int8 codes stored at their storage positions, dx and xs per chunk (chunks < n_chunks)."""
        CH: tl.constexpr = 8 * T
        H: tl.constexpr = T // 2
        v2 = tl.reshape(v, [BLOCK // CH, CH])
        amax = tl.max(tl.abs(v2), axis=1)
        inv = tl.where(amax > 0, 127.0 / amax, 0.0)
        u = v2 * inv[:, None]
        q = tl.where(u >= 0, tl.floor(u + 0.5), -tl.floor(0.5 - u))
        q = tl.minimum(tl.maximum(q, -127.0), 127.0)
        j = tl.arange(0, CH)  # K offset in the chunk -> storage index (the inverse of x_perm)
        t = j // 8
        word = j % 8
        i = 16 * (t % H) + 4 * (word // 2) + t // H + 2 * (word % 2)
        c = c0 + tl.arange(0, BLOCK // CH)
        cm = c < n_chunks
        tl.store(q_row + c[:, None] * CH + i[None, :], q.to(tl.int8), mask=cm[:, None])
        tl.store(d_row + c, amax / 127.0, mask=cm)
        tl.store(s_row + c, tl.sum(v2, axis=1), mask=cm)

    @triton.jit
    def _quant_x_kernel(x_ptr, q_ptr, d_ptr, s_ptr, C, stride_xm, stride_qm, stride_dm,
                        T: tl.constexpr, BLOCK_C: tl.constexpr):
        # one program: BLOCK_C chunks of one row
        BLOCK: tl.constexpr = BLOCK_C * 8 * T
        row = tl.program_id(0)
        c0 = tl.program_id(1) * BLOCK_C
        offs = c0 * 8 * T + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * stride_xm + offs, mask=offs < C * 8 * T, other=0.0).to(tl.float32)
        _quantize_store(x, c0, C, q_ptr + row * stride_qm, d_ptr + row * stride_dm, s_ptr + row * stride_dm, T,
                        BLOCK)

    @triton.jit
    def _dp4a(a, b, acc, ASM: tl.constexpr):
        """acc + the sum of the four signed byte products of a and b."""
        if ASM:
            return tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, acc],
                                             dtype=tl.int32, is_pure=True, pack=1)
        else:  # the interpreter (tests on CPU): sign-extended bytes
            for j in tl.static_range(4):
                acc += ((a << (24 - 8 * j)) >> 24) * ((b << (24 - 8 * j)) >> 24)
            return acc

    @triton.jit
    def _a8_row(acc, lo, hi, xq_row, d_row, s_row, xw, xw_mask, chunk, c_mask, s, mn,
                MASKED: tl.constexpr, T: tl.constexpr, HAS_MIN: tl.constexpr, NCH: tl.constexpr,
                ASM: tl.constexpr):
        """acc [BN, NCH] += per chunk scale * dx * dot(codes, xq) (+ min * xs) for one row of x."""
        if MASKED:
            xl = tl.load(xq_row + xw, mask=xw_mask, other=0)
            dx = tl.load(d_row + chunk, mask=c_mask, other=0.0)
        else:
            xl = tl.load(xq_row + xw)
            dx = tl.load(d_row + chunk)
        d = _dp4a(lo, xl[None, :], tl.zeros_like(lo), ASM)
        if T == 4:
            if MASKED:
                xh = tl.load(xq_row + xw + 4, mask=xw_mask, other=0)
            else:
                xh = tl.load(xq_row + xw + 4)
            d = _dp4a(hi, xh[None, :], d, ASM)
        bn: tl.constexpr = lo.shape[0]
        idot = tl.sum(tl.reshape(d, [bn, NCH, 4]), axis=2)
        acc += idot.to(tl.float32) * (s * dx)
        if HAS_MIN:
            if MASKED:
                xs = tl.load(s_row + chunk, mask=c_mask, other=0.0)
            else:
                xs = tl.load(s_row + chunk)
            acc += mn * xs
        return acc

    @triton.jit
    def _a8_tile(a0, a1, a2, a3, w_rows, s_rows, m_rows, xq_ptr, d_ptr, xs_ptr, stride_qm, stride_dm, j0, W32,
                 MASKED: tl.constexpr, T: tl.constexpr, GROUP: tl.constexpr, HAS_MIN: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr, ASM: tl.constexpr):
        """One [BLOCK_N, BLOCK_W] tile of 32-bit code words (read once) against up to 4 rows of x."""
        NCH: tl.constexpr = BLOCK_W // 4
        j = j0 + tl.arange(0, BLOCK_W)
        j_mask = j < W32
        if MASKED:
            q = tl.load(w_rows + j[None, :], mask=j_mask[None, :], other=0)
        else:
            q = tl.load(w_rows + j[None, :])
        chunk, c_mask, s, mn = _chunk_scales(j, q, s_rows, m_rows, W32, MASKED, 4, T, GROUP, HAS_MIN)
        if T == 4:
            lo = q & 0x0F0F0F0F
            hi = (q >> 4) & 0x0F0F0F0F
        else:
            lo = q
            hi = q
        xw = (j // 4) * (T // 2) * 4 + j % 4  # x word of plane 0 paired with code word j (plane 1: + 4)
        a0 = _a8_row(a0, lo, hi, xq_ptr, d_ptr, xs_ptr, xw, j_mask, chunk, c_mask, s, mn, MASKED, T, HAS_MIN, NCH,
                     ASM)
        if BLOCK_M > 1:
            a1 = _a8_row(a1, lo, hi, xq_ptr + stride_qm, d_ptr + stride_dm, xs_ptr + stride_dm, xw, j_mask, chunk,
                         c_mask, s, mn, MASKED, T, HAS_MIN, NCH, ASM)
        if BLOCK_M > 2:
            a2 = _a8_row(a2, lo, hi, xq_ptr + 2 * stride_qm, d_ptr + 2 * stride_dm, xs_ptr + 2 * stride_dm, xw,
                         j_mask, chunk, c_mask, s, mn, MASKED, T, HAS_MIN, NCH, ASM)
        if BLOCK_M > 3:
            a3 = _a8_row(a3, lo, hi, xq_ptr + 3 * stride_qm, d_ptr + 3 * stride_dm, xs_ptr + 3 * stride_dm, xw,
                         j_mask, chunk, c_mask, s, mn, MASKED, T, HAS_MIN, NCH, ASM)
        return a0, a1, a2, a3

    @triton.jit
    def _gemv_a8_kernel(xq_ptr, d_ptr, xs_ptr, w_ptr, s_ptr, m_ptr, y_ptr, N, W32, stride_qm, stride_dm,
                        stride_wn, stride_sn, stride_ym,
                        T: tl.constexpr, GROUP: tl.constexpr, HAS_MIN: tl.constexpr, BLOCK_M: tl.constexpr,
                        P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, NUM_STAGES: tl.constexpr,
                        ASM: tl.constexpr, ROW_GROUPS: tl.constexpr):
        # quant_matmul._gemv_kernel's shape: one program per BLOCK_N rows of W over all of K, a thread's
        # 16-byte vector of code words = one chunk, per-chunk partial sums in registers, one reduction at the end.
        # ROW_GROUPS: grid (M / 4, N blocks), program (g, n) takes rows 4 g .. 4 g + 3 of x; the groups of one
        # N block run side by side, so W comes from DRAM once and from L2 for the others
        stride_qm = tl.multiple_of(stride_qm, 4)
        pid_n = tl.program_id(0)
        if ROW_GROUPS:
            pid_n = tl.program_id(1)
            r0 = tl.program_id(0) * 4
            xq_ptr += r0 * stride_qm
            d_ptr += r0 * stride_dm
            xs_ptr += r0 * stride_dm
            y_ptr += r0 * stride_ym
        offs_n, n_mask, w_rows, s_rows, m_rows = _w_rows(pid_n, w_ptr, s_ptr, m_ptr, N,
                                                         tl.multiple_of(stride_wn, 4), stride_sn, BLOCK_N)
        a0 = tl.zeros([BLOCK_N, BLOCK_W // 4], dtype=tl.float32)
        a1 = tl.zeros([BLOCK_N, BLOCK_W // 4], dtype=tl.float32)  # a1..a3: dead for rows >= BLOCK_M
        a2 = tl.zeros([BLOCK_N, BLOCK_W // 4], dtype=tl.float32)
        a3 = tl.zeros([BLOCK_N, BLOCK_W // 4], dtype=tl.float32)
        w_full = (W32 // BLOCK_W) * BLOCK_W
        for j0 in tl.range(0, w_full, BLOCK_W, num_stages=NUM_STAGES):
            a0, a1, a2, a3 = _a8_tile(a0, a1, a2, a3, w_rows, s_rows, m_rows, xq_ptr, d_ptr, xs_ptr, stride_qm,
                                      stride_dm, tl.multiple_of(j0, BLOCK_W), W32, False, T, GROUP, HAS_MIN,
                                      BLOCK_M, BLOCK_W, ASM)
        if w_full < W32:
            a0, a1, a2, a3 = _a8_tile(a0, a1, a2, a3, w_rows, s_rows, m_rows, xq_ptr, d_ptr, xs_ptr, stride_qm,
                                      stride_dm, w_full, W32, True, T, GROUP, HAS_MIN, BLOCK_M, BLOCK_W, ASM)
        _store_rows(a0, a1, a2, a3, y_ptr, stride_ym, offs_n, n_mask, BLOCK_M, P)


def quantize_x_triton(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """quantize_x_ref on the GPU (one launch): xq [M, K] int8, dx [M, C], xs [M, C] float32."""
    x = x.contiguous()
    m, k = x.shape
    xa = empty_quantized_x(m, k, bits, x.device)
    c = xa.dx.shape[1]
    block_c = min(64, next_pow2(c))
    _quant_x_kernel[(m, triton.cdiv(c, block_c))](x, xa.xq, xa.dx, xa.xs, c, x.stride(0), xa.xq.stride(0),
                                                  xa.dx.stride(0), T=16 // bits, BLOCK_C=block_c, num_warps=4)
    return xa.xq, xa.dx, xa.xs


def quant_gemv_a8_triton(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor | None,
                         bits: int, group: int, cfg: A8Config | None = None,
                         out_dtype: torch.dtype | None = None, xa: QuantizedX | None = None) -> torch.Tensor:
    """x: [M, K] (rows_supported(M); K % 32 == 0 for 4-bit codes, % 16 for 8-bit) -> [M, N] in out_dtype or x.dtype:
    quantize x (one small launch) unless its producer did (xa, for these bits), then the dp4a GEMV."""
    m, k = x.shape
    n, w16 = codes.shape
    assert rows_supported(m) and codes.dtype == torch.int16 and codes.is_contiguous() and w16 * 16 // bits == k
    assert group % (128 // bits) == 0 and scale.is_contiguous() and scale.shape == (n, k // group)
    if xa is not None and xa.bits == bits and xa.xq.shape == (m, k):
        xq, dx, xs = xa.xq, xa.dx, xa.xs
    else:
        xq, dx, xs = quantize_x_triton(x, bits)
    w32 = w16 // 2
    cfg = cfg or a8_config(m, n, w32, bits)
    out = torch.empty((m, n), device=x.device, dtype=out_dtype or x.dtype)
    groups = m > MAX_M
    rows = MAX_M if groups else m
    grid = (m // MAX_M, triton.cdiv(n, cfg.block_n)) if groups else (triton.cdiv(n, cfg.block_n),)
    _gemv_a8_kernel[grid](
        xq.view(torch.int32), dx, xs, codes.view(torch.int32), scale, mins if mins is not None else scale, out,
        n, w32, xq.stride(0) // 4, dx.stride(0), w32, scale.stride(0), out.stride(0), T=16 // bits, GROUP=group,
        HAS_MIN=mins is not None, BLOCK_M=rows, P=next_pow2(rows), BLOCK_N=cfg.block_n, BLOCK_W=cfg.block_w,
        NUM_STAGES=cfg.num_stages, ASM=not interpreting(), ROW_GROUPS=groups,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


__all__ = ["A8Config", "MAX_M", "MAX_ROWS", "QuantizedX", "a8_config", "empty_quantized_x",
           "quant_gemv_a8_ref", "quant_gemv_a8_triton", "quantize_x_ref", "quantize_x_triton", "rows_supported",
           "x_perm"]
