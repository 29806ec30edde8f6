"""The weight-kernel protocol, the per-engine settings kernels bind at load time, and the dense kernel.

One class per weight scheme, chosen once when a Linear is built (layers/linear.make_kernel):
  DenseWeight   a float tensor: torch's F.linear, kernels/gemv.py for decode rows on CUDA, the fixed-order
                kernels/invariant_matmul.py under --batch-invariant
  QuantWeight   GGUF blocks or --quantization int8 / int4-g32 codes on CUDA (layers/gpu_quant.py)
  Fp8Weight     --quantization fp8 on CUDA (layers/gpu_quant.py)
  NativeWeight  quantized weights on the native CPU kernel (layers/quant_linear.py)
  Int4Weight    quantized weights on PyTorch's CPU int4 kernel where the native one is not built (quant_linear.py)
  PartsKernel   a fused weight whose parts have different schemes (e.g. Q4_K q/k beside a Q6_K v)
Row-count thresholds: kernels/row_dispatch.py.

Settings (EngineConfig.gemv, kernels, cpu_dense_memory) reach the kernels as a WeightOptions bound around model
construction (`bound`, loader/load.py); a kernel reads it once in its constructor, never per call.
"""
from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..config import EngineConfig
from ..errors import InvalidRequestError
from ..kernels.gemv import gemv, gemv_supported
from ..kernels.invariant_matmul import invariant_linear
from ..kernels.row_dispatch import DENSE_GEMV_MAX_ROWS

DEFAULT_CPU_DENSE_MEMORY: int = EngineConfig.__dataclass_fields__["cpu_dense_memory"].default


class DenseBudget:
    """Bytes of bf16 copies of CPU quantized weights one engine keeps for many-row matmuls
    (EngineConfig.cpu_dense_memory); a copy's bytes return when its weight is collected."""

    def __init__(self, limit: int = DEFAULT_CPU_DENSE_MEMORY):
        self.limit, self.used = int(limit), 0

    def fits(self, nbytes: int) -> bool:
        return self.used + nbytes <= self.limit

    def take(self, owner: object, nbytes: int) -> None:
        """Count nbytes until `owner` is collected."""
        self.used += nbytes
        weakref.finalize(owner, self._release, nbytes)

    def _release(self, nbytes: int) -> None:
        self.used -= nbytes


@dataclass(frozen=True)
class WeightOptions:
    """One engine's weight-kernel settings. gemv: EngineConfig.gemv (auto | a16 | off); kernels: EngineConfig.kernels
    (auto | torch); cpu_dense: the engine's budget of bf16 copies (EngineConfig.cpu_dense_memory)."""
    gemv: str = "auto"
    kernels: str = "auto"
    cpu_dense: DenseBudget = field(default_factory=DenseBudget)

    @property
    def triton(self) -> bool:
        """Triton kernels on CUDA tensors (kernels torch: the torch references)."""
        return self.kernels != "torch"

    @property
    def gemv16(self) -> bool:
        """Decode rows of dense and FP8 CUDA weights on kernels/gemv.py (off: cuBLAS / _scaled_mm for every row)."""
        return self.gemv != "off" and self.triton

    @property
    def gemv_a8(self) -> bool:
        """Decode rows of quantized CUDA weights on the int8-activation GEMV (dp4a: NVIDIA only)."""
        return self.gemv == "auto" and self.triton and torch.version.hip is None

    @classmethod
    def of(cls, config: EngineConfig) -> WeightOptions:
        return cls(config.gemv, config.kernels, DenseBudget(config.cpu_dense_memory))


_DEFAULT = WeightOptions()  # weights built outside an engine (tests, benchmarks): the EngineConfig defaults
_current: ContextVar[WeightOptions] = ContextVar("hearthlm_weight_options", default=_DEFAULT)


def current_options() -> WeightOptions:
    """The options bound by the innermost `bound`, else the defaults."""
    return _current.get()


@contextmanager
def bound(options: WeightOptions) -> Iterator[WeightOptions]:
    """Within it, weight kernels built in this thread take `options` (loader/load.py wraps model construction)."""
    token = _current.set(options)
    try:
        yield options
    finally:
        _current.reset(token)


class WeightKernel:
    """y = x @ W^T (+ bias) for one weight scheme. Subclasses implement `mm` (or override `forward`) and `tensors`.

    forward(x, xa, bias): x [..., K] -> [..., N]; xa: x already quantized for the int8-activation GEMV (QuantWeight
      only, else ignored); bias [N] or None (owned by the Linear: a kernel may be shared, e.g. a tied head).
    forward_native(x, bias): forward, except that a CPU kernel may return its own float dtype (bf16 or float32) for
      callers whose next op upcasts exactly.
    a8_bits(rows, device): code bits of the int8-activation GEMV that would serve `rows` rows, else None.
    set_invariant(on): --batch-invariant (every row count the same per-row arithmetic); schemes without such a
      kernel raise InvalidRequestError."""

    def mm(self, x: torch.Tensor, xa: object = None) -> torch.Tensor:  # x: [M, K] -> [M, N]
        raise NotImplementedError

    def forward(self, x: torch.Tensor, xa: object = None, bias: torch.Tensor | None = None) -> torch.Tensor:
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        y = self.mm(x2, xa)
        y = y if x.dim() == 2 else y.view(*x.shape[:-1], -1)
        return y if bias is None else y + bias

    def forward_native(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward(x, None, bias)

    def a8_bits(self, rows: int, device: torch.device) -> int | None:
        return None

    def set_invariant(self, on: bool) -> None:
        if on:
            raise InvalidRequestError(f"--batch-invariant needs dense weights on CUDA, but a layer holds "
                                      f"{type(self).__name__} weights: drop --quantization (a GGUF file is "
                                      "dequantized to the model dtype under --batch-invariant)",
                                      param="batch_invariant")

    def tensors(self) -> list[torch.Tensor]:
        raise NotImplementedError


class DenseWeight(WeightKernel):
    """A float weight [N, K]. CUDA: kernels/gemv.py for 1..DENSE_GEMV_MAX_ROWS rows (unless gemv off), cuBLAS
    above, so a row's result may depend on its batch's row count; --batch-invariant: kernels/invariant_matmul.py
    for every row count. CPU: F.linear (float32 weights: the HF-exact path, one kernel for every row count)."""

    def __init__(self, weight: torch.Tensor, options: WeightOptions | None = None):
        self.weight = weight
        self.invariant = False
        self.gemv = (options or current_options()).gemv16 and weight.is_cuda

    def forward(self, x: torch.Tensor, xa: object = None, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.invariant:
            return invariant_linear(x, self.weight, bias)
        if self.gemv and gemv_supported(x, self.weight, bias, DENSE_GEMV_MAX_ROWS):
            return gemv(x.view(-1, x.shape[-1]), self.weight, bias).view(*x.shape[:-1], -1)
        return F.linear(x, self.weight, bias)

    def set_invariant(self, on: bool) -> None:
        self.invariant = on

    def tensors(self) -> list[torch.Tensor]:
        return [self.weight]


class PartsKernel(WeightKernel):
    """A fused weight (q/k/v, gate/up) of mixed schemes: one kernel per run of adjacent same-format parts, outputs
    concatenated."""

    def __init__(self, parts: list[WeightKernel]):
        self.parts = parts

    def forward(self, x: torch.Tensor, xa: object = None, bias: torch.Tensor | None = None) -> torch.Tensor:
        y = torch.cat([p.forward(x, xa) for p in self.parts], dim=-1)
        return y if bias is None else y + bias

    def a8_bits(self, rows: int, device: torch.device) -> int | None:
        """The first part's: the producer of x quantizes it for that one."""
        return self.parts[0].a8_bits(rows, device)

    def set_invariant(self, on: bool) -> None:
        for p in self.parts:
            p.set_invariant(on)

    def tensors(self) -> list[torch.Tensor]:
        return [t for p in self.parts for t in p.tensors()]
