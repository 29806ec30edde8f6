"""Attention backends, one object per engine side, chosen once when the runner is built:

- TritonBackend (triton.py): CUDA kernels, the device side unless EngineConfig.kernels is "torch"; supports graphs.
- NativeBackend (native.py): the native CPU kernel, for float32 models on the CPU with plain float32 pools and
  native weights (the CPU device, or the offloaded blocks of --gpu-layers).
- TorchBackend (torch_ref.py): the torch reference, anything else.

Each builds its own metadata from the step's StepInputs (runtime/step_inputs.py), plans included, before the
model runs; the layers call `meta.attend` through layers/attention.paged_attention."""
from __future__ import annotations

import torch

from ...kernels.kv_quant import KVPool
from ...layers.attention import uses_bags
from .native import NativeBackend
from .torch_ref import RefGroup, TorchBackend, TorchMetadata
from .triton import KernelGroup, TritonBackend, TritonMetadata

AttentionBackend = TritonBackend | NativeBackend | TorchBackend
AttentionMetadata = TritonMetadata | TorchMetadata


def make_backend(model, layers: list[int], device: torch.device, pools: list[tuple[KVPool, KVPool]],
                 windows: list[int | None], layer_group: list[int], triton: bool, on_host: bool = False
                 ) -> AttentionBackend:
    """The backend of the side that runs `layers` of `model` on `device` over `pools` (one per layer of the side);
    triton: this side takes the Triton kernels; on_host: the offloaded blocks' side (--gpu-layers)."""
    cfg = model.cfg
    rotary = model.host_rotary if on_host else model.rotary
    if triton:
        return TritonBackend(device, windows, layer_group, model.batch_invariant, model.cos_sin, rotary, model.dtype)
    native = [i for i in layers if model.layers[i].native] if model.dtype == torch.float32 else []
    plain = all(isinstance(p, torch.Tensor) and p.dtype == torch.float32 for kv in pools for p in kv)
    if native and plain and device.type == "cpu":
        lib = model.layers[native[0]].qkv.native.lib
        return NativeBackend(device, windows, layer_group, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, rotary,
                             cfg.attn_scale, cfg.attn_logit_softcapping, lib,
                             {layer_group[i] for i in layers if i not in native})
    return TorchBackend(device, windows, layer_group, cfg.num_heads, cfg.num_kv_heads, model.dtype, rotary,
                        bool(pools) and uses_bags(model.dtype, pools[0][1]))


__all__ = ["AttentionBackend", "AttentionMetadata", "KernelGroup", "NativeBackend", "RefGroup", "TorchBackend",
           "TorchMetadata", "TritonBackend", "TritonMetadata", "make_backend"]
