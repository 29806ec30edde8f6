"""Pull from the Hugging Face Hub: `org/name`, `org/name:file.gguf`, `org/name:Q4_K_M`.

Files are listed with their sizes and checksums (`model_info(files_metadata=True)`), downloaded with
`hf_hub_download(local_dir=...)` (which resumes), and verified: LFS files by sha256, small files by git blob id.
"""
from __future__ import annotations

import fnmatch
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import HearthError, InvalidRequestError, ModelNotFoundError, UnsupportedModelError
from .layout import (HF_PATTERNS, ChecksumError, ProgressCb, commit, git_blob_sha1, partial_dir, read_manifest,
                     sha256_file, store_dir)
from .names import check_name

HF_REPO = re.compile(r"^[\w.-]+/[\w.-]+(:[\w.+-]+)?$")
HF_URL = re.compile(r"^https?://(?:www\.)?(?:huggingface\.co|hf\.co)/([\w.-]+/[\w.-]+)/(?:resolve|blob)/([^/]+)/(.+)$")
_QUANT = re.compile(r"(?i)[-._](I?Q\d+(?:_[A-Z0-9]+)*|BF16|F16|F32)\.gguf$")
NETWORK_MODULES = {"httpx", "httpx2", "requests", "urllib3", "httpcore", "httpcore2"}
PREFERRED_QUANTS = ["Q4_K_M", "Q4_0", "Q8_0"]  # when a repo has several GGUFs and none was named


def quant_of(filename: str) -> str | None:
    m = _QUANT.search(filename)
    return m.group(1).upper() if m else None


def choose_files(names: list[str], selector: str | None, ref: str) -> list[str]:
    """Which repo files make the model: one GGUF (by file name or quant) or an HF safetensors directory."""
    ggufs = sorted(n for n in names if n.endswith(".gguf"))
    quants = ", ".join(sorted({q for g in ggufs if (q := quant_of(g))})) or "none"
    repo = ref.split(":")[0]
    if selector and selector.endswith(".gguf"):
        if selector not in names:
            raise ModelNotFoundError(f"{repo} has no file {selector!r}; its GGUF files: {', '.join(ggufs) or 'none'}")
        return [selector]
    if selector:
        hits = [g for g in ggufs if quant_of(g) == selector.upper()]
        if not hits:
            raise ModelNotFoundError(f"{repo} has no {selector.upper()} GGUF file; quantizations there: {quants}")
        if len(hits) > 1:
            raise UnsupportedModelError(f"{repo}:{selector} is split over {len(hits)} files ({', '.join(hits)}); "
                                        "split GGUF files are not supported: merge them with llama-gguf-split")
        return hits
    top = [n for n in names if "/" not in n]
    if "config.json" in top and any(n.endswith(".safetensors") for n in top):
        return [n for n in top if any(fnmatch.fnmatch(n, p) for p in HF_PATTERNS)]
    if len(ggufs) == 1:
        return ggufs
    for q in PREFERRED_QUANTS:
        hits = [g for g in ggufs if quant_of(g) == q]
        if len(hits) == 1:
            return hits
    if ggufs:
        raise InvalidRequestError(f"{repo} has {len(ggufs)} GGUF files: pick one with `hearth pull {repo}:QUANT` "
                               f"(available: {quants}) or `hearth pull {repo}:FILE.gguf`")
    raise UnsupportedModelError(f"{repo} has neither config.json + *.safetensors nor a .gguf file, so hearthlm "
                                "cannot load it (PyTorch .bin checkpoints are not supported)")


def _progress_class(cb: ProgressCb, fname: str) -> type:
    from huggingface_hub.utils import tqdm as hf_tqdm

    first: list[object] = []  # Xet downloads open a second (transfer) bar: only the first reports file bytes

    class _Bar(hf_tqdm):  # a silent bar that forwards byte counts to cb
        def __init__(self, *args: Any, **kwargs: Any):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)
            self._done = int(kwargs.get("initial") or 0)
            self._reports = not first
            first.append(self)
            if self._reports:
                cb(fname, self._done, kwargs.get("total"))

        def update(self, n: float | None = 1) -> bool | None:
            self._done += int(n or 0)
            if self._reports:
                cb(fname, self._done, self.total)
            return super().update(n)

    return _Bar


def _expected(sibling: Any) -> tuple[str | None, str | None]:
    """(sha256 from LFS metadata, git blob id) for a RepoSibling."""
    lfs = getattr(sibling, "lfs", None)
    sha = (lfs.get("sha256") if isinstance(lfs, dict) else getattr(lfs, "sha256", None)) if lfs else None
    return sha, getattr(sibling, "blob_id", None)


def _hub_call(fn: Any, ref: str, *args: Any, **kwargs: Any) -> Any:
    from huggingface_hub import errors as hub_errors

    try:
        return fn(*args, **kwargs)
    except hub_errors.GatedRepoError:
        raise ModelNotFoundError(f"{ref} is gated: accept its license on huggingface.co, then `hf auth login`") from None
    except hub_errors.RepositoryNotFoundError:
        raise ModelNotFoundError(f"{ref} was not found on the Hugging Face Hub: check the spelling (org/name); "
                                 "private repos need `hf auth login`") from None
    except hub_errors.RevisionNotFoundError:
        raise ModelNotFoundError(f"{ref}: revision {kwargs.get('revision')!r} does not exist") from None
    except hub_errors.RemoteEntryNotFoundError as e:
        raise ModelNotFoundError(f"{ref}: {e}") from None
    except Exception as e:  # offline, DNS, timeouts: OSError or the HTTP library's errors (httpx/httpx2/requests)
        if not isinstance(e, OSError) and type(e).__module__.split(".")[0] not in NETWORK_MODULES:
            raise
        raise HearthError(f"cannot download {ref} from the Hugging Face Hub ({type(e).__name__}: {e}): check the "
                          "network or HF_ENDPOINT, or pull a local path or URL instead") from None


def pull_hf(ref: str, *, name: str | None = None, revision: str | None = None,
            progress_cb: ProgressCb | None = None) -> Path:
    import huggingface_hub as hub

    repo, _, selector = ref.partition(":")
    name = check_name(name or ref)  # before any download: 400 for names that are not store names
    info = _hub_call(hub.HfApi().model_info, ref, repo, revision=revision, files_metadata=True)
    siblings = {s.rfilename: s for s in info.siblings or []}
    files = choose_files(list(siblings), selector or None, ref)
    staging, final = partial_dir(name), store_dir(name)
    if final.is_dir() and not staging.exists() and (read_manifest(final) or {}).get("repo") == repo:
        shutil.copytree(final, staging)  # an update: unchanged files are not downloaded again
    staging.mkdir(parents=True, exist_ok=True)
    entries: dict[str, dict[str, Any]] = {}
    for fname in files:
        tqdm_class = _progress_class(progress_cb, fname) if progress_cb else None
        local = Path(_hub_call(hub.hf_hub_download, ref, repo, fname, revision=info.sha, local_dir=staging,
                               tqdm_class=tqdm_class))
        entries[fname] = _verify(local, siblings[fname], staging, ref)
    fmt = "gguf" if files[0].endswith(".gguf") else "safetensors"
    if fmt == "gguf" and "/" in files[0]:  # keep the layout flat: models/<dir>/<file>.gguf
        flat = staging / Path(files[0]).name
        (staging / files[0]).replace(flat)
        entries = {flat.name: entries[files[0]]}
    manifest = {"name": name, "source": ref, "kind": "hf", "repo": repo, "revision": info.sha, "format": fmt,
                "files": entries, "size": sum(e["size"] for e in entries.values()),
                "pulled_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    return commit(staging, name, manifest)


def _verify(path: Path, sibling: Any, staging: Path, ref: str) -> dict[str, Any]:
    sha_expected, blob_id = _expected(sibling)
    actual = sha256_file(path)
    bad = (sha_expected and actual != sha_expected) or (not sha_expected and blob_id and git_blob_sha1(path) != blob_id)
    if bad:
        rel = path.relative_to(staging).as_posix()
        path.unlink(missing_ok=True)  # and forget it so the next attempt downloads it again
        for meta in (staging / ".cache" / "huggingface" / "download").glob(f"{rel}.*"):
            meta.unlink(missing_ok=True)
        want = sha_expected or f"git blob {blob_id}"
        raise ChecksumError(f"{rel} from {ref} does not match the Hub's checksum ({want}): the download was "
                            f"corrupted and has been deleted; run `hearth pull {ref}` again")
    return {"sha256": actual, "size": path.stat().st_size}
