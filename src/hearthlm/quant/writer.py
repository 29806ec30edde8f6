"""`quantize_model`: read a model (HF dir or GGUF), write a GGUF of the chosen target, one tensor at a time."""
from __future__ import annotations

import fnmatch
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InvalidRequestError
from .formats import _K_FALLBACK, TARGETS, quantize_array, tensor_type_why, type_nbytes
from .kquants import QK_K

# types --tensor-type may name (GGML names, lower-case on the command line)
OVERRIDE_TYPES = ("F32", "F16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
from .sources import open_source


@dataclass
class QuantizeReport:
    path: Path
    target: str
    arch: str
    types: Counter = field(default_factory=Counter)  # GGML type -> tensor count
    num_weights: int = 0
    data_bytes: int = 0
    seconds: float = 0.0
    # one per tensor: (name, GGML type, weights, bytes, why that type)
    tensors: list[tuple[str, str, int, int, str]] = field(default_factory=list)
    # tensor name -> relative quantization error ||W - deq(Q(W))|| / ||W|| (only with measure_error=True)
    errors: dict[str, float] = field(default_factory=dict)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.data_bytes / max(1, self.num_weights)

    def breakdown(self) -> list[str]:
        """Why the file has its bits per weight: each part of the model (block matrices, token embedding / output
        head, norms) with its bits per weight and share of the weights, and each type in it with the reason."""
        parts: dict[str, list[tuple[str, str, int, int, str]]] = {}
        for row in self.tensors:
            parts.setdefault(_part(row[0], row[2]), []).append(row)
        total_w = max(1, self.num_weights)
        lines = [f"{self.bits_per_weight:.2f} bits/weight over the whole file ({self.num_weights / 1e6:,.1f} M "
                 f"weights in {self.data_bytes / 2**20:,.1f} MiB); by part:"]
        for part in sorted(parts, key=lambda p: -sum(r[3] for r in parts[p])):
            rows = parts[part]
            w, b = sum(r[2] for r in rows), sum(r[3] for r in rows)
            lines.append(f"  {part}: {8 * b / max(1, w):.2f} bits/weight, {w / total_w:.1%} of the weights, "
                         f"{b / max(1, self.data_bytes):.1%} of the bytes")
            kinds: dict[tuple[str, str], list[int]] = {}
            for _, qtype, n, nbytes, why in rows:
                k = kinds.setdefault((qtype, why), [0, 0, 0])
                k[0], k[1], k[2] = k[0] + 1, k[1] + n, k[2] + nbytes
            for (qtype, why), (count, n, nbytes) in sorted(kinds.items(), key=lambda kv: -kv[1][2]):
                lines.append(f"    {qtype} x{count} ({8 * nbytes / max(1, n):.2f} bits/weight, {n / total_w:.1%} "
                             f"of the weights): {why}")
        return lines


def _part(name: str, num_weights: int) -> str:
    if name.startswith("blk.") and not name.endswith("norm.weight") and num_weights > 1 << 12:
        return "block matrices (attention and MLP)"
    if name.startswith(("token_embd", "output.")) and not name.endswith("norm.weight"):
        return "token embedding and output head"
    return "norms and other small tensors"


def parse_tensor_types(specs: list[str] | None) -> list[tuple[str, str]]:
    """`PATTERN=TYPE` strings (llama.cpp's --tensor-type) -> (glob pattern, GGML type). PATTERN is a shell glob
    over llama.cpp tensor names, with or without the trailing `.weight` (`blk.*.ffn_down`, `output`)."""
    out = []
    for spec in specs or []:
        pattern, sep, qtype = spec.rpartition("=")
        if not sep or not pattern or qtype.upper() not in OVERRIDE_TYPES:
            raise InvalidRequestError(f"--tensor-type {spec!r}: write PATTERN=TYPE, e.g. blk.*.ffn_down=q6_k, "
                                      f"TYPE one of {', '.join(t.lower() for t in OVERRIDE_TYPES)}",
                                      param="tensor_type")
        out.append((pattern, qtype.upper()))
    return out


def _override(name: str, shape: tuple[int, ...], qtype: str, why: str,
              overrides: list[tuple[str, str]]) -> tuple[str, str]:
    """The last matching --tensor-type wins; 1-D tensors and norms stay F32; rows that do not split into blocks
    fall back as in formats.tensor_type_why."""
    if qtype == "F32" and (len(shape) < 2 or name.endswith("norm.weight")):
        return qtype, why
    for pattern, t in overrides:
        if fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name.removesuffix(".weight"), pattern):
            qtype, why = t, f"--tensor-type {pattern}={t.lower()}"
    cols = shape[-1]
    if qtype in _K_FALLBACK and cols % QK_K:
        why, qtype = f"{why}, but rows of {cols} values fall back to {_K_FALLBACK[qtype]}", _K_FALLBACK[qtype]
    if qtype not in ("F32", "F16") and cols % 32:
        qtype, why = "F16", f"rows of {cols} values do not split into 32-value blocks: F16"
    return qtype, why


def relative_error(data: np.ndarray, packed: np.ndarray, qtype: str) -> float:
    """||W - dequantize(quantize(W))|| / ||W||, the per-tensor error `hearth quantize` ranks tensors by."""
    import gguf

    if qtype == "F32":
        return 0.0
    deq = np.asarray(gguf.quants.dequantize(packed, gguf.GGMLQuantizationType[qtype]), np.float32)
    w = np.asarray(data, np.float32).reshape(-1)
    return float(np.linalg.norm(deq.reshape(-1) - w) / max(float(np.linalg.norm(w)), 1e-30))


def quantize_model(model: Path, target: str, out: Path,
                   progress: Callable[[int, int, str, str], None] | bool | None = None,
                   tensor_types: list[tuple[str, str]] | None = None,
                   measure_error: bool = False) -> QuantizeReport:
    """Write `model` (HF directory or .gguf) as a GGUF of `target` (a key of TARGETS) to `out`.
    tensor_types: (glob, GGML type) overrides (parse_tensor_types); measure_error: fill report.errors.
    progress: a callback (index, count, tensor name, GGML type) before each tensor, or a bar on stderr per tensor
    (True/False/None as hearthlm.progress: None = on a terminal, after a second). `report.breakdown()` says why
    the file has its bits per weight."""
    from ..progress import bar
    import gguf

    start = time.perf_counter()
    if target not in TARGETS:
        raise InvalidRequestError(f"unknown target {target!r}: choose one of {', '.join(TARGETS)}", param="to")
    if out.exists() and model.exists() and out.resolve() == model.resolve():
        raise InvalidRequestError(f"output {out} is the input model: choose another -o path", param="output")
    tgt = TARGETS[target]
    src = open_source(model)
    names = {t.name for t in src.tensors}
    tied = "output.weight" not in names
    whys = [tensor_type_why(t.name, t.shape, tgt, src.n_layers, tied) for t in src.tensors]
    if tensor_types:
        whys = [_override(t.name, t.shape, q, why, tensor_types) for t, (q, why) in zip(src.tensors, whys)]
    plan = [(t, qtype) for t, (qtype, _) in zip(src.tensors, whys)]
    tmp = out.with_name(out.name + ".part")
    writer = gguf.GGUFWriter(tmp, src.arch)
    report = QuantizeReport(out, target, src.arch)
    try:
        src.write_metadata(writer)
        writer.add_file_type(int(gguf.LlamaFileType[tgt.file_type]))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for (t, qtype), (_, why) in zip(plan, whys):
            nbytes = type_nbytes(qtype, t.shape)
            report.tensors.append((t.name, qtype, int(gguf.np.prod(t.shape)), nbytes, why))
            writer.add_tensor_info(t.name, t.shape, gguf.np.dtype("float32"), nbytes,
                                   raw_dtype=gguf.GGMLQuantizationType[qtype])
            report.types[qtype] += 1
            report.num_weights += int(gguf.np.prod(t.shape))
            report.data_bytes += nbytes
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        ticks = bar(len(plan), f"quantizing to {target}", "tensor", False if callable(progress) else progress)
        try:
            for i, (t, qtype) in enumerate(plan):
                if callable(progress):
                    progress(i, len(plan), t.name, qtype)
                ticks.set_postfix_str(f"{t.name} -> {qtype}", refresh=False)
                data = t.load()
                packed = quantize_array(data, qtype)
                if measure_error:
                    report.errors[t.name] = relative_error(data, packed, qtype)
                writer.write_tensor_data(packed)
                ticks.update(1)
        finally:
            ticks.close()
        writer.close()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            writer.close()
            tmp.unlink()
    report.seconds = time.perf_counter() - start
    return report
