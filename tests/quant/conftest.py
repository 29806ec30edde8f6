"""Quantized copies of the tiny random models, made once per session."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hearthlm.quant import quantize_model


@pytest.fixture(scope="session")
def tiny_gguf(tiny, tmp_path_factory):
    """tiny_gguf(family, target, source=None) -> Path of `source` (default: the HF dir) quantized to target."""
    root = tmp_path_factory.mktemp("tiny_gguf")
    made: dict[tuple, Path] = {}

    def make(family: str, target: str, source: Path | None = None) -> Path:
        key = (family, target, source)
        if key not in made:
            out = root / f"{family}-{target}{'-from-gguf' if source else ''}.gguf"
            quantize_model(Path(source or tiny.path(family)), target, out)
            made[key] = out
        return made[key]

    return make


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The tiny models gain nothing from a second thread, and two OpenMP threads on a CPU shared with other
    jobs spin-wait: up to 20x slower. Restored after each test."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
