"""Family name -> model class."""
from __future__ import annotations

from ..errors import UnsupportedModelError
from .gemma2 import Gemma2Model
from .gemma3 import Gemma3Model
from .llama import LlamaModel
from .moe import MoeModel
from .phi3 import Phi3Model

MODEL_CLASSES = {"llama": LlamaModel, "mistral": LlamaModel, "qwen2": LlamaModel, "qwen3": LlamaModel,
                 "gemma2": Gemma2Model, "gemma3": Gemma3Model, "qwen3_moe": MoeModel, "mixtral": MoeModel,
                 "phi3": Phi3Model}


def model_class(family: str) -> type[LlamaModel]:
    try:
        return MODEL_CLASSES[family]
    except KeyError:
        raise UnsupportedModelError(f"no model implementation for family {family!r}; supported: "
                                    f"{', '.join(sorted(MODEL_CLASSES))}") from None
