"""`quantize_model`: read a model (HF dir or GGUF), write a GGUF of the chosen target, one tensor at a time."""
from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InvalidRequestError
from .formats import TARGETS, quantize_array, tensor_type_why, type_nbytes
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


def quantize_model(model: Path, target: str, out: Path,
                   progress: Callable[[int, int, str, str], None] | bool | None = None) -> QuantizeReport:
    """Write `model` (HF directory or .gguf) as a GGUF of `target` (a key of TARGETS) to `out`.
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
                writer.write_tensor_data(quantize_array(t.load(), qtype))
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
