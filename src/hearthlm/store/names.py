"""Store names and the jail: every store path comes from a validated name and stays under models_dir().

A store name is `name`, `name:tag`, `org/name` or `org/name:tag` (letters, digits, `.`, `_`, `-`; each part starts
with a letter or digit, so no `..`, no leading `/`, `.` or `-`). Names that are paths or URLs are not store names.
"""
from __future__ import annotations

import re
from pathlib import Path

from ..errors import InvalidRequestError

MAX_NAME_CHARS = 200
_PART = r"[A-Za-z0-9][A-Za-z0-9._-]*"
NAME_RE = re.compile(rf"^{_PART}(?:/{_PART})?(?::[A-Za-z0-9][A-Za-z0-9._+-]*)?$")
GGUF_FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\.gguf$")
VALID_NAME = ("a model name is `name`, `name:tag` or `org/name[:tag]`: letters, digits, '.', '_' and '-', each part "
              f"starting with a letter or digit, at most {MAX_NAME_CHARS} characters (see `hearth list`)")
LOCAL_PATHS_REFUSED = ("local paths are not accepted over HTTP: start hearth serve with --allow-local-paths, or "
                       "`hearth pull PATH` it into the store")


def is_store_name(name: str) -> bool:
    return len(name) <= MAX_NAME_CHARS and bool(NAME_RE.match(name))


def is_url(name: str) -> bool:
    return bool(re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", name))


def looks_like_path(name: str) -> bool:
    """Path syntax (decided from the text alone, so refusing a path never reveals whether it exists)."""
    return not is_store_name(name) and not is_url(name) and (
        name.startswith(("/", "~", ".")) or "/" in name or "\\" in name or name.endswith(".gguf"))


def check_name(name: str) -> str:
    """The name, stripped, if it is a valid store name; else InvalidRequestError (HTTP 400)."""
    n = (name or "").strip()
    if is_store_name(n):
        return n
    if looks_like_path(n):
        raise InvalidRequestError(f"{_short(n)} is a path, not a store name: {VALID_NAME}", param="model")
    raise InvalidRequestError(f"invalid model name {_short(n)}: {VALID_NAME}", param="model")


def _short(name: str) -> str:
    return repr(name if len(name) <= 80 else name[:77] + "...")


def inside_models(path: Path) -> Path:
    """path, if it resolves strictly inside the models directory (symlinks followed); else InvalidRequestError."""
    from .layout import models_dir

    root, resolved = models_dir().resolve(), path.resolve()
    if resolved == root or not resolved.is_relative_to(root):
        raise InvalidRequestError(f"{path} is outside the model store ({root}): {VALID_NAME}", param="model")
    return path
