"""layers/weight_kernel.py: one kernel per weight scheme behind Linear, settings bound per engine at load time."""
from __future__ import annotations

import gc

import pytest
import torch

from hearthlm.errors import InvalidRequestError
from hearthlm.layers.gpu_quant import QuantWeight
from hearthlm.layers.linear import Linear
from hearthlm.layers.quant_linear import Int4Weight, NativeWeight
from hearthlm.layers.weight_kernel import DenseBudget, DenseWeight, PartsKernel, WeightOptions, bound, \
    current_options
from hearthlm.loader.gguf_unpack import unpack_gguf
from hearthlm.quant.weight_quant import quantize_int4

from .test_quant_linear import random_blocks


def test_linear_holds_one_kernel_per_scheme():
    w = torch.randn(32, 64)
    dense = Linear(w, torch.randn(32))
    assert isinstance(dense.kernel, DenseWeight) and dense.packed is None and dense.weight is w
    assert dense.native is None and dense.a8_bits(1, torch.device("cpu")) is None
    x = torch.randn(3, 2, 64)
    assert torch.equal(dense(x), torch.nn.functional.linear(x, w, dense.bias))
    assert torch.equal(dense.native_dtype(x), dense(x))
    q = Linear(quantize_int4(w))
    assert isinstance(q.kernel, (NativeWeight, Int4Weight)) and q.packed is q.kernel and q.weight is None
    assert q.native is (q.kernel if isinstance(q.kernel, NativeWeight) else None)
    assert torch.equal(q(x[0]), q(x)[0])  # 3-D input: the same rows
    q.set_invariant(True)  # CPU kernels: invariant already
    mixed = Linear.fused([quantize_int4(w), w])
    assert isinstance(mixed.kernel, PartsKernel) and [type(p) for p in mixed.parts][1] is DenseWeight
    assert len(mixed.tensors()) == len(mixed.parts[0].tensors()) + 1


def test_quantized_cuda_kernels_refuse_batch_invariance():
    qw = QuantWeight.from_group(quantize_int4(torch.randn(32, 64)))
    with pytest.raises(InvalidRequestError, match="QuantWeight") as e:
        Linear(qw).set_invariant(True)
    assert e.value.param == "batch_invariant"
    Linear(qw).set_invariant(False)


def test_options_bound_at_construction():
    """EngineConfig.gemv / kernels reach a kernel when it is built (load time), not per call."""
    assert current_options().gemv == "auto"
    g = quantize_int4(torch.randn(32, 64))
    for gemv, kernels, a8, gemv16 in (("auto", "auto", torch.version.hip is None, True), ("a16", "auto", False, True),
                                      ("off", "auto", False, False), ("auto", "torch", False, False)):
        with bound(WeightOptions(gemv, kernels)):
            qw = QuantWeight.from_group(g)
            assert current_options().gemv == gemv
        assert qw.gemv_a8 == a8 and WeightOptions(gemv, kernels).gemv16 == gemv16
    assert current_options().gemv == "auto"  # restored


def test_dense_copies_stay_within_the_engine_budget():
    """EngineConfig.cpu_dense_memory: each engine (load) has its own budget of bf16 copies (Int4Weight)."""
    gq = unpack_gguf(random_blocks("Q4_0", 32, 64), "Q4_0", (32, 64))
    with bound(WeightOptions(cpu_dense=DenseBudget(0))):
        assert Int4Weight(gq).dense is None
    budget = DenseBudget(1 << 20)
    with bound(WeightOptions(cpu_dense=budget)):
        w = Int4Weight(gq)
    if w.dense is None:
        pytest.skip("no oneDNN bf16 on this CPU")
    assert budget.used == w.dense_nbytes == 2 * 32 * 64
    with bound(WeightOptions(cpu_dense=DenseBudget(2 * 32 * 64 - 1))):
        assert Int4Weight(gq).dense is None  # no room
    del w
    gc.collect()
    assert budget.used == 0  # released with its weight
