"""Linear layer: (possibly fused) weights behind one weight kernel chosen at load time (layers/weight_kernel.py).

A weight handed in is a dense tensor, a GroupQuant (GGUF blocks or --quantization int8 / int4-g32 codes kept
quantized), or a kernel already (QuantWeight, Fp8Weight: the loader builds those on the device). `make_kernel`:
  tensor                      -> DenseWeight
  GroupQuant on CUDA          -> QuantWeight (layers/gpu_quant.py)
  GroupQuant on CPU           -> NativeWeight or Int4Weight (layers/quant_linear.py), else dequantized: DenseWeight
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels.quant_gemv_a8 import QuantizedX
from ..quant.group_quant import GroupQuant
from .gpu_quant import Fp8Weight, QuantWeight
from .quant_linear import NativeWeight, pack
from .weight_kernel import DenseWeight, PartsKernel, WeightKernel

Weight = torch.Tensor | GroupQuant | WeightKernel


def make_kernel(weight: Weight) -> WeightKernel:
    """The kernel of one weight [out_features, in_features] (see the module docstring)."""
    if isinstance(weight, WeightKernel):
        return weight
    if isinstance(weight, GroupQuant):
        if weight.device.type == "cuda":  # (GGUF codes stay undecoded on CPU)
            return QuantWeight.from_group(weight)
        packed = pack(weight)
        return packed if packed is not None else DenseWeight(weight.dequantize())
    return DenseWeight(weight)


def _same_format(a: Weight, b: Weight) -> bool:
    """Whether Linear.fused can concatenate a and b into one weight."""
    if type(a) is not type(b) or not isinstance(a, (torch.Tensor, GroupQuant, QuantWeight, Fp8Weight)):
        return False  # other kernels (e.g. GPTQ act-order's InputPermuted) stay parts of their own
    if isinstance(a, (GroupQuant, QuantWeight)):
        return (a.bits, a.group) == (b.bits, b.group) and \
            (not isinstance(a, GroupQuant) or a.code_dtype == b.code_dtype)
    return True


class Linear:
    def __init__(self, weight: Weight, bias: torch.Tensor | None = None):
        """weight: [out_features, in_features]. The kernel may depend on the row count, so a sequence's output can
        depend on what it is batched with (within the kernels' rounding): Int4Weight, QuantWeight, Fp8Weight and
        DenseWeight on CUDA switch kernels by row count (kernels/row_dispatch.py); NativeWeight and dense float32
        weights on CPU (the HF-exact path) run one kernel for every row count."""
        self.kernel: WeightKernel = make_kernel(weight)
        self.bias = bias
        # the native CPU kernel's weight when this layer is one (its fused entry points; self.bias is the caller's
        # to add), else None
        self.native: NativeWeight | None = self.kernel if isinstance(self.kernel, NativeWeight) else None
        self._plain = self._plain_weight()

    def _plain_weight(self) -> torch.Tensor | None:
        """The weight when the kernel is plain F.linear (DenseWeight without GEMV or invariant kernel: CPU, or
        gemv off): __call__ runs it inline, one Python frame fewer a call (CPU decode is overhead bound)."""
        k = self.kernel
        return k.weight if isinstance(k, DenseWeight) and not (k.gemv or k.invariant) else None

    @classmethod
    def fused(cls, weights: list[Weight], biases: list[torch.Tensor | None] | None = None) -> Linear:
        bias = None
        if biases and all(b is not None for b in biases):
            bias = torch.cat(biases, dim=0)
        if len(weights) == 1:
            return cls(weights[0], bias)
        if all(isinstance(w, torch.Tensor) for w in weights):
            return cls(torch.cat(weights, dim=0), bias)
        if all(isinstance(w, GroupQuant) for w in weights) and len({(w.bits, w.group) for w in weights}) == 1:
            return cls(GroupQuant.cat(weights), bias)
        if all(isinstance(w, QuantWeight) for w in weights) and len({(w.bits, w.group) for w in weights}) == 1:
            return cls(QuantWeight.cat(weights), bias)
        if all(isinstance(w, Fp8Weight) for w in weights):
            return cls(Fp8Weight.cat(weights), bias)
        # mixed formats (e.g. Q4_K q/k with a Q6_K v): one matmul per run of adjacent same-format weights
        runs: list[list[Weight]] = []
        for w in weights:
            if runs and _same_format(runs[-1][-1], w):
                runs[-1].append(w)
            else:
                runs.append([w])
        return cls(PartsKernel([cls.fused(r).kernel for r in runs]), bias)

    def __call__(self, x: torch.Tensor, xa: QuantizedX | None = None) -> torch.Tensor:
        # x: [..., in_features] -> [..., out_features]; xa: x pre-quantized for a QuantWeight's decode GEMV
        if self._plain is not None:
            return F.linear(x, self._plain, self.bias)
        return self.kernel.forward(x, xa, self.bias)

    def native_dtype(self, x: torch.Tensor) -> torch.Tensor:
        """__call__, except that a CPU quantized weight's result stays in its kernel's dtype (bf16 or float32): for
        callers that only add it to (or multiply it by) a float32 tensor, whose type promotion upcasts exactly, one
        op fewer per call."""
        if self._plain is not None:
            return F.linear(x, self._plain, self.bias)
        return self.kernel.forward_native(x, self.bias)

    def a8_bits(self, rows: int, device: torch.device) -> int | None:
        """Code bits of the int8-activation decode GEMV this layer (its first part) runs for `rows` rows, else
        None: the producer of x may quantize it in its own launch and pass it as xa."""
        return self.kernel.a8_bits(rows, device)

    def set_invariant(self, on: bool) -> None:
        """--batch-invariant: dense weights take the fixed-order matmul; a weight kept quantized (or FP8) on CUDA
        has no such kernel and is an InvalidRequestError."""
        self.kernel.set_invariant(on)
        self._plain = self._plain_weight()

    def tensors(self) -> list[torch.Tensor]:
        return self.kernel.tensors() + ([self.bias] if self.bias is not None else [])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    # ---- read-only views for tests and tools (the kernel is the one attribute that decides)
    @property
    def packed(self) -> WeightKernel | None:
        """The kernel when the weight is kept quantized (or is fused from parts), None for a dense weight."""
        return None if isinstance(self.kernel, DenseWeight) else self.kernel

    @property
    def weight(self) -> torch.Tensor | None:
        """The dense weight tensor, None when kept quantized."""
        return self.kernel.weight if isinstance(self.kernel, DenseWeight) else None

    @property
    def parts(self) -> list[WeightKernel] | None:
        return self.kernel.parts if isinstance(self.kernel, PartsKernel) else None
