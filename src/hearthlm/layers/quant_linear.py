"""Weights kept quantized on CPU: a GroupQuant (quant/group_quant.py) repacked at load for the native kernel
(kernels/cpu_quant.py) or, where it is not built, for the CPU kernels PyTorch ships.

  NativeWeight  the native kernel's tiles (groups of 32, 4/5/8-bit codes, N % 16 == 0): int8 activations with a
                residual pass for every row count (a row's result never depends on its batch), fused norm /
                activation / residual entry points (LlamaLayer.native_call)
  Int4Weight    aten._weight_int4pack_mm_for_cpu (bf16 activations, groups of 32): exact for 4-bit codes up to
                bf16 rounding of scale and zero (torch's w = (code - 8) * scale + zero, zero = min + 8 * scale)
                5- and 8-bit codes run as two 4-bit halves along K (2x the work), also exact up to bf16 scales.
                The int4 kernel re-dequantizes its weights for every 4 rows, so from CPU_DENSE_MIN_ROWS rows on
                (kernels/row_dispatch.py; batched decode, prefill) a bf16 copy prepacked for oneDNN runs instead
                on CPUs with native bf16 (layers/cpu_dense.py), within the engine's cpu_dense_memory budget.
Both implement layers/weight_kernel.WeightKernel; `pack` picks one.
"""
from __future__ import annotations

import numpy as np
import torch

from ..kernels import cpu_quant
from ..kernels.row_dispatch import CPU_DENSE_MIN_ROWS, CPU_DENSE_MIN_ROWS_SPLIT
from ..quant.group_quant import GroupQuant
from .cpu_dense import dense_budget_bytes, dense_copy, dense_linear, dense_supported
from .weight_kernel import WeightKernel, current_options

# names of the modules this file was split into (issue 17), kept for callers of the old ones
from ..loader.gguf_unpack import GPU_QUANT_TYPES, QUANT_TYPES, unpack_gguf  # noqa: E402,F401
from ..quant.weight_quant import quantize_int4, quantize_int8  # noqa: E402,F401

DENSE_MIN_ROWS, DENSE_MIN_ROWS_SPLIT = CPU_DENSE_MIN_ROWS, CPU_DENSE_MIN_ROWS_SPLIT  # old names

__all__ = ["GroupQuant", "Int4Weight", "NativeWeight", "dense_budget_bytes", "dense_supported", "pack"]


class Int4Weight(WeightKernel):
    """4-bit codes, groups of 32, for aten._weight_int4pack_mm_for_cpu (needs N % 16 == 0, bf16 x).
    5/8-bit codes run as two 4-bit halves (GroupQuant.nibble_split): twice the K, x fed twice.
    dense: also keep the weights as bf16 prepacked for oneDNN, used from `dense_min_rows` rows on (None: if the
    engine's cpu_dense_memory budget has room). A row's result then depends on the row count of its call
    (int4 below the threshold, bf16 weights above), both within bf16 rounding of the dequantized weights."""

    def __init__(self, g: GroupQuant, dense: bool | None = None):
        self.split = g.bits > 4
        self.out_features, self.in_features = g.shape[0], g.shape[1]
        self.dense = dense_copy(self, g, current_options().cpu_dense, dense)
        self.dense_min_rows = CPU_DENSE_MIN_ROWS_SPLIT if self.split else CPU_DENSE_MIN_ROWS
        if self.split:
            g = g.nibble_split()
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(g.codes.to(torch.int32), 2)
        # [K/32, N, 2]: scale, zero with w = (code - 8) * scale + zero
        self.scale_zeros = torch.stack([g.scale, g.min + 8 * g.scale], -1).transpose(0, 1).contiguous().bfloat16()

    @staticmethod
    def supports(g: GroupQuant) -> bool:
        return g.bits <= 8 and g.group == 32 and g.shape[0] % 16 == 0

    def __call__(self, x: torch.Tensor, cast: bool = True) -> torch.Tensor:
        # x: [M, K] -> [M, N] in x.dtype (cast=False: in the kernels' bf16)
        xb = x.to(torch.bfloat16)
        if self.dense is not None and x.shape[0] >= self.dense_min_rows:
            y = dense_linear(xb, self.dense, self.out_features)
        else:
            if self.split:
                xb = torch.cat([xb, xb], 1)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, self.packed, 32, self.scale_zeros)
        return y.to(x.dtype) if cast else y

    def mm(self, x: torch.Tensor, xa: object = None) -> torch.Tensor:
        return self(x)

    # forward and forward_native inline __call__ (CPU decode is Python-overhead bound: no extra frame a call)
    def forward(self, x: torch.Tensor, xa: object = None, bias: torch.Tensor | None = None) -> torch.Tensor:
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        xb = x2.to(torch.bfloat16)
        if self.dense is not None and x2.shape[0] >= self.dense_min_rows:
            y = dense_linear(xb, self.dense, self.out_features)
        else:
            if self.split:
                xb = torch.cat([xb, xb], 1)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, self.packed, 32, self.scale_zeros)
        y = y.to(x.dtype)
        y = y if x.dim() == 2 else y.view(*x.shape[:-1], -1)
        return y if bias is None else y + bias

    def forward_native(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The kernels' bf16 result (no cast back to x.dtype) when there is no bias to add."""
        if bias is not None or x.dim() != 2:
            return self.forward(x, None, bias)
        xb = x.to(torch.bfloat16)
        if self.dense is not None and x.shape[0] >= self.dense_min_rows:
            return dense_linear(xb, self.dense, self.out_features)
        if self.split:
            xb = torch.cat([xb, xb], 1)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(xb, self.packed, 32, self.scale_zeros)

    def set_invariant(self, on: bool) -> None:
        """A CPU weight: --batch-invariant concerns CUDA (the engine applies it there only)."""

    def tensors(self) -> list[torch.Tensor]:
        """The int4 layout (the dense copy is an opaque oneDNN tensor without storage: see dense_nbytes)."""
        return [self.packed, self.scale_zeros]

    @property
    def dense_nbytes(self) -> int:
        return 0 if self.dense is None else 2 * self.out_features * self.in_features


class NativeWeight(WeightKernel):
    """A GroupQuant (groups of 32, 4/5/8-bit codes) for the native CPU kernel (kernels/cpu_quant.py: int8
    activations, u8 x s8 dot products), 4-bit codes two a byte, else a byte each, fp16 scale and min. Every call
    takes the kernel's residual pass (x to within 1/256 of a step): one scheme for every row count, so that a
    row's result depends on that row alone (no row-count switch to another kernel either)."""

    def __init__(self, g: GroupQuant):
        self.out_features, self.in_features = g.shape
        self.bits = 4 if g.bits == 4 else 8  # cpu_quant.pack's layout, made without decoding GGUF codes
        cache = g.packed_cache if g.name else None
        saved = cache.get(g.name, g.shape, self.bits) if cache is not None else None
        if saved is not None:
            self.codes, self.scale, self.mins = saved
        else:
            s16, m16, _, _ = g.fp16_scales
            self.codes = torch.from_numpy(g.native_codes())
            self.scale, self.mins = cpu_quant.tile_scales(s16), cpu_quant.tile_scales(m16)
            if cache is not None:
                cache.put(g.name, self.codes, self.scale, self.mins)
        self.dense = None  # no bf16 copy: its GEMM's rounding would differ from the kernel's
        self.lib = cpu_quant.library()  # the ISA's build the engine picked (cpu_kernel); attention takes it too
        self._call = self.lib.hl_qmatmul
        self._args = (self.in_features, self.codes.data_ptr(), self.scale.data_ptr(), self.mins.data_ptr(),
                      self.out_features, self.bits)

    @staticmethod
    def supports(g: GroupQuant) -> bool:
        if g.group != cpu_quant.GROUP or g.bits not in (4, 5, 8) or g.shape[1] % cpu_quant.GROUP or \
                g.shape[0] % cpu_quant.TILE:
            return False
        if g.name and g.packed_cache is not None and g.packed_cache.has(g.name):  # checked when it was saved
            return cpu_quant.library() is not None
        # scale and min as fp16 (GGUF's own scales are fp16 already): no overflow, and no precision lost beyond
        # fp16's rounding (float32 scales below its normal range would lose bits). numpy: one thread, a scale per
        # 32 weights (torch's OpenMP loops wait on busy cores)
        if g.device.type != "cpu":
            return False
        h16, hm16, scale, mins = g.fp16_scales
        s16, m16 = h16.astype(np.float32), hm16.astype(np.float32)
        tol = np.float32(2.0 ** -10)
        with np.errstate(over="ignore", invalid="ignore"):
            if not (np.isfinite(s16).all() and np.isfinite(m16).all() and
                    (np.abs(s16 - scale) <= tol * np.abs(scale)).all() and
                    (np.abs(m16 - mins) <= tol * (np.abs(mins) + np.abs(scale))).all()):
                return False
        return cpu_quant.library() is not None

    def __call__(self, x: torch.Tensor, cast: bool = True) -> torch.Tensor:
        # x: [M, K] -> [M, N] in x.dtype (cast=False: float32)
        y = self.run(x if x.dtype == torch.float32 and x.stride(-1) == 1 else x.float().contiguous())
        return y.to(x.dtype) if cast and x.dtype != torch.float32 else y

    def mm(self, x: torch.Tensor, xa: object = None) -> torch.Tensor:
        return self(x)

    # forward and forward_native inline __call__ (CPU decode is Python-overhead bound: no extra frame a call)
    def forward(self, x: torch.Tensor, xa: object = None, bias: torch.Tensor | None = None) -> torch.Tensor:
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        y = self.run(x2 if x2.dtype == torch.float32 and x2.stride(-1) == 1 else x2.float().contiguous())
        if x.dtype != torch.float32:
            y = y.to(x.dtype)
        y = y if x.dim() == 2 else y.view(*x.shape[:-1], -1)
        return y if bias is None else y + bias

    def forward_native(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The kernel's float32 result (no cast back to x.dtype) when there is no bias to add."""
        if bias is not None or x.dim() != 2:
            return self.forward(x, None, bias)
        return self.run(x if x.dtype == torch.float32 and x.stride(-1) == 1 else x.float().contiguous())

    def set_invariant(self, on: bool) -> None:
        """One scheme for every row count already (the CPU default path is invariant)."""

    def run(self, x: torch.Tensor, out: torch.Tensor | None = None, accumulate: bool = False,
            norm: tuple[torch.Tensor, float] | None = None, silu_mul: bool = False,
            residual: bool = True) -> torch.Tensor:
        """out (+)= f(x) @ W^T, float32 (kernels/cpu_quant.qmatmul: f = RMSNorm with norm = (weight, eps), or
        SiLU(x[:, :K]) * x[:, K:] with silu_mul, else x). x: float32, unit column stride. residual: x's int8
        rounding residuals in a second pass (near float32 results); False only for tests and benchmarks."""
        m = x.shape[0]
        if out is None:
            out = torch.empty(m, self.out_features, dtype=torch.float32)
        if m:
            pre, w, eps = cpu_quant.input_function(norm, silu_mul)
            if self._call(x.data_ptr(), m, x.stride(0), *self._args, out.data_ptr(), out.stride(0), pre, w, eps,
                          accumulate, residual):
                raise MemoryError("native CPU matmul: out of memory for the quantized activations")
        return out

    def tensors(self) -> list[torch.Tensor]:
        return [self.codes, self.scale, self.mins]

    @property
    def dense_nbytes(self) -> int:
        return 0


def pack(g: GroupQuant) -> NativeWeight | Int4Weight | None:
    """The CPU kernel layout for g: the native kernel's (kernels/cpu_quant.py) where it is built, else PyTorch's int4
    kernel's; None: the caller dequantizes."""
    if NativeWeight.supports(g):
        return NativeWeight(g)
    return Int4Weight(g) if Int4Weight.supports(g) else None
