"""Read just enough of a model to plan it: config + tensor byte sizes, from headers only, never tensor data."""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ModelConfig
from ..errors import InvalidRequestError, ModelLoadError, ModelNotFoundError
from ..loader.hf_config import config_from_hf_dict
from .memory import WeightBytes, weights_bytes_from_tensors
from .presets import PRESETS, preset_config

SMOLLM2_ALIAS = "smollm2"

_HF_DTYPES = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}
_FLOAT_BYTES = {"BF16": 2, "F16": 2, "F32": 4}
_ST_DTYPES = {"BF16": "bf16", "F16": "f16", "F32": "f32", "F8_E4M3": "fp8", "F8_E5M2": "fp8", "I8": "int8"}


@dataclass
class ModelSource:
    cfg: ModelConfig
    weights: WeightBytes | None  # exact sizes when the files were read
    quant: str  # the quantization the files (or the preset's checkpoint) are stored in
    kind: str  # "preset" | "gguf" | "hf"
    path: str | None = None
    # GGUF only: what the engine holds on a CUDA device -- "dense" (dequantized to bf16) or "quantized" (the
    # GPU kernels' repacked codes + fp16 scales, gpu_tensor_bytes); which one: loader.load.keep_quantized
    gpu_weights: dict[str, WeightBytes] | None = None
    # GGUF only: (name, type, shape) of every tensor, for cpu_weights
    tensor_types: list[tuple[str, str, tuple[int, ...]]] | None = None
    # HF only: the floating-point tensors upcast to float32, as the CPU engine holds them with dtype auto
    cpu_f32_weights: WeightBytes | None = None

    @property
    def gpu_dense_bytes(self) -> int | None:
        return None if self.gpu_weights is None else self.gpu_weights["dense"].total_bytes

    def cpu_weights(self, dense_budget: int | None = None) -> tuple[WeightBytes, int] | None:
        """GGUF only: (what the CPU engine holds, of which bf16 copies) -- see cpu_gguf_weights."""
        if self.tensor_types is None:
            return None
        return cpu_gguf_weights(self.tensor_types, self.cfg.tie_word_embeddings, dense_budget)


def smollm2_path() -> Path:
    """The embedded default GGUF, or ModelNotFoundError saying how to install it."""
    from ..loader import default_model_path

    return default_model_path()


def read_gguf(path: str | Path) -> ModelSource:
    """Config from GGUF key/values, exact sizes from its tensor table (header only, no tensor data)."""
    from gguf import GGMLQuantizationType, LlamaFileType

    from ..loader.gguf import GGUFWeights

    weights = GGUFWeights(Path(path))
    cfg = weights.config(name=Path(path).name)
    tensors = [(t.name, t.nbytes) for t in weights.tensors.values()]
    typed = [(t.name, GGMLQuantizationType(t.ggml_type).name, t.shape) for t in weights.tensors.values()]
    gpu = {"dense": weights_bytes_from_tensors((n, 2 * math.prod(s)) for n, _, s in typed),
           "quantized": weights_bytes_from_tensors((n, gpu_tensor_bytes(ty, s)) for n, ty, s in typed)}
    try:
        quant = LlamaFileType(int(weights.metadata.get("general.file_type"))).name
        quant = quant.removeprefix("MOSTLY_").removeprefix("ALL_").lower()
    except (TypeError, ValueError):
        quant = "gguf"
    return ModelSource(cfg, weights_bytes_from_tensors(tensors), quant, "gguf", str(path), gpu, typed)


# GGUF types the GPU kernels keep quantized (layers/quant_linear.GPU_QUANT_TYPES) -> bytes per weight after the
# repack (layers/gpu_quant.QuantWeight): 4-bit codes, or 5/6/8-bit codes one per byte, plus fp16 scale (and
# min) per group
_GPU_BYTES_PER_WEIGHT = {"Q4_0": 0.5 + 4 / 32, "Q4_1": 0.5 + 4 / 32, "Q4_K": 0.5 + 4 / 32,
                         "Q5_0": 1 + 4 / 32, "Q5_1": 1 + 4 / 32, "Q5_K": 1 + 4 / 32,
                         "Q8_0": 1 + 2 / 32, "Q6_K": 1 + 2 / 16}


def gpu_tensor_bytes(type_name: str, shape: tuple[int, ...]) -> int:
    """Bytes of one GGUF tensor kept quantized on a CUDA device: matrices of the kernels' types repacked, the
    rest (norms, other block types) dequantized to bf16."""
    n = math.prod(shape)
    if len(shape) == 2 and type_name in _GPU_BYTES_PER_WEIGHT:
        return math.ceil(n * _GPU_BYTES_PER_WEIGHT[type_name])
    return 2 * n


# On the CPU (layers/quant_linear.py, dtype auto) a 2-D GGUF weight of these types becomes a NativeWeight (where
# the native kernel is built) or an Int4Weight when its rows are a multiple of 16: 4-bit codes two a byte + a
# 16-bit scale and min per 32 weights (0.625 B a weight); 5/8-bit types a byte a code (1.125 B), or as two 4-bit
# halves for the int4 kernel (1.25 B). The token embedding stays a GroupQuant for row lookups (a byte a code +
# float32 scale and min per 32: 1.25 B); a tied head packs it once more. Everything else is float32. Each packed
# weight also keeps a bf16 copy (2 B a weight) for many-row calls while the engine's --cpu-dense-memory budget
# has room, in load order: each block's qkv, o, gate_up, down, then the head.
_CPU_INT4_BYTES = {"Q4_0": 0.625, "Q4_1": 0.625, "Q4_K": 0.625, "Q5_0": 1.25, "Q5_1": 1.25, "Q5_K": 1.25, "Q8_0": 1.25}
# the native kernel's layout (layers/quant_linear.NativeWeight, where it is built): 4-bit codes two a byte, 5/8-bit
# codes a byte each, fp16 scale and min per 32 weights
_CPU_NATIVE_BYTES = {**_CPU_INT4_BYTES, "Q5_0": 1.125, "Q5_1": 1.125, "Q5_K": 1.125, "Q8_0": 1.125}
# code bits of each type's GroupQuant (groups of 32 all): adjacent parts of one bit width fuse (Linear.fused)
_CPU_BITS = {"Q4_0": 4, "Q4_1": 4, "Q4_K": 4, "Q5_0": 5, "Q5_1": 5, "Q5_K": 5, "Q8_0": 8}
_CPU_LINEARS = (("attn_q", "attn_k", "attn_v"), ("attn_output",), ("ffn_gate", "ffn_up"), ("ffn_down",))


def cpu_gguf_weights(typed: list[tuple[str, str, tuple[int, ...]]], tied: bool,
                     dense_budget: int | None = None, native: bool | None = None) -> tuple[WeightBytes, int]:
    """(weight bytes the CPU engine holds for a GGUF, with the bf16 copies counted in, bytes of those copies).
    typed: (GGUF name, type, shape [N, K]); dense_budget: the copies' budget (None: the default
    EngineConfig.cpu_dense_memory, 0 on CPUs without native bf16 GEMMs, where no copies are made); native: whether the native kernel's layout holds
    the matrices (None: whether it is built here; then no copies are made)."""
    from ..kernels.cpu_quant import library
    from ..layers.cpu_dense import dense_budget_bytes

    native = library() is not None if native is None else native
    per_weight = _CPU_NATIVE_BYTES if native else _CPU_INT4_BYTES
    # the native kernel runs every row count on its own layout (batch invariance): it keeps no bf16 copies
    budget = 0 if native else dense_budget_bytes() if dense_budget is None else dense_budget
    by_name = {n: (ty, shape) for n, ty, shape in typed}
    held: list[tuple[str, int]] = []
    linears: list[tuple[str, int]] = []  # (name for placement, bf16 copy bytes) in load order

    def packed(ty: str, shape: tuple[int, ...]) -> bool:
        return len(shape) == 2 and ty in _CPU_INT4_BYTES and shape[0] % 16 == 0

    for name, ty, shape in typed:
        n = math.prod(shape)
        if name == "token_embd.weight" and packed(ty, shape):
            held.append((name, math.ceil(n * 1.25)))
            if tied:
                held.append(("output.weight", math.ceil(n * per_weight[ty])))
        elif packed(ty, shape):
            held.append((name, math.ceil(n * per_weight[ty])))
        else:
            held.append((name, 4 * n))
    blocks = sorted({int(n.split(".")[1]) for n, _, _ in typed if n.startswith("blk.")})
    for b in blocks:
        for group in _CPU_LINEARS:
            runs: list[list[str]] = []  # Linear.fused: one matmul per run of adjacent same-format parts
            for n in (f"blk.{b}.{g}.weight" for g in group if f"blk.{b}.{g}.weight" in by_name):
                bits = _CPU_BITS.get(by_name[n][0])
                if runs and bits is not None and _CPU_BITS.get(by_name[runs[-1][-1]][0]) == bits:
                    runs[-1].append(n)
                else:
                    runs.append([n])
            linears += [(r[0], sum(2 * math.prod(by_name[n][1]) for n in r)) for r in runs
                        if all(packed(*by_name[n]) for n in r)]
    head = "output.weight" if "output.weight" in by_name else "token_embd.weight" if tied else None
    if head is not None and head in by_name and packed(*by_name[head]):
        linears.append(("output.weight", 2 * math.prod(by_name[head][1])))
    used = 0
    for name, nbytes in linears:
        if used + nbytes <= budget:
            used += nbytes
            held.append((name, nbytes))
    return weights_bytes_from_tensors(held), used


def safetensors_header(path: str | Path) -> dict[str, Any]:
    """The JSON header of a .safetensors file: u64 little-endian length, then that many bytes of JSON."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > 100 * 1024**2:
            raise ModelLoadError(f"{path}: safetensors header of {n:,} bytes is not plausible; is the file corrupt?")
        return json.loads(f.read(n))


def read_hf_dir(path: str | Path) -> ModelSource:
    """config.json plus exact tensor sizes from the safetensors headers (data_offsets end - begin)."""
    root = Path(path)
    try:
        d = json.loads((root / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {root / 'config.json'}: {e}") from e
    cfg = config_from_hf_dict(d, name=root.name)
    tensors: list[tuple[str, int]] = []
    f32: list[tuple[str, int]] = []
    dtype_bytes: dict[str, int] = {}
    for shard in sorted(root.glob("*.safetensors")):
        for name, info in safetensors_header(shard).items():
            if name != "__metadata__":
                nbytes = info["data_offsets"][1] - info["data_offsets"][0]
                tensors.append((name, nbytes))
                f32.append((name, nbytes * 4 // _FLOAT_BYTES.get(info["dtype"], 4)))
                dtype_bytes[info["dtype"]] = dtype_bytes.get(info["dtype"], 0) + nbytes
    qc = d.get("quantization_config") or {}
    if qc.get("quant_method") == "fp8":
        quant = "fp8"
    elif qc.get("bits") in (4, 8) or qc.get("quant_method") in ("awq", "gptq"):
        quant = "int8-gptq-g128" if qc.get("bits") == 8 else "int4-awq-g128"
    elif dtype_bytes:
        quant = _ST_DTYPES.get(max(dtype_bytes, key=dtype_bytes.__getitem__), "bf16")
    else:
        quant = _HF_DTYPES.get(str(d.get("torch_dtype") or d.get("dtype") or "bfloat16"), "bf16")
    weights = weights_bytes_from_tensors(tensors) if tensors else None
    if weights is not None and len(weights.layer_bytes) != cfg.num_layers:
        weights = None  # names we cannot map to blocks (e.g. a multimodal checkpoint): estimate instead
    cpu = weights_bytes_from_tensors(f32) if weights is not None and quant in ("bf16", "f16", "f32") else None
    return ModelSource(cfg, weights, quant, "hf", str(root), cpu_f32_weights=cpu)


def resolve_model(spec: str) -> ModelSource:
    """`spec` is a preset name, the `smollm2` alias, a .gguf file, or a directory with config.json."""
    key = spec.strip().lower()
    if key in PRESETS:
        return ModelSource(preset_config(key), None, "bf16", "preset")
    if key == SMOLLM2_ALIAS:
        return read_gguf(smollm2_path())
    p = Path(spec).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return read_gguf(p)
    if p.is_dir() and (p / "config.json").is_file():
        return read_hf_dir(p)
    if p.is_dir():
        raise ModelNotFoundError(f"{p} has no config.json: pass an HF model directory, a .gguf file, or a preset")
    if p.exists():
        raise InvalidRequestError(f"{p} is not a .gguf file or a model directory", param="model")
    raise ModelNotFoundError(
        f"model {spec!r} not found: pass a directory with config.json, a .gguf file, the '{SMOLLM2_ALIAS}' "
        f"alias, or a preset ({', '.join(PRESETS)})")
