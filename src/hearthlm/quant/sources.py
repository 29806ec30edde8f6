"""Where `hearth quantize` reads a model: tensors under llama.cpp names (in llama.cpp's layout) + metadata.

HF directory: config.json -> architecture keys, tokenizer.json -> tokenizer keys, safetensors -> tensors renamed
(the inverse of loader.gguf's name map), Llama/Mistral q/k rows permuted like convert_hf_to_gguf.py, Gemma-2
norms stored as (1 + w), Llama-3.1 RoPE scaling as a `rope_freqs` tensor.
GGUF file: every key copied with its type (except file type), tensors dequantized to float32 as stored.
"""
from __future__ import annotations

import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ModelConfig
from ..errors import UnsupportedModelError
from ..loader.gguf import _GEMMA2_LAYER_NAMES, _LAYER_NAMES, _TOP_NAMES
from ..loader.gguf_header import _NUMPY, _SCALARS, ARRAY, STRING, GGUFFile
from ..loader.safetensors import SafetensorsWeights, read_hf_config

GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2"}
# GGUF files re-quantized with their metadata copied as is (no conversion from HF names needed)
GGUF_REQUANT_ARCHS = set(GGUF_ARCH.values()) | {"gemma3"}
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_SKIP_KEYS = {"general.architecture", "general.file_type", "general.quantization_version", "general.alignment"}


@dataclass
class SourceTensor:
    name: str  # llama.cpp name
    shape: tuple[int, ...]  # rows first
    load: Callable[[], np.ndarray]  # float32, llama.cpp layout


class HFSource:
    def __init__(self, model_dir: Path):
        self.dir = model_dir
        self.cfg: ModelConfig = read_hf_config(model_dir)
        self.family = self.cfg.architecture
        if self.family not in GGUF_ARCH:
            raise UnsupportedModelError(
                f"{model_dir}: hearth quantize cannot convert {self.family} from safetensors yet (it converts "
                f"{', '.join(sorted(GGUF_ARCH))}): convert it with llama.cpp's convert_hf_to_gguf.py, then run "
                "hearth quantize on that GGUF")
        self.arch = GGUF_ARCH[self.family]
        self.n_layers = self.cfg.num_layers
        st = SafetensorsWeights(model_dir)
        layer_names = {hf: g for g, hf in (_GEMMA2_LAYER_NAMES if self.family == "gemma2" else _LAYER_NAMES).items()}
        top_names = {hf: g for g, hf in _TOP_NAMES.items()}
        self.tensors: list[SourceTensor] = []
        for hf_name in st.where:
            if hf_name.endswith("rotary_emb.inv_freq") or (self.cfg.tie_word_embeddings and hf_name == "lm_head.weight"):
                continue
            if m := _HF_LAYER.match(hf_name):
                base = layer_names.get(m.group(2))
                name = base and f"blk.{m.group(1)}.{base}.{m.group(3)}"
            else:
                base, _, suffix = hf_name.rpartition(".")
                name = base in top_names and f"{top_names[base]}.{suffix}"
            if not name:
                raise UnsupportedModelError(f"{model_dir}: tensor {hf_name!r} has no llama.cpp name; this "
                                            f"{self.family} checkpoint has parts hearthlm cannot convert")
            shape = tuple(st.where[hf_name].get_slice(hf_name).get_shape())
            self.tensors.append(SourceTensor(name, shape, lambda n=hf_name: self._load(st, n)))
        rs = self.cfg.rope_scaling
        if rs and rs.get("rope_type") == "llama3":
            from ..kernels.rope import rope_inv_freq

            hd, theta = self.cfg.head_dim, self.cfg.rope_theta
            freqs = (rope_inv_freq(hd, theta) / rope_inv_freq(hd, theta, rs)).numpy()
            self.tensors.append(SourceTensor("rope_freqs.weight", freqs.shape, lambda: freqs))
        self.tensors.sort(key=_order)

    def _load(self, st: SafetensorsWeights, hf_name: str) -> np.ndarray:
        w = st.get(hf_name).to(torch.float32)
        cfg = self.cfg
        if self.arch == "llama" and re.search(r"\.(q|k)_proj\.weight$", hf_name):
            heads = cfg.num_heads if "q_proj" in hf_name else cfg.num_kv_heads
            w = w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
        if self.family == "gemma2" and hf_name.endswith("norm.weight"):
            w = w + 1.0
        return w.numpy()

    def write_metadata(self, w: Any) -> None:
        import gguf

        from .vocab import write_hf_tokenizer

        cfg = self.cfg
        w.add_name(cfg.name)
        write_shape_metadata(w, cfg)
        if self.arch == "llama":
            w.add_rope_dimension_count(cfg.head_dim)
            w.add_vocab_size(cfg.vocab_size)
        rs = cfg.rope_scaling or {}
        if rs.get("rope_type") in ("dynamic", "longrope", "su") or rs.get("rotary_dim"):
            raise UnsupportedModelError(f"{cfg.name or 'this model'}: its RoPE ({rs.get('rope_type')}"
                                        f"{', partial rotary' if rs.get('rotary_dim') else ''}) has no GGUF form "
                                        "here yet: serve the safetensors model instead")
        if rs.get("rope_type") == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(rs["factor"]))
        elif rs.get("rope_type") == "yarn":
            if rs.get("attention_factor") is not None or rs.get("mscale") or rs.get("truncate") is False:
                raise UnsupportedModelError("GGUF has no keys for this YaRN variant (attention_factor, mscale or "
                                            "truncate=false): serve the safetensors model instead")
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(float(rs["factor"]))
            w.add_rope_scaling_orig_ctx_len(int(rs["original_max_position_embeddings"]))
            w.add_rope_scaling_yarn_beta_fast(float(rs.get("beta_fast") or 32))
            w.add_rope_scaling_yarn_beta_slow(float(rs.get("beta_slow") or 1))
        windows = {x for x in cfg.layer_windows if x is not None}
        if self.family == "gemma2":
            w.add_sliding_window(max(windows))
            w.add_attn_logit_softcapping(float(cfg.attn_logit_softcapping or 0.0))
            w.add_final_logit_softcapping(float(cfg.final_logit_softcapping or 0.0))
        elif windows:
            if None in cfg.layer_windows or len(windows) > 1:
                raise UnsupportedModelError("GGUF cannot describe sliding windows on only some layers "
                                            f"({self.family} with max_window_layers); quantize is not possible")
            w.add_sliding_window(windows.pop())
        write_hf_tokenizer(w, self.dir, cfg.vocab_size)


def write_shape_metadata(w: Any, cfg: ModelConfig) -> None:
    """The llama.cpp keys every decoder has: lengths, counts, head sizes, RoPE base, norm epsilon."""
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)


class GGUFSource:
    def __init__(self, path: Path):
        import gguf

        self.path = path
        self.file = GGUFFile(path)
        md = self.file.metadata
        self.arch = str(md.get("general.architecture"))
        if self.arch not in GGUF_REQUANT_ARCHS:
            raise UnsupportedModelError(f"{path.name}: GGUF architecture {self.arch!r} is not supported "
                                        f"(supported: {', '.join(sorted(GGUF_REQUANT_ARCHS))})")
        self.n_layers = int(md[f"{self.arch}.block_count"])
        self.cfg = None

        def load(name: str) -> np.ndarray:
            t = self.file.tensors[name]
            arr = gguf.quants.dequantize(self.file.raw(name), gguf.GGMLQuantizationType(t.ggml_type))
            return np.asarray(arr, dtype=np.float32).reshape(t.shape)

        self.tensors = [SourceTensor(n, t.shape, lambda n=n: load(n)) for n, t in self.file.tensors.items()]

    def write_metadata(self, w: Any) -> None:
        import gguf

        for key, value, vtype, sub in read_typed_kv(self.file.buf):
            if key not in _SKIP_KEYS:
                w.add_key_value(key, value, gguf.GGUFValueType(vtype),
                                sub_type=None if sub is None else gguf.GGUFValueType(sub))


def read_typed_kv(buf: Any) -> list[tuple[str, Any, int, int | None]]:
    """(key, value, value type, array element type) of every GGUF key, strings kept as bytes: the types matter
    to llama.cpp, and gguf.GGUFReader takes seconds over a large vocabulary."""
    pos = 24  # magic, version, tensor count, kv count

    def read(fmt: str) -> Any:
        nonlocal pos
        v = struct.unpack_from(fmt, buf, pos)[0]
        pos += struct.calcsize(fmt)
        return v

    def string() -> bytes:
        nonlocal pos
        n = read("<Q")
        pos += n
        return bytes(buf[pos - n:pos])

    out = []
    for _ in range(struct.unpack_from("<Q", buf, 16)[0]):
        key, vtype = string().decode("utf-8"), read("<I")
        sub = None
        if vtype == ARRAY:
            sub, count = read("<I"), read("<Q")
            if sub == STRING:
                value: Any = [string() for _ in range(count)]
            elif sub in _NUMPY:
                dt = np.dtype(_NUMPY[sub])
                value = np.frombuffer(buf, dt, count, pos).tolist()
                pos += count * dt.itemsize
            else:
                raise UnsupportedModelError(f"GGUF key {key!r} holds nested arrays, which cannot be copied")
        else:
            value = string() if vtype == STRING else read(_SCALARS[vtype])
        out.append((key, value, vtype, sub))
    return out


def _order(t: SourceTensor) -> tuple:
    m = re.match(r"^blk\.(\d+)\.", t.name)
    head = {"token_embd": 0, "rope_freqs": 1}.get(t.name.split(".")[0], 3)
    return (2, int(m.group(1)), t.name) if m else (head, 0, t.name)


def open_source(path: Path) -> HFSource | GGUFSource:
    return GGUFSource(path) if path.is_file() else HFSource(path)
