"""kernels/quant_matmul.py: Triton kernels vs the dequantize-then-matmul reference.

Interpreted cases (tiny shapes) run on CPU in a child process with TRITON_INTERPRET=1 (as in
test_triton_interpreter_subprocess.py: the mode is fixed when triton is imported); gpu-marked cases run
realistic sizes on CUDA. Timings: benchmarks/quant_matmul_bench.py.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from hearthlm.kernels import quant_matmul as qm

from .conftest import run_interpreted

HERE = Path(__file__).resolve().parent
HAS_TRITON = importlib.util.find_spec("triton") is not None


def _all_variants() -> list[int]:
    """The product's tl.dot variants and the benchmark-only ones (benchmarks/quant_matmul_variants.py registers
    them in qm.MM_VARIANTS): the switches they use live in the product's _mmv_kernel, so all are tested."""
    path = HERE.parents[1] / "benchmarks" / "quant_matmul_variants.py"
    spec = importlib.util.spec_from_file_location("quant_matmul_variants", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return sorted(mod.register())


VARIANTS = _all_variants()
# interpreted (slow on CPU): the product's variant, and the benchmark ones that cover the other switches (1: fp32
# dequantization, no swap; 12: split-K summed in the kernel); all of them on the GPU
INTERP_VARIANTS = sorted(set(qm.MM_VARIANTS) & {9} | {1, 12})


def _interpreted() -> bool:
    if not HAS_TRITON or torch.cuda.is_available():
        return False
    import triton

    return bool(triton.knobs.runtime.interpret)


interp = pytest.mark.skipif(not _interpreted(), reason="needs TRITON_INTERPRET=1 on a CPU machine "
                                                       "(test_quant_kernels_under_interpreter starts one)")


def make_weight(n: int, k: int, bits: int, group: int, has_min: bool, device="cpu", seed: int = 0,
                scale_dtype=torch.float32):
    """Random codes + scales (+ mins), in the kernels' layout."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    lo, hi = (0, 16) if bits == 4 else (-128, 128)
    codes = qm.pack_codes(torch.randint(lo, hi, (n, k), generator=g), bits)
    scale = (torch.rand(n, k // group, generator=g) * 0.02 + 1e-3).to(scale_dtype)
    mins = (-torch.rand(n, k // group, generator=g) * 0.1).to(scale_dtype) if has_min else None
    return [t.to(device) if t is not None else None for t in (codes, scale, mins)]


def check(got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    err = float((got.float() - want.float()).abs().max())
    assert err <= tol * float(want.float().abs().max()) + 1e-6, f"max error {err:.3g}, max |ref| {want.abs().max():.3g}"


def test_pack_codes_round_trip():
    q = torch.randint(0, 16, (5, 64))
    p = qm.pack_codes(q, 4)
    assert p.shape == (5, 16) and p.dtype == torch.int16
    # word j of chunk c: weight 32 c + 8 t + j in bits [4 t, 4 t + 4)
    word = int(p[1, 8 + 3]) & 0xFFFF
    assert [(word >> (4 * t)) & 15 for t in range(4)] == [int(q[1, 32 + 8 * t + 3]) for t in range(4)]
    assert torch.equal(qm.unpack_codes(p, 4), q.to(torch.uint8))
    q8 = torch.randint(-128, 128, (3, 48))
    p8 = qm.pack_codes(q8, 8)
    assert p8.shape == (3, 24) and int(p8[2, 9]) & 0xFF == int(q8[2, 17]) & 0xFF
    assert torch.equal(qm.unpack_codes(p8, 8), q8.to(torch.int8))


def test_reference_is_dequantize_then_matmul():
    codes, scale, mins = make_weight(24, 64, 4, 32, True)
    w = qm.unpack_codes(codes, 4).float().view(24, 2, 32) * scale[..., None] + mins[..., None]
    x = torch.randn(3, 64)
    torch.testing.assert_close(qm.quant_matmul(x, codes, scale, mins, 4, 32), x @ w.view(24, 64).T)


# ------------------------------------------------------------------------------------- interpreted (CPU)
def test_quant_kernels_under_interpreter() -> None:
    run_interpreted(Path(__file__), "interp and not mm_variants")


def test_quant_mm_variants_under_interpreter() -> None:
    run_interpreted(Path(__file__), "interp_mm_variants")


@interp
@pytest.mark.parametrize("bits,group,has_min", [(4, 32, True), (4, 32, False), (8, 32, False), (8, 16, False),
                                                (8, 32, True)])
@pytest.mark.parametrize("m", [1, 3, 4])
def test_interp_gemv(bits, group, has_min, m):
    n, k = 40, 160  # N not a multiple of the block; K: whole code tiles plus a partial one
    codes, scale, mins = make_weight(n, k, bits, group, has_min)
    x = torch.randn(m, k)
    want = qm.quant_matmul_ref(x, codes, scale, mins, bits, group)
    cfgs = [qm.GemvConfig(4, 32, 1), qm.GemvConfig(8, 16, 2)]
    if m == 3:  # the default tiles (cfg None): one row a program and one masked K tile here, whatever m
        cfgs.append(None)
    if m == 1 and (bits, group, has_min) == (4, 32, True):  # one row a program: slow to interpret, one case
        cfgs.append(qm.GemvConfig(1, 8, 1))
    for cfg in cfgs:
        check(qm.quant_gemv_triton(x, codes, scale, mins, bits, group, cfg), want, 1e-5)


@interp
@pytest.mark.parametrize("bits,group,has_min", [(4, 32, True), (8, 16, False), (8, 32, True)])
def test_interp_mm(bits, group, has_min):
    n, k, m = 40, 160, 20
    codes, scale, mins = make_weight(n, k, bits, group, has_min, scale_dtype=torch.float16)
    x = torch.randn(m, k)
    want = qm.quant_matmul_ref(x, codes, scale, mins, bits, group)
    for cfg in (qm.KernelConfig(16, 16, 32, 1), qm.KernelConfig(16, 32, 64, 2)):
        check(qm.quant_mm_triton(x, codes, scale, mins, bits, group, cfg), want, 1e-5)


@interp
@pytest.mark.parametrize("bits,group,has_min", [(4, 32, True), (4, 32, False), (8, 32, False), (8, 16, False),
                                                (4, 128, True)])
@pytest.mark.parametrize("m", [5, 16])
@pytest.mark.parametrize("variant", INTERP_VARIANTS)
def test_interp_mm_variants(bits, group, has_min, m, variant):
    # K: a partial last K step, also per split (and, group 128, steps shorter than a group). fp32 x runs the
    # fp32 dequantization of every variant; fp16 x the half-precision one of variants with MATH > 0 (their
    # inline PTX runs as Triton here); bf16 arithmetic is not emulated by the interpreter: gpu tests below
    n, k = 40, 384 if group == 128 else (224 if bits == 4 else 160)
    codes, scale, mins = make_weight(n, k, bits, group, has_min, scale_dtype=torch.float16)
    for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3)):
        x = torch.randn(m, k).to(dtype)
        want = qm.quant_matmul_ref(x.float(), codes, scale, mins, bits, group)
        # a split with K steps shorter and longer than a group (and a partial last step per split), and one
        # without a split
        for bm, bn, bk, split in ((16, 32, 256, 2), (16, 32, 64, 3), (16, 16, 128, 1)):
            cfg = qm.KernelConfig(bm, bn, bk * 4 // bits, split, variant=variant)  # same words per step
            got = qm.quant_mm_triton(x, codes, scale, mins, bits, group, cfg)
            assert got.dtype == dtype and got.shape == (m, n)
            check(got, want, tol)
    if qm.MM_VARIANTS[variant].get("RED"):  # split-K summed in the kernel: its tile counters are back at 0
        assert not qm._split_counters(x.device, 1).any()


@interp
@pytest.mark.parametrize("bits,group,has_min", [(4, 32, True), (8, 16, False)])
def test_interp_dequantize(bits, group, has_min):
    codes, scale, mins = make_weight(20, 160, bits, group, has_min)
    got = qm.dequantize_triton(codes, scale, mins, bits, group, torch.float32)
    torch.testing.assert_close(got, qm.dequantize_ref(codes, scale, mins, bits, group))


@interp
def test_interp_half_activations():
    codes, scale, mins = make_weight(32, 64, 4, 32, True, scale_dtype=torch.float16)
    x = torch.randn(2, 64).to(torch.float16)
    want = qm.quant_matmul_ref(x, codes, scale, mins, 4, 32)
    got = qm.quant_gemv_triton(x, codes, scale, mins, 4, 32)
    assert got.dtype == torch.float16
    check(got, want, 2e-3)


# --------------------------------------------------------------------------------------------------- GPU
SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]  # (N, K): attention / gate-up / down sized


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("bits,group,has_min", [(4, 32, True), (8, 32, False), (8, 16, False)])
@pytest.mark.parametrize("m", [1, 4, 16, 128, 512])
def test_gpu_quant_matmul(n, k, bits, group, has_min, m):
    codes, scale, mins = make_weight(n, k, bits, group, has_min, device="cuda", scale_dtype=torch.float16)
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    want = qm.quant_matmul_ref(x.float(), codes, scale, mins, bits, group)
    got = qm.quant_matmul(x, codes, scale, mins, bits, group)
    assert got.dtype == torch.bfloat16 and got.shape == (m, n)
    # bf16 output (and, in the tl.dot kernel, bf16-rounded dequantized W tiles)
    check(got, want, 1e-2)
    assert float((got.float() - want).norm() / want.norm()) < 5e-3
    if m <= 16:  # both kernels agree for the small-M rows
        other = qm.quant_mm_triton(x, codes, scale, mins, bits, group)
        check(other, want, 1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("bits,group,has_min", [(4, 32, True), (4, 32, False), (8, 32, False), (8, 16, False)])
@pytest.mark.parametrize("m", [5, 16, 128])
@pytest.mark.parametrize("variant", VARIANTS)
def test_gpu_mm_variants(bits, group, has_min, m, variant):
    """Each variant with its default tiles on bf16 x (bf16 dequantization where MATH > 0) and, at 16 rows,
    fp16 x; N not a multiple of any block and K with a partial last step in the second shape."""
    for n, k in ((4096, 4096), (1000, 4096 + 96)):
        codes, scale, mins = make_weight(n, k, bits, group, has_min, device="cuda", scale_dtype=torch.float16)
        for dtype in (torch.bfloat16, torch.float16) if m == 16 else (torch.bfloat16,):
            x = torch.randn(m, k, device="cuda").to(dtype)
            want = qm.quant_matmul_ref(x.float(), codes, scale, mins, bits, group)
            c = qm.mm_config(m, n, k, bits)
            cfg = qm.KernelConfig(c.block_m, c.block_n, c.block_k, c.split_k, c.num_warps, c.num_stages, variant)
            got = qm.quant_mm_triton(x, codes, scale, mins, bits, group, cfg)
            assert got.dtype == dtype and got.shape == (m, n)
            check(got, want, 1e-2)
            assert float((got.float() - want).norm() / want.norm()) < 5e-3
            if qm.MM_VARIANTS[variant].get("RED"):
                assert not qm._split_counters(x.device, 1).any()


@pytest.mark.gpu
def test_gpu_odd_sizes_and_cuda_graph():
    n, k = 1000, 4096 + 96  # N not a multiple of any block; K with a partial last tile
    codes, scale, mins = make_weight(n, k, 4, 32, True, device="cuda", scale_dtype=torch.float16)
    x = torch.randn(2, k, device="cuda").to(torch.bfloat16)
    want = qm.quant_matmul_ref(x.float(), codes, scale, mins, 4, 32)
    check(qm.quant_matmul(x, codes, scale, mins, 4, 32), want, 1e-2)
    # decode steps replay CUDA graphs: the kernels must capture (no host syncs)
    out = replayed(lambda: qm.quant_matmul(x, codes, scale, mins, 4, 32), x)
    check(out, qm.quant_matmul_ref(x.float(), codes, scale, mins, 4, 32), 1e-2)


def replayed(fn, x: torch.Tensor) -> torch.Tensor:
    """fn()'s output buffer after capturing fn in a CUDA graph, refilling x and replaying it."""
    fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    return out


def test_product_variants_are_the_dispatched_ones():
    """The product keeps only the tl.dot variants mm_config picks (0, and 9 on Hopper)."""
    picked = {qm.mm_config(m, n, k, bits, hopper).variant for m in (5, 16, 64, 128) for n, k in SHAPES
              for bits in (4, 8) for hopper in (False, True)}
    assert picked - {0} <= set(qm.MM_VARIANTS) and 9 in picked
