"""GGUF files: metadata -> ModelConfig, tensors dequantized (vectorised) and renamed to HF names."""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..config import ModelConfig
from ..errors import ModelLoadError, UnsupportedModelError
from .gguf_header import GGUFFile
from .gguf_dequant import IQ_TYPES, nearest_supported
from .hf_config import config_from_gguf_metadata

if TYPE_CHECKING:
    from ..quant.group_quant import GroupQuant

SUPPORTED_TYPES = {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K",
                   "Q5_K", "Q6_K"} | IQ_TYPES  # IQ types: dequantized (loader/gguf_dequant.py)

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_GEMMA2_LAYER_NAMES = dict(_LAYER_NAMES, post_attention_norm="post_attention_layernorm",
                           ffn_norm="pre_feedforward_layernorm", post_ffw_norm="post_feedforward_layernorm")
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# mixture of experts: the router, and 3-D tensors [experts, ...] holding every expert's matrix
_MOE_NAMES = {"ffn_gate_inp": "mlp.gate"}
_EXPERT_NAMES = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}
_BLK = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


# The last header parsed, kept for the next GGUFWeights of the same file: the engine's memory plan
# (plan/sources.read_gguf) and then the loader read the same header, each a noticeable part of a small model's start.
# The loader takes it out (take=True), so that a loaded model does not keep a second copy alive.
_last: tuple[tuple[str, int, int], GGUFFile] | None = None


def _file_key(path: Path) -> tuple[str, int, int]:
    st = Path(path).stat()
    return str(Path(path).resolve()), st.st_size, st.st_mtime_ns


def _parsed(path: Path, take: bool) -> GGUFFile:
    global _last
    try:
        key = _file_key(path)
    except OSError:
        return GGUFFile(path)  # GGUFFile says what is wrong with it
    f = _last[1] if _last is not None and _last[0] == key else GGUFFile(path)
    _last = None if take else (key, f)
    return f


class GGUFWeights:
    def __init__(self, path: Path, take: bool = False):
        """take: the loader's read (the header a plan just parsed is reused, then dropped); else it is kept for
        the next GGUFWeights of this file."""
        import gguf

        self.path = path
        self.file = _parsed(path, take)
        self.packed_cache = None  # a PackCache (loader/pack_cache.py): get_quantized's weights use it when packed
        self.metadata = dict(self.file.metadata)
        self.tensors = self.file.tensors
        self.metadata["_has_output_weight"] = "output.weight" in self.tensors
        self.arch = str(self.metadata.get("general.architecture"))
        for t in self.tensors.values():
            type_name = gguf.GGMLQuantizationType(t.ggml_type).name
            if type_name not in SUPPORTED_TYPES:
                raise UnsupportedModelError(f"{path.name}: tensor {t.name} uses {type_name}, which is not "
                                            f"supported (supported: {', '.join(sorted(SUPPORTED_TYPES))}): the "
                                            f"nearest supported type is {nearest_supported(type_name)}")
        layer_names = _GEMMA2_LAYER_NAMES if self.arch in ("gemma2", "gemma3") else _LAYER_NAMES
        self.name_map: dict[str, str] = {}
        self.expert_map: dict[str, tuple[str, int]] = {}  # HF per-expert name -> (3-D tensor, expert)
        self._experts: dict[str, torch.Tensor] = {}  # the decoded 3-D tensors of the layer being read
        for name in self.tensors:
            m = _BLK.match(name)
            if m and m.group(2) in layer_names:
                self.name_map[f"model.layers.{m.group(1)}.{layer_names[m.group(2)]}.{m.group(3)}"] = name
            elif m and m.group(2) in _MOE_NAMES:
                self.name_map[f"model.layers.{m.group(1)}.{_MOE_NAMES[m.group(2)]}.{m.group(3)}"] = name
            elif m and m.group(2) in _EXPERT_NAMES:
                for e in range(self.tensors[name].shape[0]):
                    hf = f"model.layers.{m.group(1)}.mlp.experts.{e}.{_EXPERT_NAMES[m.group(2)]}.{m.group(3)}"
                    self.expert_map[hf] = (name, e)
            else:
                base, _, suffix = name.rpartition(".")
                if base in _TOP_NAMES:
                    self.name_map[f"{_TOP_NAMES[base]}.{suffix}"] = name

    @property
    def quantization(self) -> str:
        import gguf

        return "/".join(sorted({gguf.GGMLQuantizationType(t.ggml_type).name for t in self.tensors.values()
                                if len(t.shape) > 1}))

    def config(self, name: str = "") -> ModelConfig:
        cfg = config_from_gguf_metadata(self.metadata, name=name or self.path.stem)
        if cfg.num_experts:  # MoE blocks have a router; the others (Qwen3-MoE's mlp_only_layers) are dense
            cfg.dense_layers = [i for i in range(cfg.num_layers)
                                if f"blk.{i}.ffn_gate_inp.weight" not in self.tensors]
        return cfg

    def dequantize(self, gguf_name: str) -> torch.Tensor:
        import gguf

        t = self.tensors[gguf_name]
        shape = t.shape
        try:
            arr = gguf.quants.dequantize(self.file.raw(gguf_name), gguf.GGMLQuantizationType(t.ggml_type))
        except Exception as e:
            raise ModelLoadError(f"{self.path}: tensor {gguf_name} cannot be decoded ({e}); the file is corrupt") from None
        arr = np.ascontiguousarray(arr, dtype=np.float32).reshape(shape)
        with warnings.catch_warnings():  # F32 tensors stay read-only views of the mmap'd file
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(arr)

    def freq_factors(self) -> torch.Tensor | None:
        return self.dequantize("rope_freqs.weight") if "rope_freqs.weight" in self.tensors else None

    def get(self, hf_name: str, cfg: ModelConfig) -> torch.Tensor | None:
        if hf_name in self.expert_map:
            return self._expert(*self.expert_map[hf_name])
        name = self.name_map.get(hf_name)
        if name is None:
            return None
        # 2-D quantized weights: torch's decode (get_dense), the same bits as gguf's numpy decode in a fraction of
        # its time; the rest: gguf's
        w = self.get_dense(hf_name, cfg, torch.float32, torch.device("cpu"))
        if w is None:
            w = self.dequantize(name)
            if self.arch == "llama" and (hf_name.endswith("q_proj.weight") or hf_name.endswith("k_proj.weight")):
                w = w[self._qk_rows(hf_name, w.shape[0], cfg)]
        if self.arch in ("gemma2", "gemma3") and hf_name.endswith("norm.weight"):
            w = w - 1.0  # llama.cpp stores Gemma's (1 + w); the model adds the 1 itself
        return w

    def _expert(self, name: str, e: int) -> torch.Tensor:
        """Expert e's matrix of a 3-D expert tensor, decoded whole once while its layer is read."""
        if name not in self._experts:
            layer = name.split(".")[1]
            self._experts = {k: v for k, v in self._experts.items() if k.split(".")[1] == layer}
            self._experts[name] = self.dequantize(name)
        return self._experts[name][e]

    def _qk_rows(self, hf_name: str, rows: int, cfg: ModelConfig) -> torch.Tensor:
        """llama.cpp permutes q/k rows for its interleaved rope; this row order undoes it (HF rotate_half)."""
        heads = cfg.num_heads if "q_proj" in hf_name else cfg.num_kv_heads
        return torch.arange(rows).reshape(heads, rows // heads // 2, 2).transpose(1, 2).reshape(-1)

    def get_dense(self, hf_name: str, cfg: ModelConfig, dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor | None:
        """A 2-D quantized weight dequantized to `dtype` on `device` (loader/gguf_dequant.py: the blocks copied
        there as bytes and decoded by torch ops), bit-identical to gguf's decode (dequantize(n)) cast to dtype;
        None for other tensors and types (use get())."""
        import gguf

        from .gguf_dequant import BLOCKS, dequantize

        name = self.name_map.get(hf_name)
        t = self.tensors.get(name) if name else None
        kind = gguf.GGMLQuantizationType(t.ggml_type).name if t is not None else None
        if kind not in BLOCKS or len(t.shape) != 2:
            return None
        with warnings.catch_warnings():  # read-only mapped bytes: only copied from
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.from_numpy(np.asarray(self.file.raw(name)))
        if self.arch == "llama" and (hf_name.endswith("q_proj.weight") or hf_name.endswith("k_proj.weight")):
            raw = raw[self._qk_rows(hf_name, raw.shape[0], cfg)]  # rows are whole blocks: permute bytes
        return dequantize(raw.to(device), kind, tuple(t.shape), dtype)

    # ---- weights kept quantized (unpacking: loader/gguf_unpack.py; kernels: layers/quant_linear.py on CPU,
    # layers/gpu_quant.py on CUDA) ----
    def get_quantized(self, hf_name: str, cfg: ModelConfig, dtype: torch.dtype,
                      gpu: bool = False) -> "GroupQuant | None":
        """A 2-D weight in a type with a fast CPU path (gpu=True: a GPU kernel path, which adds Q6_K) as
        GroupQuant (else None: use get())."""
        import gguf

        from .gguf_unpack import GPU_QUANT_TYPES, QUANT_TYPES, unpack_gguf

        if hf_name in self.expert_map:  # one expert of a 3-D expert tensor: kept quantized for the CPU only
            name, e = self.expert_map[hf_name]
            t = self.tensors[name]
            kind = gguf.GGMLQuantizationType(t.ggml_type).name
            if gpu or kind not in QUANT_TYPES:  # CUDA: dense experts for kernels/fused_moe.py
                return None
            rows = t.shape[1]
            g = unpack_gguf(self.file.raw(name)[e * rows:(e + 1) * rows], kind, tuple(t.shape[1:]))
            g.dtype = dtype
            g.name, g.packed_cache = hf_name, self.packed_cache
            return g
        name = self.name_map.get(hf_name)
        t = self.tensors.get(name) if name else None
        types = GPU_QUANT_TYPES if gpu else QUANT_TYPES
        if t is None or len(t.shape) != 2 or gguf.GGMLQuantizationType(t.ggml_type).name not in types:
            return None
        raw = self.file.raw(name)
        if self.arch == "llama" and (hf_name.endswith("q_proj.weight") or hf_name.endswith("k_proj.weight")):
            raw = raw[self._qk_rows(hf_name, raw.shape[0], cfg).numpy()]  # rows are whole blocks: permute bytes
        g = unpack_gguf(raw, gguf.GGMLQuantizationType(t.ggml_type).name, tuple(t.shape))
        g.dtype = dtype
        g.name, g.packed_cache = hf_name, self.packed_cache
        return g
