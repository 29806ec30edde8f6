"""kernels/gemv.py: the decode GEMV vs gemv_ref, and its hook in layers/linear.py.

Three groups:
  * plain CPU tests (dispatch to the reference, config table, the Linear hook staying off on CPU);
  * `test_interpreted_*`: the Triton kernel on CPU tensors under TRITON_INTERPRET=1. Like
    test_triton_interpreted.py they run only in a process that set TRITON_INTERPRET=1 before importing triton;
    `test_gemv_under_interpreter` starts such a process (`pytest -k interpreted` on this file) from a CPU run;
  * `@pytest.mark.gpu`: real decode shapes in bf16 vs gemv_ref, the Linear hook, CUDA-graph capture/replay.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from hearthlm.kernels import gemv as gv

from .conftest import run_interpreted

HERE = Path(__file__).resolve().parent
HAS_TRITON = importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    if not HAS_TRITON or torch.cuda.is_available():
        return False
    import triton

    return bool(triton.knobs.runtime.interpret)


interpreted = pytest.mark.skipif(not _interpreting(), reason="needs TRITON_INTERPRET=1 on a CPU machine "
                                 "(test_gemv_under_interpreter runs these)")


def _case(m: int, n: int, k: int, dtype: torch.dtype, bias: bool, device: str = "cpu", seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype).to(device)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype).to(device)
    b = torch.randn(n, generator=g).to(dtype).to(device) if bias else None
    return x, w, b


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


# ----------------------------------------------------------------------------------------------------- plain CPU
def test_cpu_dispatches_to_reference():
    x, w, b = _case(3, 11, 40, torch.float32, True)
    torch.testing.assert_close(gv.gemv(x, w, b), x @ w.t() + b)
    assert not gv.gemv_supported(x, w, b)  # CPU: never the Triton kernel outside the interpreter tests


@pytest.mark.parametrize("m", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("n,k", [(4096, 1024), (1024, 3072), (151936, 1024), (4096, 14336), (24, 40)])
def test_config_table(m, n, k):
    c = gv.gemv_config(m, n, k)
    for v in (c.block_n, c.block_k):
        assert v >= 1 and v & (v - 1) == 0
    assert c.block_k >= 16 and c.num_warps in (1, 2, 4, 8) and c.num_stages >= 1
    assert c.block_k >= min(256 * c.num_warps, gv.next_pow2(k))  # x's layout a slice of W's (no smem in the loop)


def test_linear_hook_off_on_cpu():
    from hearthlm.layers.linear import Linear

    x, w, b = _case(2, 12, 16, torch.float32, True)
    torch.testing.assert_close(Linear(w, b)(x), torch.nn.functional.linear(x, w, b))


# ------------------------------------------------------------------------------ interpreted (TRITON_INTERPRET=1)
@interpreted
# the bias is one broadcast add in the epilogue, whatever the row count: each row count once or twice, both ways
@pytest.mark.parametrize("m,bias", [(1, True), (3, False), (3, True), (8, False)])
@pytest.mark.parametrize("n,k,block_n,block_k", [
    (13, 40, 4, 16),    # odd N (last program partly past N), K: two whole tiles + a masked tail
    (7, 72, 2, 32),     # N not a multiple of block_n, tail of 8
    (5, 24, 8, 64),     # block_n > N, K < block_k (only the masked tail)
    (16, 64, 1, 16),    # block_n = 1, K a multiple of block_k (no tail)
])
def test_interpreted(m, bias, n, k, block_n, block_k):
    for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3)):
        x, w, b = _case(m, n, k, dtype, bias, seed=m + n)
        y = gv.gemv_triton(x, w, b, block_n=block_n, block_k=block_k, num_warps=2, num_stages=2)
        assert y.shape == (m, n) and y.dtype == dtype
        torch.testing.assert_close(y, gv.gemv_ref(x, w, b), atol=tol, rtol=tol)


@interpreted
def test_interpreted_bf16_strided_rows_default_config():
    # x rows with a row stride > K (a slice of a wider buffer), bf16, default tiles
    x, w, b = _case(4, 9, 48, torch.bfloat16, True, seed=3)
    wide = torch.zeros(4, 64, dtype=torch.bfloat16)
    wide[:, :48] = x
    y = gv.gemv_triton(wide[:, :48], w, b)
    assert _rel_err(y, gv.gemv_ref(x, w, b)) < 1e-2


@interpreted
def test_interpreted_out_buffer():
    x, w, _ = _case(2, 10, 32, torch.float32, False, seed=5)
    out = torch.full((2, 10), float("nan"))
    assert gv.gemv_triton(x, w, out=out, block_n=4, block_k=16) is out
    torch.testing.assert_close(out, gv.gemv_ref(x, w))


@interpreted
@pytest.mark.parametrize("m", [1, 3])
def test_interpreted_fp8_weights(m):
    """W8A16: e4m3 codes with a scale per output column, read directly (16 codes per thread vector)."""
    from hearthlm.kernels.fp8_quant import quantize_rows_fp8_ref

    x, w, b = _case(m, 13, 96, torch.float32, True, seed=7)
    w8, scale = quantize_rows_fp8_ref(w)
    y = gv.gemv_triton(x.to(torch.float16), w8, b.to(torch.float16), block_n=4, block_k=32, num_warps=1,
                       w_scale=scale.view(-1))
    want = gv.gemv_ref(x.to(torch.float16), w8, b.to(torch.float16), w_scale=scale.view(-1))
    torch.testing.assert_close(y, want, atol=2e-3, rtol=2e-3)
    assert _rel_err(want, x @ w.t() + b) < 0.1  # e4m3 keeps ~3 bits of mantissa


@interpreted
def test_interpreted_fp8_row_quantization():
    from hearthlm.kernels import fp8_quant as fq

    x = torch.randn(5, 300) * torch.tensor([1e-3, 1.0, 50.0, 0.0, 3.0])[:, None]
    q, s = fq.quantize_rows_fp8_triton(x)
    q_ref, s_ref = fq.quantize_rows_fp8_ref(x)
    torch.testing.assert_close(s, s_ref)
    assert torch.equal(q.float(), q_ref.float())  # (the reference keeps -0.0 where x is -0.0; equal as values)


def test_gemv_under_interpreter() -> None:
    run_interpreted(Path(__file__), "interpreted")


# ------------------------------------------------------------------------------------------------------------ GPU
SHAPES = [(4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072), (49152, 1024),  # Qwen3-0.6B
          (3072, 2048), (2048, 2048), (16384, 2048), (2048, 8192),  # Llama-3.2-1B
          (6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]  # Llama-3.1-8B


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", [1, 2, 3, 4, 8])
def test_gpu_shapes(m, n, k):
    x, w, _ = _case(m, n, k, torch.bfloat16, False, device="cuda", seed=n + k)
    assert gv.gemv_supported(x, w)
    y = gv.gemv(x, w)
    assert y.shape == (m, n) and y.dtype == torch.bfloat16
    assert _rel_err(y, gv.gemv_ref(x, w)) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("block_n,block_k,num_warps,num_stages", [
    (1, 256, 1, 1), (4, 512, 2, 1), (8, 1024, 4, 3), (16, 2048, 8, 2), (64, 128, 4, 4), (32, 1024, 4, 1)])
@pytest.mark.parametrize("m", [1, 5, 8])
def test_gpu_configs_odd_shape(block_n, block_k, num_warps, num_stages, m):
    # N odd, K a multiple of 8 but not of block_k (masked tail), fp16 with bias
    x, w, b = _case(m, 1001, 1032, torch.float16, True, device="cuda", seed=m)
    y = gv.gemv_triton(x, w, b, block_n=block_n, block_k=block_k, num_warps=num_warps, num_stages=num_stages)
    assert _rel_err(y, gv.gemv_ref(x, w, b)) < 1e-2


@pytest.mark.gpu
def test_gpu_linear_hook(monkeypatch):
    from hearthlm.kernels.row_dispatch import DENSE_GEMV_MAX_ROWS
    from hearthlm.layers import weight_kernel as wk
    from hearthlm.layers.linear import Linear

    m = DENSE_GEMV_MAX_ROWS
    x, w, b = _case(m, 3072, 1024, torch.bfloat16, True, device="cuda")
    layer = Linear(w, b)
    calls = []
    real = wk.gemv
    monkeypatch.setattr(wk, "gemv", lambda *a: calls.append(1) or real(*a))
    y = layer(x.view(m, 1, 1024))  # 3-D input: viewed as [m, K]
    assert calls and y.shape == (m, 1, 3072)
    assert _rel_err(y.view(m, -1), gv.gemv_ref(x, w, b)) < 1e-2
    calls.clear()
    layer(torch.randn(DENSE_GEMV_MAX_ROWS + 1, 1024, device="cuda", dtype=torch.bfloat16))  # prefill: cuBLAS
    for options in (wk.WeightOptions(gemv="off"), wk.WeightOptions(kernels="torch")):  # bound at construction
        with wk.bound(options):
            off = Linear(w, b)
        off(x)
    assert not calls


@pytest.mark.gpu
def test_gpu_cuda_graph_capture_replay():
    x, w, b = _case(4, 6144, 1024, torch.bfloat16, True, device="cuda")
    x_static = x.clone()
    gv.gemv(x_static, w, b)  # compile before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_static = gv.gemv(x_static, w, b)
    for seed in range(3):
        x_new, _, _ = _case(4, 6144, 1024, torch.bfloat16, False, device="cuda", seed=100 + seed)
        x_static.copy_(x_new)
        graph.replay()
        torch.cuda.synchronize()
        assert _rel_err(y_static, gv.gemv_ref(x_new, w, b)) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(4096, 1024), (1024, 3072), (6144, 4096), (4096, 14336), (1000, 1040)])
@pytest.mark.parametrize("m", [1, 2, 4])
def test_gpu_fp8_weights(m, n, k):
    from hearthlm.kernels.fp8_quant import quantize_rows_fp8_ref

    x, w, _ = _case(m, n, k, torch.bfloat16, False, device="cuda", seed=n + k)
    w8, scale = quantize_rows_fp8_ref(w)
    y = gv.gemv_triton(x, w8, w_scale=scale.view(-1))
    assert y.shape == (m, n) and y.dtype == torch.bfloat16
    assert _rel_err(y, gv.gemv_ref(x, w8, w_scale=scale.view(-1))) < 1e-2


@pytest.mark.gpu
def test_gpu_fp8_row_quantization_exact():
    from hearthlm.kernels import fp8_quant as fq

    x = (torch.randn(33, 4100, device="cuda") * torch.rand(33, 1, device="cuda") * 100).to(torch.bfloat16)
    x[3] = 0
    q, s = fq.quantize_rows_fp8_triton(x)
    q_ref, s_ref = fq.quantize_rows_fp8_ref(x)
    assert torch.equal(s, s_ref) and torch.equal(q.float(), q_ref.float())


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 4, 16, 128])
def test_gpu_fp8_linear_by_row_count(m):
    """Fp8Weight: GEMV up to FP8_GEMV_MAX_ROWS rows, per-token scaled _scaled_mm above; both near x @ dequant(W)^T."""
    from hearthlm.layers.gpu_quant import Fp8Weight

    x, w, _ = _case(m, 3072, 1024, torch.bfloat16, False, device="cuda", seed=m)
    fw = Fp8Weight.quantize(w)
    y = fw(x)
    assert y.shape == (m, 3072) and y.dtype == torch.bfloat16
    assert _rel_err(y, x.float() @ fw.dequantize(torch.float32).t()) < 0.05
