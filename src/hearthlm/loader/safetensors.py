"""HF model directories: config.json + (sharded) *.safetensors, read through mmap."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..config import ModelConfig
from ..errors import ModelLoadError
from .hf_config import config_from_hf_dict


def read_hf_config(model_dir: Path) -> ModelConfig:
    path = model_dir / "config.json"
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{model_dir} has no config.json: point at an HF model directory or a .gguf file") from None
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path} is not valid JSON ({e}): re-download the model") from None
    cfg = config_from_hf_dict(d, name=model_dir.name)
    gen = model_dir / "generation_config.json"
    if gen.exists():
        try:
            eos = json.loads(gen.read_text()).get("eos_token_id")
        except json.JSONDecodeError:
            eos = None
        if eos is not None:
            cfg.eos_token_ids = sorted(set(cfg.eos_token_ids) | set(eos if isinstance(eos, list) else [eos]))
    return cfg


class SafetensorsWeights:
    """Name -> tensor lookups over all shards; tensors are mmap'd until converted."""

    def __init__(self, model_dir: Path):
        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise ModelLoadError(f"no *.safetensors files in {model_dir}: download the weights "
                                 "(hearth pull) or convert .bin checkpoints to safetensors")
        self.handles = {}
        self.where: dict[str, object] = {}
        for f in files:
            try:
                h = safe_open(str(f), framework="pt")
                keys = list(h.keys())
            except (SafetensorError, OSError, ValueError) as e:
                raise ModelLoadError(f"{f} is corrupt or truncated ({e}): delete it and download it again") from None
            self.handles[f] = h
            for k in keys:
                self.where[k] = h

    def get(self, name: str) -> torch.Tensor | None:
        h = self.where.get(name)
        if h is None:
            return None
        try:
            return h.get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ModelLoadError(f"tensor {name!r} cannot be read ({e}): the file is corrupt or truncated; "
                                 "download it again") from None
