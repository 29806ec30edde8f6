"""Quantization targets (`--to`), the per-tensor type mix, and array -> GGUF bytes.

Mix (after llama.cpp's `llama_tensor_get_type`):
  - 1-D tensors, norms and rope_freqs: F32.
  - output.weight (or token_embd.weight when the embeddings are tied, i.e. there is no output.weight): Q6_K for
    every quantized target except q8_0 (kept Q8_0).
  - q4_k_m / q5_k_m: attn_v and ffn_down of layers where `use_more_bits` holds (the first and last eighth of
    the layers and every third layer between) are Q6_K; everything else Q4_K / Q5_K.
  - q6_k: everything Q6_K; the legacy targets (q4_0 ... q8_0): everything of that type.
  - Rows that do not split into 256-value super-blocks fall back like llama.cpp: Q4_K -> Q5_0, Q5_K -> Q5_1,
    Q6_K -> Q8_0; rows that do not split into 32-value blocks are stored F16.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .kquants import BLOCK_BYTES, QK_K, quantize_k


@dataclass(frozen=True)
class Target:
    name: str  # what --to accepts
    base: str  # GGML type of most matrices
    file_type: str  # gguf.LlamaFileType member
    mix: bool = False  # the *_K_M mix (Q6_K for half of attn_v / ffn_down)


TARGETS = {t.name: t for t in [
    Target("f32", "F32", "ALL_F32"), Target("f16", "F16", "MOSTLY_F16"),
    Target("q8_0", "Q8_0", "MOSTLY_Q8_0"), Target("q4_0", "Q4_0", "MOSTLY_Q4_0"),
    Target("q4_1", "Q4_1", "MOSTLY_Q4_1"), Target("q5_0", "Q5_0", "MOSTLY_Q5_0"),
    Target("q5_1", "Q5_1", "MOSTLY_Q5_1"), Target("q4_k_m", "Q4_K", "MOSTLY_Q4_K_M", mix=True),
    Target("q5_k_m", "Q5_K", "MOSTLY_Q5_K_M", mix=True), Target("q6_k", "Q6_K", "MOSTLY_Q6_K"),
]}
_K_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
_LAYER = re.compile(r"^blk\.(\d+)\.")


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def tensor_type(name: str, shape: tuple[int, ...], target: Target, n_layers: int, tied: bool) -> str:
    """GGML type name for tensor `name` of `shape` (rows first) under `target`."""
    return tensor_type_why(name, shape, target, n_layers, tied)[0]


def tensor_type_why(name: str, shape: tuple[int, ...], target: Target, n_layers: int,
                    tied: bool) -> tuple[str, str]:
    """(GGML type, why that type) for tensor `name` of `shape` under `target` -- `hearth quantize`'s breakdown."""
    if len(shape) < 2 or name.endswith("norm.weight") or name.startswith("rope_freqs"):
        return "F32", "norms and 1-D tensors stay F32 (tiny)"
    t = target.base
    if t in ("F32", "F16"):
        return t, f"the target, {t}"
    why = f"the target's type, {t}"
    if (name == "output.weight" or (tied and name == "token_embd.weight")) and t != "Q8_0":
        t = "Q6_K"
        why = ("the output head (here the tied token embedding) is kept at Q6_K, as llama.cpp does" if tied
               and name == "token_embd.weight" else "the output head is kept at Q6_K, as llama.cpp does")
    elif target.mix and (m := _LAYER.match(name)) and (".attn_v." in name or ".ffn_down." in name):
        if use_more_bits(int(m.group(1)), n_layers):
            t = "Q6_K"
            why = "the _M mix: attn_v and ffn_down of the first and last eighth of the layers and every third layer at Q6_K"
    cols = shape[-1]
    if t in _K_FALLBACK and cols % QK_K:
        why = (f"{why}, but rows of {cols} values do not split into {QK_K}-value super-blocks: "
               f"{t} falls back to {_K_FALLBACK[t]} (llama.cpp's rule)")
        t = _K_FALLBACK[t]
    if cols % 32:
        return "F16", f"rows of {cols} values do not split into 32-value blocks: F16"
    return t, why


def type_nbytes(type_name: str, shape: tuple[int, ...]) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    return int(np.prod(shape)) // block * size


def quantize_array(data: np.ndarray, type_name: str) -> np.ndarray:
    """float array (rows first) -> the bytes/values gguf's writer stores for `type_name`."""
    import gguf

    data = np.ascontiguousarray(data, dtype=np.float32)
    if type_name in BLOCK_BYTES:
        return quantize_k(data, type_name)
    return gguf.quants.quantize(data, gguf.GGMLQuantizationType[type_name])
