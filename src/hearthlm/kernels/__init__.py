"""GPU kernels (Triton) with a torch reference each; public names dispatch on the tensors' device.

Triton runs when the inputs are CUDA tensors and triton imports; otherwise the `*_ref` version runs
(CPU is a first-class target). EngineConfig.kernels="torch" (--kernels torch) runs the references everywhere.
"""
from ._triton_utils import HAS_TRITON
from .activation import gelu_tanh_and_mul, silu_and_mul, silu_and_mul_a8
from .cache_write import reshape_and_cache
from .paged_attention import paged_decode_attention
from .prefill_attention import paged_prefill_attention
from .rmsnorm import rms_norm, rms_norm_a8
from .rope import apply_rope_, build_cos_sin_cache, can_fuse_kv_write, rope_inv_freq

__all__ = [
    "HAS_TRITON",
    "apply_rope_",
    "build_cos_sin_cache",
    "can_fuse_kv_write",
    "gelu_tanh_and_mul",
    "paged_decode_attention",
    "paged_prefill_attention",
    "reshape_and_cache",
    "rms_norm",
    "rms_norm_a8",
    "rope_inv_freq",
    "silu_and_mul",
    "silu_and_mul_a8",
]
