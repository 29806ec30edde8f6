"""Memory planning: the VRAM geometry of a model, computed before anything is allocated."""
from .advice import Advice, advise
from .memory import (
    DEVICE_PRESETS,
    QUANTS,
    DeviceSpec,
    MemoryPlan,
    WeightBytes,
    activation_bytes,
    device_spec,
    kv_bytes_for_context,
    kv_bytes_per_token,
    kv_scale_bytes_per_token,
    make_plan,
    overhead_bytes,
    weights_bytes,
    weights_bytes_from_tensors,
)
from .presets import PRESETS, preset_config

__all__ = [
    "DEVICE_PRESETS", "PRESETS", "QUANTS", "Advice", "DeviceSpec", "MemoryPlan", "WeightBytes", "activation_bytes",
    "advise", "device_spec", "kv_bytes_for_context", "kv_bytes_per_token", "kv_scale_bytes_per_token", "make_plan",
    "overhead_bytes", "preset_config", "weights_bytes", "weights_bytes_from_tensors",
]
