"""Model store under $HEARTH_HOME (default ~/.hearth): pull, list, show, rm, aliases.

Layout: models/<name with / and : as -->/ holds an HF directory or one .gguf plus hearth-manifest.json
(source, revision, sha256 and size of each file, pull time). The embedded default answers to smollm2,
smollm2:135m and default. The store is a jail: names are validated (names.py) and every path is checked to stay
under models/ before any read, write or delete; pulls over HTTP follow a PullPolicy (netpolicy.py).
"""
from __future__ import annotations

from pathlib import Path

from .catalog import (DEFAULT_NAME, ModelInfo, find_dir, list_models, remove, resolve_name, show_model,
                      verify)
from .layout import ChecksumError, ProgressCb, hearth_home, model_entry, recover_store
from .names import check_name, is_store_name
from .netpolicy import PullPolicy
from .pull import pull

__all__ = ["hearth_home", "resolve_in_store", "resolve_name", "list_models", "show_model", "pull", "remove",
           "verify", "recover_store", "check_name", "is_store_name", "PullPolicy", "ModelInfo", "ChecksumError",
           "ProgressCb", "DEFAULT_NAME"]


def resolve_in_store(name: str) -> Path | None:
    """Path of a pulled model by store name (the .gguf file or the HF directory); None when it is not in the store
    or is not a store name (a path, a prompt)."""
    if not is_store_name(name.strip()):
        return None
    d = find_dir(name)
    return model_entry(d) if d is not None else None
