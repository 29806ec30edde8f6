"""Shared helpers: is Triton usable (imported only where a CUDA device or TRITON_INTERPRET=1 can use it), and small
launch-geometry utilities.

EngineConfig.kernels="torch" (--kernels torch) makes the runner pick the torch attention backend and layer path.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch


def interpreting() -> bool:
    """TRITON_INTERPRET=1: Triton runs kernels on CPU tensors (tests). The one read of this tool's variable."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _triton_wanted() -> bool:
    """Whether a Triton kernel can run in this process: triton installed, and a CUDA (or ROCm) device to run it on
    or TRITON_INTERPRET=1 (the interpreter runs kernels on CPU tensors, for tests). A CPU-only process never
    imports triton (a noticeable part of start-up, plus the @triton.jit definitions of every kernel module)."""
    if importlib.util.find_spec("triton") is None:
        return False
    return interpreting() or torch.cuda.is_available()


HAS_TRITON = False
if _triton_wanted():  # the kernel modules define their @triton.jit functions under `if HAS_TRITON:`
    try:  # Triton is optional: CPU installs run the torch references.
        import triton
        import triton.language  # noqa: F401

        HAS_TRITON = True
    except Exception:  # noqa: BLE001 - ImportError, or a broken install (e.g. no compatible driver/compiler)
        HAS_TRITON = False


def use_triton(t: torch.Tensor) -> bool:
    """Dispatch rule: Triton for CUDA tensors when it imports, else the torch reference."""
    return HAS_TRITON and t.is_cuda


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
