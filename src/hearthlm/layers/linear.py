"""Linear layer holding (possibly fused) weights; the single place quantized matmuls plug in.

A weight is a dense tensor or a GroupQuant (GGUF blocks or --quantization int8/int4 codes kept quantized).
On CPU a GroupQuant is packed for the native kernel or PyTorch's CPU int4 kernel (layers/quant_linear.py;
many-row calls use a dense bf16 copy when the process budget allows) or, lacking a layout, dequantized to its
dtype; on CUDA it becomes a QuantWeight for the Triton kernels (layers/gpu_quant.py).
An Fp8Weight (--quantization fp8) or a QuantWeight may also be passed as is.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels.gemv import USE_GEMV, gemv, gemv_supported
from ..kernels.invariant_matmul import invariant_linear
from ..kernels.quant_gemv_a8 import QuantizedX
from .gpu_quant import Fp8Weight, QuantWeight
from .quant_linear import GroupQuant, Int4Weight, NativeWeight, pack

Weight = torch.Tensor | GroupQuant | QuantWeight | Fp8Weight

GEMV_MAX_M = 2  # dense CUDA weights: up to this many rows kernels.gemv runs instead of cuBLAS (faster on H100 to M=2)


def _same_format(a: Weight, b: Weight) -> bool:
    """Whether Linear.fused can concatenate a and b into one weight."""
    if type(a) is not type(b):
        return False
    if isinstance(a, (GroupQuant, QuantWeight)):
        return (a.bits, a.group) == (b.bits, b.group) and \
            (not isinstance(a, GroupQuant) or a.code_dtype == b.code_dtype)
    return True


class Linear:
    def __init__(self, weight: Weight, bias: torch.Tensor | None = None):
        """weight: [out_features, in_features]. The kernel may depend on the row count, so a sequence's output can
        depend on what it is batched with (within the kernels' rounding): a CPU packed weight runs the int4 kernel
        for a few rows and, when it keeps a dense bf16 copy, oneDNN's bf16 GEMM for more (Int4Weight); on CUDA
        QuantWeight, Fp8Weight and cuBLAS for dense weights switch kernels by row count too. Dense float32 weights
        on CPU (the HF-exact path) run one kernel for every row count."""
        self.packed: NativeWeight | Int4Weight | QuantWeight | Fp8Weight | None = None
        if isinstance(weight, GroupQuant) and weight.device.type == "cuda":  # (GGUF codes stay undecoded on CPU)
            weight = QuantWeight.from_group(weight)
        if isinstance(weight, (QuantWeight, Fp8Weight)):
            self.packed, weight = weight, None
        elif isinstance(weight, GroupQuant):
            self.packed = pack(weight)
            weight = weight.dequantize() if self.packed is None else None
        self.weight: torch.Tensor | None = weight
        self.bias = bias
        self.parts: list[Linear] | None = None
        self.invariant = False  # --batch-invariant: dense CUDA weights take kernels.invariant_matmul for every M
        # CPU quantized weight without bias: __call__ goes straight to it (a few us a call at batch 1)
        self._cpu = self.packed if isinstance(self.packed, (NativeWeight, Int4Weight)) and bias is None else None

    @property
    def native(self) -> NativeWeight | None:
        """The native CPU kernel's weight when this layer is one (its fused entry points; self.bias is the
        caller's to add)."""
        return self.packed if isinstance(self.packed, NativeWeight) and self.parts is None else None

    @classmethod
    def fused(cls, weights: list[Weight], biases: list[torch.Tensor | None] | None = None) -> "Linear":
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
        fused = cls(torch.empty(0), bias)
        fused.parts = [cls.fused(r) for r in runs]
        return fused

    def a8_bits(self, rows: int, device: torch.device) -> int | None:
        """Code bits of the int8-activation decode GEMV this layer (its first part) runs for `rows` rows, else
        None: the producer of x may quantize it in its own launch and pass it as xa."""
        first = self.parts[0] if self.parts is not None else self
        return first.packed.a8_bits(rows, device) if isinstance(first.packed, QuantWeight) else None

    def __call__(self, x: torch.Tensor, xa: QuantizedX | None = None) -> torch.Tensor:
        # x: [..., in_features] -> [..., out_features]; xa: x pre-quantized for a QuantWeight's decode GEMV
        if self._cpu is not None and x.dim() == 2:
            return self._cpu(x)
        if self.parts is not None:
            y = torch.cat([p(x, xa) for p in self.parts], dim=-1)
            return y if self.bias is None else y + self.bias
        if self.packed is None:
            if self.invariant:
                return invariant_linear(x, self.weight, self.bias)
            if USE_GEMV and self.weight.is_cuda and gemv_supported(x, self.weight, self.bias, GEMV_MAX_M):
                return gemv(x.view(-1, x.shape[-1]), self.weight, self.bias).view(*x.shape[:-1], -1)
            return F.linear(x, self.weight, self.bias)
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        y = self.packed(x2, xa) if xa is not None and isinstance(self.packed, QuantWeight) else self.packed(x2)
        y = y if x.dim() == 2 else y.view(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias

    def set_invariant(self, on: bool) -> None:
        """--batch-invariant: route dense weights through the fixed-order matmul; a weight kept quantized (or FP8)
        has no such kernel on CUDA and is an InvalidRequestError."""
        for p in self.parts or [self]:
            if on and p.packed is not None and not isinstance(p.packed, (NativeWeight, Int4Weight)):
                from ..errors import InvalidRequestError

                raise InvalidRequestError(f"--batch-invariant needs dense weights on CUDA, but a layer holds "
                                          f"{type(p.packed).__name__} weights: drop --quantization (a GGUF file is "
                                          "dequantized to the model dtype under --batch-invariant)",
                                          param="batch_invariant")
            p.invariant = on

    def native_dtype(self, x: torch.Tensor) -> torch.Tensor:
        """__call__, except that a CPU int4 weight's result stays in its kernels' bf16: for callers that only add it
        to (or multiply it by) a float32 tensor, whose type promotion upcasts exactly, one op fewer per call."""
        if self._cpu is not None and x.dim() == 2:
            return self._cpu(x, cast=False)
        return self(x)

    def tensors(self) -> list[torch.Tensor]:
        if self.parts is not None:
            return [t for p in self.parts for t in p.tensors()] + ([self.bias] if self.bias is not None else [])
        ts = [self.weight] if self.packed is None else self.packed.tensors()
        return ts + ([self.bias] if self.bias is not None else [])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())
