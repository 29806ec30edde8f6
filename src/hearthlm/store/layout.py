"""Store layout: $HEARTH_HOME/models/<dir>/ holds an HF directory or one .gguf, plus hearth-manifest.json.

Downloads go to models/.partial/<dir>/ (kept between attempts so they resume) and are renamed into place only
once every file is verified, so a model directory is always complete.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError

MANIFEST = "hearth-manifest.json"
# what an HF model directory needs (and README/LICENSE for `hearth show`'s license line)
HF_PATTERNS = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "tokenizer.model", "special_tokens_map.json", "chat_template.jinja", "*.safetensors",
               "model.safetensors.index.json", "README.md", "LICENSE*"]

ProgressCb = Callable[[str, int, "int | None"], None]  # (file name, bytes done, bytes total or None)


class ChecksumError(ModelLoadError):
    """A downloaded or copied file does not match its expected sha256."""

    code = "checksum_mismatch"


def hearth_home() -> Path:
    return Path(os.environ.get("HEARTH_HOME", "~/.hearth")).expanduser()


def models_dir() -> Path:
    return hearth_home() / "models"


def dir_name(name: str) -> str:
    """`org/repo:Q4_K_M` -> `org--repo--Q4_K_M` (portable directory names)."""
    return re.sub(r"[/:\\]", "--", name.strip())


def store_dir(name: str) -> Path:
    return models_dir() / dir_name(name)


def partial_dir(name: str) -> Path:
    return models_dir() / ".partial" / dir_name(name)


def model_entry(directory: Path) -> Path | None:
    """What the loader takes: the directory if it has config.json, else its single .gguf."""
    if (directory / "config.json").is_file():
        return directory
    ggufs = sorted(directory.glob("*.gguf"))
    return ggufs[0] if len(ggufs) == 1 else None


def read_manifest(directory: Path) -> dict[str, Any] | None:
    try:
        return json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, directory / MANIFEST)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def git_blob_sha1(path: Path) -> str:
    """Git's object id for a file (what the Hub reports as blob_id for files not in LFS)."""
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def check_sha256(path: Path, expected: str | None, ref: str) -> str:
    """sha256 of path; if it differs from expected, delete the file and raise ChecksumError."""
    actual = sha256_file(path)
    if expected and actual != expected.lower():
        path.unlink(missing_ok=True)
        raise ChecksumError(f"{path.name} from {ref} has sha256 {actual} but {expected.lower()} was expected: the "
                            f"file was corrupted and has been deleted; run `hearth pull {ref}` again")
    return actual


def dir_size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file() and ".cache" not in p.parts)


def commit(staging: Path, name: str, manifest: dict[str, Any]) -> Path:
    """Write the manifest and move a verified staging directory into place (replacing an older copy)."""
    write_manifest(staging, manifest)
    final = store_dir(name)
    if final.exists():
        trash = models_dir() / ".partial" / (final.name + ".old")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final, trash)
        shutil.rmtree(trash, ignore_errors=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, final)
    return final
