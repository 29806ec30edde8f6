"""Row-count dispatch of the weight kernels: the one table of thresholds (issue 17).

A matmul y = x @ W^T may pick its kernel by M, the rows of x (decode steps have a few, prefill chunks many). Each
name says which weight scheme and which regime it bounds; MAX: the last row count of the regime, MIN: the first.
The values are the crossovers measured in BENCHMARKS.md (re-measure there when a kernel changes, not here).
Kernel capacities (rows one program's accumulators hold) stay in the kernel modules and bound these from above.
"""
from __future__ import annotations

# CUDA, dense 16-bit weights (layers/linear.DenseWeight): kernels/gemv.py's GEMV for 1..DENSE_GEMV_MAX_ROWS rows,
# cuBLAS above
DENSE_GEMV_MAX_ROWS = 2

# CUDA, FP8 weights (layers/gpu_quant.Fp8Weight): the W8A16 GEMV (kernels/gemv.py) for 1..FP8_GEMV_MAX_ROWS rows,
# activations scaled per token for torch._scaled_mm above
FP8_GEMV_MAX_ROWS = 4

# CUDA, group-quantized weights (layers/gpu_quant.QuantWeight, kernels/quant_matmul.py): the 16-bit-activation
# GEMV for 1..QUANT_GEMV_MAX_ROWS rows, the tl.dot kernel up to QUANT_MM_MAX_ROWS, above that W dequantized once
# for a dense matmul (prefill, where that pass is amortized)
QUANT_GEMV_MAX_ROWS = 4
QUANT_MM_MAX_ROWS = 128

# CUDA, group-quantized weights with int8 activations (kernels/quant_gemv_a8.py; EngineConfig.gemv auto, taking
# precedence over the two above): up to its kernel's rows per program, and whole groups of those up to
# A8_GEMV_MAX_ROWS
A8_GEMV_MAX_ROWS = 8

# CPU, Int4Weight with a bf16 copy (layers/quant_linear.py): PyTorch's int4 kernel below CPU_DENSE_MIN_ROWS rows,
# oneDNN's bf16 GEMM from there; 5/8-bit codes (two 4-bit halves, twice the int4 work) from CPU_DENSE_MIN_ROWS_SPLIT.
# Only on CPUs with native bf16 GEMMs (elsewhere no copy is made). The native kernel (NativeWeight) has one regime.
CPU_DENSE_MIN_ROWS = 5
CPU_DENSE_MIN_ROWS_SPLIT = 3
