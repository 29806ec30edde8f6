"""Store layout: $HEARTH_HOME/models/<dir>/ holds an HF directory or one .gguf, plus hearth-manifest.json.

Downloads go to models/.partial/<dir>/ (kept between attempts so they resume, for a day) and are renamed into
place only once every file is verified, so a model directory is always complete. A re-pull swaps atomically: the
old copy moves to models/.partial/.old/<dir>/, the new one into place, then the old copy is deleted;
recover_store() finishes or undoes a swap that a crash interrupted. Every path comes from a validated store name
and is checked to stay under models/ (names.py).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import InvalidRequestError, ModelLoadError
from .names import check_name, inside_models

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


PARTIAL = ".partial"
OLD = ".old"  # models/.partial/.old/<dir>: the previous copy during a re-pull's swap
STALE_PARTIAL_S = 24 * 3600  # pulls resume within a day; older partial downloads are deleted


def dir_name(name: str) -> str:
    """`org/repo:Q4_K_M` -> `org--repo--Q4_K_M` (portable directory names); InvalidRequestError for bad names."""
    return re.sub(r"[/:]", "--", check_name(name))


def store_dir(name: str) -> Path:
    return inside_models(models_dir() / dir_name(name))


def partial_dir(name: str) -> Path:
    return inside_models(models_dir() / PARTIAL / dir_name(name))


def old_dir(final: Path) -> Path:
    return inside_models(models_dir() / PARTIAL / OLD / final.name)


def rmtree_in_store(path: Path) -> None:
    """shutil.rmtree, only for paths inside the models directory."""
    shutil.rmtree(inside_models(path), ignore_errors=True)


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
    """Write the manifest and move a verified staging directory into place. An older copy is swapped out, not
    deleted first: old -> .partial/.old/<dir>, staging -> final, then the old copy is deleted. A crash between the
    renames leaves the old copy for recover_store() to put back."""
    inside_models(staging)
    write_manifest(staging, manifest)
    final = store_dir(name)
    old = old_dir(final)
    if old.exists():  # a leftover: final is complete, or staging is a verified replacement
        rmtree_in_store(old)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        old.parent.mkdir(parents=True, exist_ok=True)
        os.replace(final, old)
    os.replace(staging, final)
    if old.exists():
        rmtree_in_store(old)
    return final


def _newest_mtime(path: Path) -> float:
    stamps = [path.stat().st_mtime]
    for p in path.rglob("*"):
        try:
            stamps.append(p.stat().st_mtime)
        except OSError:
            pass
    return max(stamps)


def recover_store(*, now: float | None = None, max_age_s: float = STALE_PARTIAL_S) -> list[str]:
    """Repair the store after a crash: put back an old copy whose swap was interrupted (final directory missing),
    delete old copies whose final exists, and delete partial downloads untouched for max_age_s (a day: pulls
    resume within it). Returns what it did, one line each (for logs)."""
    root = models_dir()
    partial, done = root / PARTIAL, []
    if not partial.is_dir():
        return done
    now = time.time() if now is None else now
    olds = partial / OLD
    for old in sorted(olds.iterdir()) if olds.is_dir() else []:
        final = root / old.name
        try:  # another process may be recovering too: what it already did is skipped
            if final.exists():
                rmtree_in_store(old)
                done.append(f"deleted the replaced copy {old}")
            elif old.is_dir() and not old.name.startswith("."):
                os.replace(inside_models(old), inside_models(final))
                done.append(f"restored {final} (a re-pull was interrupted)")
        except (OSError, InvalidRequestError):
            continue
    for p in sorted(partial.iterdir()):
        if p.name == OLD:
            continue
        try:
            if now - _newest_mtime(p) <= max_age_s:
                continue
            if p.is_dir():
                rmtree_in_store(p)
            else:
                inside_models(p).unlink(missing_ok=True)
        except (OSError, InvalidRequestError):
            continue
        done.append(f"deleted the partial download {p} (untouched for over {max_age_s / 3600:g} hours)")
    return done
