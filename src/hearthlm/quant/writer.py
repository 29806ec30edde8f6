"""`quantize_model`: read a model (HF dir or GGUF), write a GGUF of the chosen target, one tensor at a time."""
from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InvalidRequestError
from .formats import TARGETS, quantize_array, tensor_type, type_nbytes
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

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.data_bytes / max(1, self.num_weights)


def quantize_model(model: Path, target: str, out: Path,
                   progress: Callable[[int, int, str, str], None] | None = None) -> QuantizeReport:
    """Write `model` (HF directory or .gguf) as a GGUF of `target` (a key of TARGETS) to `out`."""
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
    plan = [(t, tensor_type(t.name, t.shape, tgt, src.n_layers, tied)) for t in src.tensors]
    tmp = out.with_name(out.name + ".part")
    writer = gguf.GGUFWriter(tmp, src.arch)
    report = QuantizeReport(out, target, src.arch)
    try:
        src.write_metadata(writer)
        writer.add_file_type(int(gguf.LlamaFileType[tgt.file_type]))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for t, qtype in plan:
            nbytes = type_nbytes(qtype, t.shape)
            writer.add_tensor_info(t.name, t.shape, gguf.np.dtype("float32"), nbytes,
                                   raw_dtype=gguf.GGMLQuantizationType[qtype])
            report.types[qtype] += 1
            report.num_weights += int(gguf.np.prod(t.shape))
            report.data_bytes += nbytes
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for i, (t, qtype) in enumerate(plan):
            if progress:
                progress(i, len(plan), t.name, qtype)
            writer.write_tensor_data(quantize_array(t.load(), qtype))
        writer.close()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            writer.close()
            tmp.unlink()
    report.seconds = time.perf_counter() - start
    return report
