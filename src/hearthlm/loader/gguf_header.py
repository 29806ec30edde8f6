"""Fast GGUF header parser (metadata + tensor table) over an mmap.

The `gguf` package decodes every string of the vocabulary into numpy views, which takes seconds for a
49k-token vocabulary; this reads the same header with `struct` in tens of milliseconds. Tensor data is
returned as numpy views of the mapped file and decoded with `gguf.quants`.
"""
from __future__ import annotations

import mmap
import struct
from collections.abc import Container
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ModelLoadError

GGUF_MAGIC = b"GGUF"
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
STRING, ARRAY = 8, 9
_U64 = struct.Struct("<Q")


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order (rows first)
    ggml_type: int
    offset: int  # absolute offset in the file
    nbytes: int


class GGUFFile:
    """`skip_arrays`: metadata keys whose array values are skipped and recorded as their length (an int), e.g.
    `{"tokenizer.ggml.tokens"}` when only the vocabulary size is needed; other keys are decoded as usual."""

    def __init__(self, path: Path, skip_arrays: Container[str] = ()):
        import gguf

        self.path = path
        self.skip_arrays = skip_arrays
        try:
            with open(path, "rb") as f:
                self.buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"cannot read {path} ({e}): the file is empty or unreadable; download it again") from None
        self.pos = 0
        try:
            self._parse(gguf)
        except (struct.error, IndexError, UnicodeDecodeError, ValueError, KeyError) as e:
            raise ModelLoadError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); it is corrupt or "
                                 "truncated: delete it and download it again") from None

    def _read(self, fmt: str):
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return v

    def _string(self) -> str:
        n = self._read("<Q")
        if self.pos + n > len(self.buf):
            raise ValueError("string runs past the end of the file")
        s = self.buf[self.pos:self.pos + n].decode("utf-8", errors="replace")
        self.pos += n
        return s

    def _strings(self, count: int) -> list[str]:
        """An array of `count` strings (a vocabulary: ~100k of them), in one tight loop."""
        buf, pos, end, unpack = self.buf, self.pos, len(self.buf), _U64.unpack_from
        out = [""] * count
        for i in range(count):
            n = unpack(buf, pos)[0]
            pos += 8
            if pos + n > end:
                raise ValueError("string runs past the end of the file")
            out[i] = buf[pos:pos + n].decode("utf-8", errors="replace")
            pos += n
        self.pos = pos
        return out

    def _value(self, vtype: int):
        if vtype == STRING:
            return self._string()
        if vtype == ARRAY:
            etype, count = self._read("<I"), self._read("<Q")
            if etype == STRING:
                return self._strings(count)
            if etype == ARRAY:
                return [self._value(ARRAY) for _ in range(count)]
            dt = np.dtype(_NUMPY[etype])
            arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=self.pos)
            self.pos += count * dt.itemsize
            return arr.tolist()
        return self._read(_SCALARS[vtype])

    def _skip_array(self) -> int:
        """Step over an array value without decoding it; its length."""
        etype, count = self._read("<I"), self._read("<Q")
        if etype == STRING:
            for _ in range(count):
                n = self._read("<Q")  # not `self.pos += self._read(...)`: that adds to the pos before the read
                self.pos += n
        elif etype == ARRAY:
            for _ in range(count):
                self._skip_array()
        else:
            self.pos += count * np.dtype(_NUMPY[etype]).itemsize
        if self.pos > len(self.buf):
            raise ValueError("array runs past the end of the file")
        return count

    def _parse(self, gguf) -> None:
        if self.buf[:4] != GGUF_MAGIC:
            raise ValueError("missing GGUF magic bytes")
        self.pos = 4
        version = self._read("<I")
        if version not in (2, 3):
            raise ValueError(f"unsupported GGUF version {version}")
        n_tensors, n_kv = self._read("<Q"), self._read("<Q")
        self.metadata: dict[str, object] = {}
        for _ in range(n_kv):
            key = self._string()
            vtype = self._read("<I")
            self.metadata[key] = self._skip_array() if vtype == ARRAY and key in self.skip_arrays else self._value(vtype)
        raw = []
        for _ in range(n_tensors):
            name = self._string()
            dims = [self._read("<Q") for _ in range(self._read("<I"))]
            raw.append((name, tuple(reversed(dims)), self._read("<I"), self._read("<Q")))
        align = int(self.metadata.get("general.alignment", 32))
        data_start = -(-self.pos // align) * align
        self.tensors: dict[str, TensorInfo] = {}
        for name, shape, ggml_type, offset in raw:
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
            n = int(np.prod(shape)) if shape else 1
            info = TensorInfo(name, shape, ggml_type, data_start + offset, n // block * type_size)
            if info.offset + info.nbytes > len(self.buf):
                raise ModelLoadError(f"{self.path} is truncated (tensor {name} ends at byte "
                                     f"{info.offset + info.nbytes:,} but the file has {len(self.buf):,}): "
                                     "download it again")
            self.tensors[name] = info

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes (quantized) or values (float types) as a read-only view of the file."""
        import gguf

        t = self.tensors[name]
        qtype = gguf.GGMLQuantizationType(t.ggml_type)
        float_dtypes = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}
        if qtype in float_dtypes:
            dt = np.dtype(float_dtypes[qtype])
            return np.frombuffer(self.buf, dtype=dt, count=t.nbytes // dt.itemsize, offset=t.offset).reshape(t.shape)
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        rows = int(np.prod(t.shape[:-1])) if len(t.shape) > 1 else 1
        return np.frombuffer(self.buf, dtype=np.uint8, count=t.nbytes, offset=t.offset).reshape(rows, -1)
