"""kernels/quant_gemv_a8.py: the int8-activation (dp4a) decode GEMV vs its torch arithmetic and vs
dequantize-then-matmul.

Interpreted cases run on CPU in a child process with TRITON_INTERPRET=1 (dp4a emulated on bytes there);
gpu-marked cases run the inline-PTX dp4a at realistic sizes.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hearthlm.kernels import quant_gemv_a8 as a8
from hearthlm.kernels import quant_matmul as qm

from .conftest import run_interpreted
from .test_quant_matmul import check, interp, make_weight, replayed

CASES = [(4, 32, True), (4, 64, False), (8, 16, False), (8, 32, True)]  # bits, group, has_min


@pytest.mark.parametrize("bits", [4, 8])
def test_x_quantization_ref(bits):
    perm = a8.x_perm(bits)
    assert sorted(perm.tolist()) == list(range(128 // bits))
    x = torch.randn(3, 256) * torch.linspace(0.1, 4, 256)
    x[1, :32] = 0  # an all-zero chunk: scale 0, codes 0
    xq, dx, xs = a8.quantize_x_ref(x, bits)
    ch = 128 // bits
    unperm = torch.argsort(perm)
    back = xq.view(3, -1, ch)[..., unperm].float() * dx[..., None]
    assert float((back - x.view(3, -1, ch)).abs().max()) <= float(dx.max()) / 2 + 1e-6
    assert int(xq.abs().max()) == 127 and float(dx[1, 0]) == 0
    torch.testing.assert_close(xs, x.view(3, -1, ch).sum(-1))


def test_x_layout_pairs_with_code_words():
    """Byte b of 32-bit code word p of a chunk, low or high nibble, meets the x code stored at the same byte."""
    codes = torch.randint(0, 16, (1, 32))
    words = qm.pack_codes(codes, 4).view(torch.int32)[0, :4]  # one chunk: 4 32-bit words
    perm = a8.x_perm(4)
    for p in range(4):
        w = int(words[p]) & 0xFFFFFFFF
        for h in range(2):
            for b in range(4):
                nib = (w >> (8 * b + 4 * h)) & 15
                assert nib == int(codes[0, perm[16 * h + 4 * p + b]])


@pytest.mark.parametrize("bits,group,has_min", CASES)
def test_a8_reference_near_exact(bits, group, has_min):
    codes, scale, mins = make_weight(48, 256, bits, group, has_min)
    x = torch.randn(2, 256)
    want = qm.quant_matmul_ref(x, codes, scale, mins, bits, group)
    got = a8.quant_gemv_a8_ref(*a8.quantize_x_ref(x, bits), codes, scale, mins, bits, group)
    assert float((got - want).norm() / want.norm()) < 1e-2  # int8 rounding of x only


# ------------------------------------------------------------------------------------- interpreted (CPU)
def test_a8_kernels_under_interpreter() -> None:
    run_interpreted(Path(__file__), "interp")


@interp
@pytest.mark.parametrize("bits", [4, 8])
def test_interp_quantize_x(bits):
    x = torch.randn(3, 320) * 3
    x[2, 16:48] = 0
    xq, dx, xs = a8.quantize_x_triton(x, bits)
    rq, rd, rs = a8.quantize_x_ref(x, bits)
    torch.testing.assert_close(dx, rd)
    torch.testing.assert_close(xs, rs)
    diff = (xq.int() - rq.int()).abs()
    assert int(diff.max()) <= 1 and int((diff > 0).sum()) <= 2  # division rounding at a .5 boundary at most


@interp
@pytest.mark.parametrize("bits,group,has_min,m", [c + (3,) for c in CASES] + [(4, 32, True, 1), (4, 32, True, 8),
                                                                          (8, 16, False, 8)])
def test_interp_gemv_a8(bits, group, has_min, m):
    n, k = 24, 320  # N not a multiple of the block; K: whole tiles plus a partial one
    codes, scale, mins = make_weight(n, k, bits, group, has_min, scale_dtype=torch.float16)
    x = torch.randn(m, k)
    xq, dx, xs = a8.quantize_x_triton(x, bits)
    want = a8.quant_gemv_a8_ref(xq, dx, xs, codes, scale, mins, bits, group)
    for cfg in (a8.A8Config(16, 16, 1), a8.A8Config(8, 32, 2)):
        got = a8.quant_gemv_a8_triton(x, codes, scale, mins, bits, group, cfg, out_dtype=torch.float32)
        check(got, want, 1e-5)


# --------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(4096, 4096), (14336, 4096), (4096, 14336), (1000, 4096 + 128)])
@pytest.mark.parametrize("bits,group,has_min", CASES)
@pytest.mark.parametrize("m", [1, 3, 8])
def test_gpu_gemv_a8(n, k, bits, group, has_min, m):
    codes, scale, mins = make_weight(n, k, bits, group, has_min, device="cuda", scale_dtype=torch.float16)
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    xq, dx, xs = a8.quantize_x_triton(x, bits)
    rq, rd, _ = a8.quantize_x_ref(x, bits)
    assert int((xq.int() - rq.int()).abs().max()) <= 1
    torch.testing.assert_close(dx, rd)
    got = a8.quant_gemv_a8_triton(x, codes, scale, mins, bits, group, out_dtype=torch.float32)
    check(got, a8.quant_gemv_a8_ref(xq, dx, xs, codes, scale, mins, bits, group), 1e-5)
    exact = qm.quant_matmul_ref(x.float(), codes, scale, mins, bits, group)
    assert float((got - exact).norm() / exact.norm()) < 1e-2


@pytest.mark.gpu
def test_gpu_gemv_a8_cuda_graph():
    codes, scale, mins = make_weight(1024, 4096, 4, 32, True, device="cuda", scale_dtype=torch.float16)
    x = torch.randn(2, 4096, device="cuda").to(torch.bfloat16)
    out = replayed(lambda: a8.quant_gemv_a8_triton(x, codes, scale, mins, 4, 32), x)
    want = a8.quant_gemv_a8_ref(*a8.quantize_x_ref(x, 4), codes, scale, mins, 4, 32)
    check(out.float(), want, 1e-2)


@interp
@pytest.mark.parametrize("bits", [4, 8])
def test_interp_producers_quantize_their_output(bits):
    """RMSNorm (+ residual) and SiLU*mul emit x quantized as quantize_x_ref would, in their own launch."""
    from hearthlm.kernels.activation import _act_and_mul_triton
    from hearthlm.kernels.rmsnorm import rms_norm_triton

    def same(xa, out):
        rq, rd, rs = a8.quantize_x_ref(out, bits)
        torch.testing.assert_close(xa.dx, rd)
        torch.testing.assert_close(xa.xs, rs)
        assert int((xa.xq.int() - rq.int()).abs().max()) <= 1

    h, res, w = torch.randn(3, 96), torch.randn(3, 96), torch.rand(96) + 0.5  # hidden 96: a partial power-of-2 block
    xa = a8.empty_quantized_x(3, 96, bits, h.device)
    out, _ = rms_norm_triton(h, w, 1e-6, res, xa=xa)
    same(xa, out)
    g = torch.randn(2, 2 * 1056)  # inter 1056: two programs of 1024, the second mostly masked
    xa = a8.empty_quantized_x(2, 1056, bits, g.device)
    same(xa, _act_and_mul_triton(g, False, xa))


@pytest.mark.gpu
def test_gpu_producers_feed_the_gemv():
    from hearthlm.kernels import rms_norm_a8, silu_and_mul_a8

    codes, scale, mins = make_weight(2048, 4096, 4, 32, True, device="cuda", scale_dtype=torch.float16)
    h = torch.randn(2, 4096, device="cuda", dtype=torch.bfloat16)
    res = torch.randn_like(h)
    w = torch.rand(4096, device="cuda", dtype=torch.bfloat16) + 0.5
    x, new_res, xa = rms_norm_a8(h, w, 1e-6, res, 4)
    assert xa is not None and new_res is not None
    own = a8.quant_gemv_a8_triton(x, codes, scale, mins, 4, 32)
    torch.testing.assert_close(a8.quant_gemv_a8_triton(x, codes, scale, mins, 4, 32, xa=xa), own, rtol=2e-2,
                               atol=2e-2 * float(own.abs().max()))
    a, xa = silu_and_mul_a8(torch.randn(3, 2 * 4096, device="cuda", dtype=torch.bfloat16), 8)
    rq, rd, rs = a8.quantize_x_ref(a, 8)
    torch.testing.assert_close(xa.dx, rd)
    torch.testing.assert_close(xa.xs, rs)
    assert int((xa.xq.int() - rq.int()).abs().max()) <= 1
