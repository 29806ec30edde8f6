"""Model store under $HEARTH_HOME (default ~/.hearth): pull, list, show, rm, aliases.

Layout: models/<name with / and : as -->/ holds an HF directory or one .gguf plus hearth-manifest.json
(source, revision, sha256 and size of each file, pull time). The embedded default answers to smollm2,
smollm2:135m and default.
"""
from __future__ import annotations

from pathlib import Path

from .catalog import DEFAULT_NAME, ModelInfo, find_dir, list_models, remove, show_model, verify
from .layout import ChecksumError, ProgressCb, hearth_home, model_entry
from .pull import pull

__all__ = ["hearth_home", "resolve_in_store", "list_models", "show_model", "pull", "remove", "verify",
           "ModelInfo", "ChecksumError", "ProgressCb", "DEFAULT_NAME"]


def resolve_in_store(name: str) -> Path | None:
    """Path of a pulled model by store name (the .gguf file or the HF directory), or None."""
    d = find_dir(name)
    return model_entry(d) if d is not None else None
