"""bf16 copies of CPU quantized weights for many-row matmuls (Int4Weight, layers/quant_linear.py): prepacked for
oneDNN's bf16 GEMM, counted against the engine's budget (EngineConfig.cpu_dense_memory, layers/weight_kernel.py),
and the GEMM as an op torch.compile keeps opaque."""
from __future__ import annotations

import functools

import torch

from .weight_kernel import DenseBudget


@functools.cache
def dense_supported() -> bool:
    """oneDNN with native bf16 (AVX-512 BF16 / AMX); without them the bf16 GEMM is emulated and no copies are
    made (kernels/row_dispatch.py's CPU_DENSE_* thresholds assume native bf16)."""
    try:
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        return torch.backends.mkldnn.is_available() and bool(native)
    except (AttributeError, RuntimeError):  # torch builds without these probes
        return False


def dense_budget_bytes(budget: int | None = None) -> int:
    """Bytes of bf16 copies a fresh engine would keep: `budget` (EngineConfig.cpu_dense_memory; None: its
    default), or 0 without native bf16 GEMMs."""
    from .weight_kernel import DEFAULT_CPU_DENSE_MEMORY

    return (DEFAULT_CPU_DENSE_MEMORY if budget is None else int(budget)) if dense_supported() else 0


def dense_copy(owner: object, g, budget: DenseBudget, dense: bool | None = None) -> torch.Tensor | None:
    """g (a GroupQuant) as bf16 prepacked for oneDNN (an opaque MkldnnCPU tensor), counted against `budget` until
    `owner` is collected; None on CPUs without native bf16 GEMMs, or when `dense` is False, or (None) when the
    budget has no room."""
    nbytes = 2 * g.shape[0] * g.shape[1]
    if dense is None:
        dense = budget.fits(nbytes)
    if not (dense and dense_supported()):
        return None
    budget.take(owner, nbytes)
    return torch.ops.mkldnn._reorder_linear_weight(g.dequantize(torch.float32).bfloat16(), None)


def dense_linear(x: torch.Tensor, dense: torch.Tensor, out_features: int) -> torch.Tensor:
    """x [M, K] bf16 @ a dense_copy -> [M, N] bf16."""
    if torch.compiler.is_compiling():
        return torch.ops.hearthlm.cpu_dense_linear(x, dense, out_features)
    return torch.ops.mkldnn._linear_pointwise(x, dense, None, "none", [], "")


# The dense GEMM as an op torch.compile keeps opaque (models/cpu_compile.py): inductor's own lowering of
# mkldnn._linear_pointwise only takes weights it prepacked itself (freezing), not ours passed in as graph inputs.
# Registered for every backend: its weight is a oneDNN (MkldnnCPU) tensor.
_lib = torch.library.Library("hearthlm", "FRAGMENT")
_lib.define("cpu_dense_linear(Tensor x, Tensor w, int out_features) -> Tensor")
_lib.impl("cpu_dense_linear", lambda x, w, n: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""),
          "CompositeExplicitAutograd")
torch.library.register_fake("hearthlm::cpu_dense_linear", lambda x, w, n: x.new_empty(x.shape[0], n), lib=_lib)
