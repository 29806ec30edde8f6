"""Fast GGUF header reader: key/values and tensor infos without touching tensor data.

`gguf.GGUFReader` decodes every tokenizer string (~3 s for a 49k vocabulary); `hearth list`/`show` only need
the scalars, so long arrays are skipped and recorded by their length (the same convention the loader uses).
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
MAX_ARRAY_ITEMS = 64  # longer arrays are stored as their length


@dataclass
class GGUFHeader:
    metadata: dict[str, Any] = field(default_factory=dict)
    tensors: list[tuple[str, list[int], int]] = field(default_factory=list)  # (name, shape, ggml type id)


class _Cursor:
    def __init__(self, buf: mmap.mmap):
        self.buf, self.pos = buf, 0

    def unpack(self, fmt: str) -> Any:
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self, keep: bool = True) -> str:
        n = self.unpack("<Q")
        self.pos += n
        return bytes(self.buf[self.pos - n:self.pos]).decode("utf-8", "replace") if keep else ""

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            itype, count = self.unpack("<I"), self.unpack("<Q")
            keep = count <= MAX_ARRAY_ITEMS
            if itype in _SCALARS and not keep:
                self.pos += count * struct.calcsize(_SCALARS[itype])
                return count
            items = [self.string(keep) if itype == _STRING else self.value(itype) for _ in range(count)]
            return items if keep else count
        if vtype not in _SCALARS:
            raise ValueError(f"unknown GGUF value type {vtype}")
        return self.unpack(_SCALARS[vtype])


def read_gguf_header(path: Path) -> GGUFHeader:
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            if buf[:4] != b"GGUF":
                raise ValueError("no GGUF magic at the start of the file")
            cur = _Cursor(buf)
            cur.pos = 4
            version = cur.unpack("<I")
            if version < 2:
                raise ValueError(f"GGUF version {version} is too old (need 2 or newer)")
            n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
            header = GGUFHeader()
            for _ in range(n_kv):
                key = cur.string()
                header.metadata[key] = cur.value(cur.unpack("<I"))
            for _ in range(n_tensors):
                name = cur.string()
                shape = [cur.unpack("<Q") for _ in range(cur.unpack("<I"))]
                ttype = cur.unpack("<I")
                cur.unpack("<Q")  # data offset
                header.tensors.append((name, shape, ttype))
    except (ValueError, struct.error, OSError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path} is not a readable GGUF file ({e}): it is corrupt or truncated; "
                             "delete it and pull it again") from None
    header.metadata["_has_output_weight"] = any(t[0] == "output.weight" for t in header.tensors)
    return header


def gguf_quantization(header: GGUFHeader) -> str:
    """`general.file_type` as llama.cpp names it (Q4_K_M, Q8_0, F16), else the most common matrix type."""
    import gguf

    ftype = header.metadata.get("general.file_type")
    if isinstance(ftype, int):
        try:
            return gguf.LlamaFileType(ftype).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            pass
    types = [t for _, shape, t in header.tensors if len(shape) > 1]
    if not types:
        return "unknown"
    common = max(set(types), key=types.count)
    try:
        return gguf.GGMLQuantizationType(common).name
    except ValueError:
        return f"type{common}"
