"""Benchmark-only variants of kernels/quant_matmul.py's tl.dot kernel (_mmv_kernel's switches), for
`benchmarks/quant_matmul_bench.py --mm-variants`. The product keeps only the variants mm_config picks
(quant_matmul.MM_VARIANTS); `register()` adds these to that table in the benchmark's process."""
from __future__ import annotations

from hearthlm.kernels import quant_matmul as qm

# variant -> switches over qm.MM_VARIANT_BASE (see the comment above _mmv_kernel); 9 is the product's
BENCH_MM_VARIANTS = {
    1: dict(),  # row-major W tiles, per-group scale tiles (prefetched), fp32 dequantization, a dot per plane
    2: dict(MATH=1),  # ... dequantization in x.dtype (bf16x2 math)
    3: dict(MATH=2),  # ... dequantization in x.dtype as inline PTX (the interpreter runs 2)
    4: dict(SWAP=True),  # W as the left dot operand (acc^T = W x^T), fp32 dequantization
    5: dict(SWAP=True, MATH=1),  # ... dequantization in x.dtype
    6: dict(SWAP=True, MATH=2),  # ... dequantization in x.dtype as inline PTX
    7: dict(KCAT=True),  # as 1, planes interleaved back into K order: one contiguous x tile, one dot a step
    8: dict(MATH=2, KCAT=True),  # as 3, one dot a step
    # 9: dict(SWAP=True, MATH=2, KCAT=True), as 6, one dot a step: the product's (quant_matmul.MM_VARIANTS)
    10: dict(MATH=2, RED=True),  # as 3, split-K partials summed by the kernel (no out.sum launches)
    11: dict(MATH=2, KCAT=True, RED=True),  # as 8, split-K summed by the kernel
    12: dict(SWAP=True, MATH=2, KCAT=True, RED=True),  # as 9, split-K summed by the kernel
}


def register() -> dict[int, dict]:
    """Add the benchmark variants to qm.MM_VARIANTS (this process only); returns the full table, sorted."""
    qm.MM_VARIANTS.update(BENCH_MM_VARIANTS)
    table = dict(sorted(qm.MM_VARIANTS.items()))
    qm.MM_VARIANTS.clear()
    qm.MM_VARIANTS.update(table)
    return table
