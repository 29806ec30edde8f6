"""Model loading: resolve a model reference, read config + weights (mmap), build tokenizer."""
from .load import LoadedModel, default_model_path, load_model, resolve_model_path

__all__ = ["LoadedModel", "default_model_path", "load_model", "resolve_model_path"]
