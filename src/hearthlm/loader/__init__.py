"""Model loading: resolve a model reference, read config + weights (mmap), build tokenizer.

The public names load on first use (PEP 562): the loader's submodules that need no torch (gguf_header,
pack_cache's paths) stay cheap to import for metadata commands such as `hearth rm`."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .load import LoadedModel, default_model_path, load_model, resolve_model_path

__all__ = ["LoadedModel", "default_model_path", "load_model", "resolve_model_path"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(".load", __name__), name)
    globals()[name] = value
    return value
