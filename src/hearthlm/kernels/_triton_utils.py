"""Shared helpers: is Triton usable, and small launch-geometry utilities.

Set HEARTHLM_KERNELS=torch to force the torch references even on CUDA (debugging aid).
"""
from __future__ import annotations

import functools
import os

import torch

try:  # Triton is optional: CPU installs run the torch references.
    import triton
    import triton.language  # noqa: F401

    HAS_TRITON = True
except Exception:  # noqa: BLE001 - ImportError, or a broken install (e.g. no compatible driver/compiler)
    HAS_TRITON = False


def use_triton(t: torch.Tensor) -> bool:
    """Dispatch rule: Triton for CUDA tensors when it imports, else the torch reference."""
    return HAS_TRITON and t.is_cuda and os.environ.get("HEARTHLM_KERNELS", "") != "torch"


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (a fixed guess off-GPU, e.g. under TRITON_INTERPRET)."""
    if device.type != "cuda":
        return 8
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
