"""Packed-weight cache: the native CPU kernel's layout of a GGUF model's matrices, saved once per model file.

Packing a GGUF file for the native kernel (layers/quant_linear.NativeWeight) moves every code byte; llama.cpp
instead maps its file and starts at once. The first CPU load of a model writes what it packed to
$HEARTH_HOME/packed/<hash of the model path>.safetensors (temp file + rename: readers see a whole file or none);
later loads map that file (safetensors: the pages come from the page cache, nothing is copied) and no GGUF block
is decoded.

An entry is trusted only when its key matches: the model file's resolved path, size and mtime, and the version of
the packing code (a hash of the modules that make the layout), and its bytes match the checksum saved with them
(`checksum`); each tensor's shape and dtype are checked against the weight asking for it. A stale, truncated or
otherwise damaged entry is ignored and rewritten. One entry per model file (a changed file overwrites its
entry); `hearth rm` deletes its model's entry, and entries whose model file is gone (deleted by other means) are
deleted whenever an entry is written.

Not a config switch: it changes neither numerics (the bytes are the ones a fresh pack makes) nor memory (file-backed
pages instead of anonymous ones); load_model(pack_cache=False) skips it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
import zlib
from functools import cache
from pathlib import Path

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger("hearthlm")

FORMAT = 1
SUFFIX = ".safetensors"


def cache_dir() -> Path:
    from ..store.layout import hearth_home

    return hearth_home() / "packed"


@cache
def code_version() -> str:
    """Hash of the modules whose code decides the packed bytes: a change to any of them invalidates every entry."""
    from ..kernels import cpu_quant
    from ..layers import quant_linear
    from ..quant import group_quant
    from . import gguf, gguf_unpack

    h = hashlib.sha256(str(FORMAT).encode())
    for mod in (cpu_quant, quant_linear, group_quant, gguf, gguf_unpack):
        h.update(Path(mod.__file__).read_bytes())
    return h.hexdigest()[:16]


def entry_path(model_path: Path) -> Path:
    return cache_dir() / (hashlib.sha256(str(model_path.resolve()).encode()).hexdigest()[:20] + SUFFIX)


def model_key(model_path: Path) -> dict[str, object]:
    st = model_path.stat()
    return {"format": FORMAT, "path": str(model_path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "code": code_version()}


def checksum(tensors: dict[str, torch.Tensor]) -> str:
    """A checksum of every tensor's bytes that a load can afford (one pass of integer sums): per tensor the wrapping sum
    of its 64-bit words (CRC32 where the size is not a multiple of 8), hashed with the names and sizes. It catches
    truncation and damaged bytes; it is not a defence against a deliberate edit (the cache is the user's own)."""
    import numpy as np
    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        a = tensors[name].contiguous().view(torch.uint8).numpy().reshape(-1)
        s = int(a.view(np.uint64).sum(dtype=np.uint64)) if a.size % 8 == 0 else zlib.crc32(a)
        h.update(f"{name}:{a.size}:{s};".encode())
    return h.hexdigest()


class PackCache:
    """The entry of one model file: `get` what a previous load saved, `put` what this load packed, `save` when
    something new was packed. Errors reading or writing the cache are logged and never fail a load."""

    def __init__(self, model_path: Path):
        self.model_path = Path(model_path)
        self.path = entry_path(self.model_path)
        self.key = model_key(self.model_path)
        self.saved: dict[str, torch.Tensor] = {}
        self.new: dict[str, torch.Tensor] = {}
        self.rejected = False  # an entry existed but did not match (stale or corrupt)
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        try:
            from safetensors import safe_open

            with safe_open(self.path, framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                if json.loads(meta.get("key", "null")) != self.key:
                    raise ValueError("stale: the model file or the packing code changed")
                tensors = {n: f.get_tensor(n) for n in f.keys()}  # noqa: SIM118 - safe_open has no iterator
            if meta.get("checksum") != checksum(tensors):
                raise ValueError("checksum mismatch")
        except Exception as e:  # noqa: BLE001 - any unreadable entry is rebuilt
            log.info("packed-weight cache %s ignored (%s): repacking", self.path, str(e)[:200])
            self.rejected = True
            return
        self.saved = tensors

    def has(self, name: str) -> bool:
        return f"{name}/codes" in self.saved

    def get(self, name: str, shape: tuple[int, int], bits: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(codes, scale, mins) in NativeWeight's layout for the weight `name` of `shape`, or None."""
        import torch

        try:
            codes, scale, mins = (self.saved[f"{name}/{part}"] for part in ("codes", "scale", "mins"))
        except KeyError:
            return None
        n, k = shape
        tiles = (n // 16, k // 32, 16)
        if codes.dtype != torch.uint8 or codes.shape != (n * k * bits // 8,) or \
                scale.dtype != torch.float16 or tuple(scale.shape) != tiles or \
                mins.dtype != torch.float16 or tuple(mins.shape) != tiles:
            log.info("packed-weight cache %s: %s does not match the model; repacking", self.path, name)
            self.rejected = True
            return None
        return codes, scale, mins

    def put(self, name: str, codes: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor) -> None:
        self.new.update({f"{name}/codes": codes, f"{name}/scale": scale, f"{name}/mins": mins})

    def save(self) -> None:
        """Write saved + new entries atomically if this load packed anything new; delete entries of model files
        that no longer exist."""
        if not self.new:
            return
        tensors = {**{n: t.clone() for n, t in self.saved.items()}, **self.new}  # mapped: one storage
        meta = {"key": json.dumps(self.key), "checksum": checksum(tensors)}
        try:
            from safetensors.torch import save_file

            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".tmp", dir=self.path.parent)
            os.close(fd)
            try:
                save_file(tensors, tmp, metadata=meta)
                os.replace(tmp, self.path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        except Exception as e:  # noqa: BLE001 - a full disk or a read-only home never fails the load
            log.info("packed-weight cache not written (%s)", e)
            return
        self.new = {}
        prune(keep=self.path)


def prune(keep: Path | None = None) -> None:
    """Delete entries whose model file is gone (and leftover temp files)."""
    d = cache_dir()
    if not d.is_dir():
        return
    for p in d.iterdir():
        if p == keep:
            continue
        try:
            if p.suffix == ".tmp":  # a writer that died; a live one finishes within the hour
                if p.stat().st_mtime < time.time() - 3600:
                    p.unlink()
                continue
            if p.suffix != SUFFIX:
                continue
            from safetensors import safe_open

            with safe_open(p, framework="pt", device="cpu") as f:
                key = json.loads((f.metadata() or {}).get("key", "{}"))
            if not Path(str(key.get("path", ""))).exists():
                p.unlink()
        except Exception:  # noqa: BLE001 - unreadable: rebuilt by its model's next load, or left alone
            continue


def remove_for(model_path: Path) -> None:
    """Delete the entry of a model file (`hearth rm`; importing this module needs no torch)."""
    try:
        entry_path(Path(model_path)).unlink()
    except OSError:
        pass
