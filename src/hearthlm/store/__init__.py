"""Model store under $HEARTH_HOME (default ~/.hearth): pulled models, aliases."""
from __future__ import annotations

import os
from pathlib import Path


def hearth_home() -> Path:
    return Path(os.environ.get("HEARTH_HOME", "~/.hearth")).expanduser()


def resolve_in_store(name: str) -> Path | None:
    """Path of a pulled model by store name, or None."""
    models = hearth_home() / "models"
    for candidate in (models / name, models / name.replace("/", "--")):
        if candidate.is_dir():
            ggufs = sorted(candidate.glob("*.gguf"))
            if (candidate / "config.json").exists():
                return candidate
            if len(ggufs) == 1:
                return ggufs[0]
    return None
