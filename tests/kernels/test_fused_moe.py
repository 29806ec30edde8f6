"""kernels/fused_moe.py: alignment, torch reference vs a naive per-token loop, Triton vs the reference.

Interpreted cases (tiny shapes) run on CPU in the session's TRITON_INTERPRET=1 child (tests/kernels/conftest.py);
gpu-marked cases run Qwen3-30B-A3B's expert shapes on CUDA, with a CUDA-graph capture/replay.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hearthlm.kernels import fused_moe as fm
from hearthlm.kernels import quant_matmul as qm

from .conftest import run_interpreted

HAS_TRITON = importlib.util.find_spec("triton") is not None
E, K, H, I = 4, 2, 32, 64  # tiny interpreted shapes
QWEN3 = dict(e=128, k=8, h=2048, i=768)  # Qwen3-30B-A3B experts


def _interpreted() -> bool:
    if not HAS_TRITON or torch.cuda.is_available():
        return False
    import triton

    return bool(triton.knobs.runtime.interpret)


interp = pytest.mark.skipif(not _interpreted(), reason="needs TRITON_INTERPRET=1 on a CPU machine "
                                                       "(test_fused_moe_under_interpreter starts one)")


def experts(e: int, h: int, i: int, dtype=torch.float32, device="cpu", seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(e, 2 * i, h, generator=g) / h ** 0.5).to(dtype).to(device)
    w2 = (torch.randn(e, h, i, generator=g) / i ** 0.5).to(dtype).to(device)
    return w13, w2


def routing(t: int, e: int, k: int, device="cpu", seed: int = 1, allowed: list[int] | None = None):
    """Distinct experts per token (from `allowed`, default all), softmax-like float32 weights."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.tensor(allowed if allowed is not None else list(range(e)))
    ids = torch.stack([pool[torch.randperm(len(pool), generator=g)[:k]] for _ in range(t)]).to(torch.int32)
    w = torch.softmax(torch.randn(t, k, generator=g), dim=-1)
    return w.to(device), ids.reshape(t, k).to(device)


def quant_experts(e: int, n: int, k: int, bits: int, group: int, has_min: bool, device="cpu", seed: int = 0):
    """[E, N, K] weights in quant_matmul's packed layout: (codes, scale, mins)."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = (0, 16) if bits == 4 else (-128, 128)
    codes = torch.stack([qm.pack_codes(torch.randint(lo, hi, (n, k), generator=g), bits) for _ in range(e)])
    scale = (torch.rand(e, n, k // group, generator=g) * 0.02 / k ** 0.5 * 8 + 1e-4).to(torch.float16)
    mins = (-torch.rand(e, n, k // group, generator=g) * 0.01).to(torch.float16) if has_min else None
    return [t.to(device) if t is not None else None for t in (codes, scale, mins)]


def naive(x, w13, w2, tw, ids) -> torch.Tensor:
    """Per token, per rank, float64."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for r in range(ids.shape[1]):
            e = int(ids[t, r])
            gu = w13[e].double() @ x[t].double()
            gate, up = gu.chunk(2)
            out[t] += float(tw[t, r]) * (w2[e].double() @ (F.silu(gate) * up))
    return out


def close(got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    err = float((got.double() - want.double()).abs().max())
    assert err <= tol * float(want.double().abs().max()) + 1e-6, f"max error {err:.3g}, max |ref| {want.abs().max()}"


# ------------------------------------------------------------------------------------------- CPU (torch only)
@pytest.mark.parametrize("t,k,e,bm", [(1, 2, 4, 16), (5, 2, 4, 16), (33, 2, 4, 16), (3, 8, 128, 16), (7, 1, 4, 4)])
def test_moe_align(t, k, e, bm):
    _, ids = routing(t, e, k, allowed=[0, 2] if (k == 2 and e == 4) else None)
    pairs, bexp = fm.moe_align(ids, e, bm)
    n = t * k
    assert pairs.shape == (fm.aligned_size(n, e, bm),) and bexp.shape == (pairs.numel() // bm,)
    assert pairs.dtype == bexp.dtype == torch.int32
    real = pairs[pairs < n]
    assert sorted(real.tolist()) == list(range(n))  # every pair once; the rest is the sentinel
    assert bool((pairs[pairs >= n] == n).all())
    flat = ids.reshape(-1)
    last = -1
    for b in range(bexp.numel()):
        blk = pairs[b * bm:(b + 1) * bm]
        blk_real = blk[blk < n]
        if int(bexp[b]) < 0:
            assert blk_real.numel() == 0
            continue
        assert int(bexp[b]) >= last and blk_real.numel() > 0  # experts in increasing order, no empty blocks
        last = int(bexp[b])
        assert bool((flat[blk_real.long()] == bexp[b]).all())
        assert blk_real.tolist() == sorted(blk_real.tolist()) and bool((blk[:blk_real.numel()] < n).all())


@pytest.mark.parametrize("k", [1, 2])
def test_reference_matches_naive(k):
    w13, w2 = experts(E, H, I)
    x = torch.randn(6, H)
    tw, ids = routing(6, E, k, allowed=[1, 3])  # experts 0 and 2 get no token
    torch.testing.assert_close(fm.fused_moe_reference(x, w13, w2, tw, ids).double(), naive(x, w13, w2, tw, ids),
                               atol=1e-5, rtol=1e-5)
    assert torch.equal(fm.fused_moe(x, w13, w2, tw, ids), fm.fused_moe_reference(x, w13, w2, tw, ids))


def test_quant_reference_is_dequantized():
    c13, s13, m13 = quant_experts(E, 2 * I, H, 4, 32, True)
    c2, s2, m2 = quant_experts(E, H, I, 4, 32, True, seed=3)
    w13 = torch.stack([qm.dequantize_ref(c13[e], s13[e], m13[e], 4, 32) for e in range(E)])
    w2 = torch.stack([qm.dequantize_ref(c2[e], s2[e], m2[e], 4, 32) for e in range(E)])
    x = torch.randn(5, H)
    tw, ids = routing(5, E, K)
    got = fm.fused_moe_quant(x, c13, s13, m13, c2, s2, m2, tw, ids, 4, 32)
    assert torch.equal(got, fm.fused_moe_reference(x, w13, w2, tw, ids))


# ------------------------------------------------------------------------------------- interpreted (CPU)
def test_fused_moe_under_interpreter() -> None:
    run_interpreted(Path(__file__), "interp")


@interp
@pytest.mark.parametrize("t", [1, 5, 33])
def test_interp_matches_reference(t):
    w13, w2 = experts(E, H, I)
    x = torch.randn(t, H)
    tw, ids = routing(t, E, K)
    got = fm.fused_moe_triton(x, w13, w2, tw, ids)
    assert got.dtype == x.dtype and got.shape == x.shape
    close(got, fm.fused_moe_reference(x, w13, w2, tw, ids), 1e-5)


@interp
def test_interp_half():
    w13, w2 = experts(E, H, I, torch.float16)
    x = torch.randn(5, H).to(torch.float16)
    tw, ids = routing(5, E, K)
    got = fm.fused_moe_triton(x, w13, w2, tw, ids)
    assert got.dtype == torch.float16
    close(got, fm.fused_moe_reference(x, w13, w2, tw, ids), 5e-3)


@interp
def test_interp_batch_invariance():
    """A token alone and in a batch: its row never mixes with others. Close, not bit-equal, here: the interpreter's
    tl.dot is np.matmul, whose BLAS rounds a row by its place in the tile; test_gpu_batch_invariance checks bits."""
    w13, w2 = experts(E, H, I)
    x = torch.randn(33, H)
    tw, ids = routing(33, E, K)
    batch = fm.fused_moe_triton(x, w13, w2, tw, ids)
    for row in (0, 17, 32):
        alone = fm.fused_moe_triton(x[row:row + 1], w13, w2, tw[row:row + 1], ids[row:row + 1])
        torch.testing.assert_close(alone[0], batch[row], atol=1e-6, rtol=1e-6)


@interp
@pytest.mark.parametrize("t,k,allowed", [(5, 2, [1, 3]), (6, 1, None), (1, 1, [2])])
def test_interp_edges(t, k, allowed):
    """Experts without tokens, k = 1, fewer pairs than experts."""
    w13, w2 = experts(E, H, I)
    x = torch.randn(t, H)
    tw, ids = routing(t, E, k, allowed=allowed)
    close(fm.fused_moe_triton(x, w13, w2, tw, ids), fm.fused_moe_reference(x, w13, w2, tw, ids), 1e-5)


@interp
@pytest.mark.parametrize("bits,group,has_min", [(4, 32, True), (8, 16, False)])
def test_interp_quant(bits, group, has_min):
    c13, s13, m13 = quant_experts(E, 2 * I, H, bits, group, has_min)
    c2, s2, m2 = quant_experts(E, H, I, bits, group, has_min, seed=3)
    x = torch.randn(5, H)
    tw, ids = routing(5, E, K, allowed=[0, 1, 3])
    args = (x, c13, s13, m13, c2, s2, m2, tw, ids, bits, group)
    close(fm.fused_moe_quant_triton(*args), fm.fused_moe_quant_reference(*args), 1e-5)


# --------------------------------------------------------------------------------------------------- GPU
def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("t", [1, 7, 64, 512])
def test_gpu_fused_moe(dtype, t):
    s = QWEN3
    w13, w2 = experts(s["e"], s["h"], s["i"], dtype, "cuda")
    x = torch.randn(t, s["h"], device="cuda").to(dtype)
    tw, ids = routing(t, s["e"], s["k"], "cuda")
    got = fm.fused_moe(x, w13, w2, tw, ids)
    assert got.dtype == dtype and got.shape == x.shape
    want = fm.fused_moe_reference(x, w13, w2, tw, ids)
    assert _rel(got, want) < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_batch_invariance(dtype):
    s = QWEN3
    w13, w2 = experts(s["e"], s["h"], s["i"], dtype, "cuda")
    x = torch.randn(300, s["h"], device="cuda").to(dtype)
    tw, ids = routing(300, s["e"], s["k"], "cuda")
    batch = fm.fused_moe(x, w13, w2, tw, ids)
    for row in (0, 5, 299):
        for lo, hi in ((row, row + 1), (max(0, row - 3), min(300, row + 20))):
            sub = fm.fused_moe(x[lo:hi], w13, w2, tw[lo:hi], ids[lo:hi])
            assert torch.equal(sub[row - lo], batch[row]), (row, lo, hi)


@pytest.mark.gpu
@pytest.mark.parametrize("bits,group,has_min", [(4, 32, True), (4, 128, False), (8, 32, False)])
@pytest.mark.parametrize("t", [1, 64])
def test_gpu_fused_moe_quant(bits, group, has_min, t):
    s = QWEN3
    c13, s13, m13 = quant_experts(s["e"], 2 * s["i"], s["h"], bits, group, has_min, "cuda")
    c2, s2, m2 = quant_experts(s["e"], s["h"], s["i"], bits, group, has_min, "cuda", seed=3)
    x = torch.randn(t, s["h"], device="cuda").to(torch.bfloat16)
    tw, ids = routing(t, s["e"], s["k"], "cuda")
    args = (x, c13, s13, m13, c2, s2, m2, tw, ids, bits, group)
    assert _rel(fm.fused_moe_quant(*args), fm.fused_moe_quant_reference(*args)) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("quant", [False, True])
def test_gpu_cuda_graph(quant):
    """A decode step captured once replays with new tokens and new routing (no host syncs in fused_moe)."""
    s = QWEN3
    t = 4
    x = torch.randn(t, s["h"], device="cuda").to(torch.bfloat16)
    tw, ids = routing(t, s["e"], s["k"], "cuda")
    if quant:
        c13, s13, m13 = quant_experts(s["e"], 2 * s["i"], s["h"], 4, 32, True, "cuda")
        c2, s2, m2 = quant_experts(s["e"], s["h"], s["i"], 4, 32, True, "cuda", seed=3)
        run = lambda: fm.fused_moe_quant(x, c13, s13, m13, c2, s2, m2, tw, ids, 4, 32)  # noqa: E731
        ref = lambda: fm.fused_moe_quant_reference(x, c13, s13, m13, c2, s2, m2, tw, ids, 4, 32)  # noqa: E731
    else:
        w13, w2 = experts(s["e"], s["h"], s["i"], torch.bfloat16, "cuda")
        run = lambda: fm.fused_moe(x, w13, w2, tw, ids)  # noqa: E731
        ref = lambda: fm.fused_moe_reference(x, w13, w2, tw, ids)  # noqa: E731
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()  # warm-up (compiles) outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    for seed in (5, 6):
        x.copy_(torch.randn_like(x))
        new_w, new_ids = routing(t, s["e"], s["k"], "cuda", seed=seed)
        tw.copy_(new_w)
        ids.copy_(new_ids)
        graph.replay()
        torch.cuda.synchronize()
        want = ref()
        assert _rel(out, want) < 1e-2
        assert torch.equal(out, run())  # the replay is the eager computation, bit for bit
