"""Describe a model from metadata only (GGUF header or config.json + tokenizer files), never its weights."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..errors import HearthError
from .layout import dir_size

# long tokenizer arrays: only the vocabulary size (the length of tokens) is needed to describe a model
_SKIP_ARRAYS = frozenset({"tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.scores",
                          "tokenizer.ggml.token_type"})


def human_count(n: int | None) -> str | None:
    if n is None:
        return None
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _readme_license(directory: Path) -> str | None:
    try:
        text = (directory / "README.md").read_text(errors="replace")
    except OSError:
        text = ""
    front = re.match(r"^---\s*\n(.*?)\n---", text, re.S)
    m = re.search(r"^license:\s*['\"]?([^'\"\n]+)", front.group(1), re.M) if front else None
    if m:
        return m.group(1).strip()
    lic = sorted(directory.glob("LICENSE*"))
    return f"see {lic[0].name}" if lic else None


def _describe_gguf(path: Path) -> dict[str, Any]:
    from ..loader.gguf_header import GGUFFile
    from ..loader.hf_config import config_from_gguf_metadata

    gguf_file = GGUFFile(path, skip_arrays=_SKIP_ARRAYS)
    tensors = list(gguf_file.tensors.values())
    md = dict(gguf_file.metadata, _has_output_weight="output.weight" in gguf_file.tensors)
    try:
        cfg = config_from_gguf_metadata(md, name=path.stem)
    except (HearthError, KeyError, TypeError, ValueError):
        cfg = None
    exact = sum(_prod(t.shape) for t in tensors)
    return {"format": "gguf", "architecture": str(md.get("general.architecture", "unknown")),
            "parameters": cfg.num_params if cfg else exact, "quantization": gguf_quantization(md, tensors),
            "context_length": cfg.max_position_embeddings if cfg else None,
            "embedding_length": cfg.hidden_size if cfg else None, "num_layers": cfg.num_layers if cfg else None,
            "chat_template": md.get("tokenizer.chat_template") if isinstance(md.get("tokenizer.chat_template"), str)
            else None, "license": md.get("general.license"), "size_bytes": path.stat().st_size}


def gguf_quantization(metadata: dict[str, Any], tensors: list[Any]) -> str:
    """`general.file_type` as llama.cpp names it (Q4_K_M, Q8_0, F16), else the most common matrix type."""
    import gguf

    ftype = metadata.get("general.file_type")
    if isinstance(ftype, int):
        try:
            return gguf.LlamaFileType(ftype).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            pass
    types = [t.ggml_type for t in tensors if len(t.shape) > 1]
    if not types:
        return "unknown"
    common = max(set(types), key=types.count)
    try:
        return gguf.GGMLQuantizationType(common).name
    except ValueError:
        return f"type{common}"


def _prod(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _describe_hf(directory: Path) -> dict[str, Any]:
    from ..loader.hf_config import config_from_hf_dict

    d = _json(directory / "config.json")
    try:
        cfg = config_from_hf_dict(d, name=directory.name)
    except (HearthError, KeyError, TypeError, ValueError):
        cfg = None
    qc = d.get("quantization_config") or {}
    quant = (f"{qc.get('quant_method', 'quantized')}" + (f" {qc['bits']}-bit" if qc.get("bits") else "")) if qc \
        else str(d.get("torch_dtype") or d.get("dtype") or "unknown")
    template = _json(directory / "tokenizer_config.json").get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if template is None and (directory / "chat_template.jinja").is_file():
        template = (directory / "chat_template.jinja").read_text()
    archs = d.get("architectures") or [d.get("model_type", "unknown")]
    return {"format": "safetensors", "architecture": cfg.architecture if cfg else str(archs[0]),
            "parameters": cfg.num_params if cfg else None, "quantization": quant,
            "context_length": cfg.max_position_embeddings if cfg else d.get("max_position_embeddings"),
            "embedding_length": cfg.hidden_size if cfg else None, "num_layers": cfg.num_layers if cfg else None,
            "chat_template": template, "license": d.get("license") or _readme_license(directory),
            "size_bytes": dir_size(directory)}


def describe(path: Path) -> dict[str, Any]:
    """Metadata of a .gguf file or an HF directory; `parameter_size` is the human form of `parameters`."""
    info = _describe_gguf(path) if path.is_file() else _describe_hf(path)
    info["parameter_size"] = human_count(info["parameters"])
    return info
