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
    if bits == 4:
        codes = qm.pack_int4(torch.randint(0, 16, (n, k), generator=g))
    else:
        codes = torch.randint(-128, 128, (n, k), generator=g).to(torch.int8)
    scale = (torch.rand(n, k // group, generator=g) * 0.02 + 1e-3).to(scale_dtype)
    mins = (-torch.rand(n, k // group, generator=g) * 0.1).to(scale_dtype) if has_min else None
    return [t.to(device) if t is not None else None for t in (codes, scale, mins)]


def check(got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    err = float((got.float() - want.float()).abs().max())
    assert err <= tol * float(want.float().abs().max()) + 1e-6, f"max error {err:.3g}, max |ref| {want.abs().max():.3g}"


def test_pack_int4_round_trip():
    q = torch.randint(0, 16, (5, 64))
    p = qm.pack_int4(q)
    assert p.shape == (5, 32) and p.dtype == torch.uint8 and int(p[0, 0]) == int(q[0, 0]) | int(q[0, 1]) << 4
    assert torch.equal(qm.unpack_int4(p), q.to(torch.uint8))


def test_reference_is_dequantize_then_matmul():
    codes, scale, mins = make_weight(24, 64, 4, 32, True)
    w = qm.unpack_int4(codes).float().view(24, 2, 32) * scale[..., None] + mins[..., None]
    x = torch.randn(3, 64)
    torch.testing.assert_close(qm.quant_matmul(x, codes, scale, mins, 4, 32), x @ w.view(24, 64).T)


# ------------------------------------------------------------------------------------- interpreted (CPU)
def test_quant_kernels_under_interpreter() -> None:
    run_interpreted(Path(__file__), "interp")


@interp
@pytest.mark.parametrize("bits,group,has_min", [(4, 32, True), (4, 32, False), (8, 32, False), (8, 16, False),
                                                (8, 32, True)])
@pytest.mark.parametrize("m", [1, 3])
def test_interp_gemv(bits, group, has_min, m):
    n, k = 40, 160  # N not a multiple of the block; K split into uneven parts
    codes, scale, mins = make_weight(n, k, bits, group, has_min)
    x = torch.randn(m, k)
    want = qm.quant_matmul_ref(x, codes, scale, mins, bits, group)
    for cfg in (None, qm.KernelConfig(4, 16, 64, 3), qm.KernelConfig(4, 32, 32, 1)):
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
def test_gpu_odd_sizes_and_cuda_graph():
    n, k = 1000, 4096 + 96  # N not a multiple of any block; K with a partial last tile
    codes, scale, mins = make_weight(n, k, 4, 32, True, device="cuda", scale_dtype=torch.float16)
    x = torch.randn(2, k, device="cuda").to(torch.bfloat16)
    want = qm.quant_matmul_ref(x.float(), codes, scale, mins, 4, 32)
    check(qm.quant_matmul(x, codes, scale, mins, 4, 32), want, 1e-2)
    # decode steps replay CUDA graphs: the kernels must capture (no host syncs)
    out = qm.quant_matmul(x, codes, scale, mins, 4, 32)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = qm.quant_matmul(x, codes, scale, mins, 4, 32)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    check(out, qm.quant_matmul_ref(x.float(), codes, scale, mins, 4, 32), 1e-2)
