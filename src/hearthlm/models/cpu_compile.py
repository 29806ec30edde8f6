"""Opt-in torch.compile of the CPU decode step: `--compile` or LLM(cpu_compile=True)
(CacheConfig.cpu_compile).

Decode-only steps on the CPU run the layer stack and the final norm as one inductor graph (C++ backend): the small
ops between the opaque calls fuse into a few loops a layer (norm formula + bf16 cast, RoPE + KV write, SiLU * up,
residual adds), while the int4 and oneDNN matmuls, the decode attention (an opaque op, layers/attention.py) and
the norms' row sums (layers/norm.py) stay ATen calls, so every value is bit for bit the eager path's
(tests/test_cpu_compile.py). The embedding, RoPE's cos/sin, prefill and mixed steps, and Gemma 2 run eagerly.
Graphs: 1 row (dynamo specializes it), and one per matmul regime of the row count (Int4Weight.dense_min_rows) with
symbolic rows and context length; each compiles on first use and is cached on disk by inductor
(TORCHINDUCTOR_CACHE_DIR). Compile times and the decode speed-up: BENCHMARKS.md.
"""
from __future__ import annotations

import itertools
import logging
import types

import torch

from ..errors import InvalidRequestError

log = logging.getLogger("hearthlm")

_ids = itertools.count()


def check_available() -> None:
    """Raise InvalidRequestError unless torch.compile can build CPU kernels here (inductor + a C++ compiler)."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as e:  # ImportError, inductor's InvalidCxxCompiler
        raise InvalidRequestError(f"--compile (cpu_compile=True) needs torch inductor and a C++ compiler, which "
                                  f"failed here ({type(e).__name__}: {e}): install g++ (or set CXX), or drop "
                                  "--compile", param="cpu_compile") from None


def _decode_layers(model, h: torch.Tensor, meta, kv_caches: list) -> torch.Tensor:
    # h: [num_tokens, hidden] -> final-normed hidden [num_tokens, hidden]; meta: the torch backend's metadata
    for layer, kv in zip(model.layers, kv_caches):
        h, _ = layer.forward(h, None, meta, kv)
    return model.layers[-1].norm(h, model.final_norm)


def _skip_model_guards(entries) -> list[bool]:
    """Drop dynamo's guards on the model (a few hundred weights and constants, checked every step); the model never
    changes after loading, and each CpuDecodeGraph compiles its own copy of the code (see __init__)."""
    return [not (e.name == "model" or e.name.startswith(("model.", "model[")) or "(model." in e.name)
            for e in entries]


class CpuDecodeGraph:
    """The compiled decode step of one model (CPU, nothing offloaded)."""

    def __init__(self, model):
        check_available()
        self.model = model
        # dynamo caches compiled code per code object: a private copy keeps this model's entries, whose guards skip
        # the model, from ever being tried for another model's calls
        fn = _decode_layers
        code = fn.__code__.replace(co_name=f"cpu_decode_{next(_ids)}")
        fn = types.FunctionType(code, fn.__globals__, code.co_name)
        # inductor's runtime asserts on input sizes and strides cost a visible share of a batch-1 step; the inputs
        # are the model's own tensors and guarded step tensors
        opts = {"guard_filter_fn": _skip_model_guards, "size_asserts": False, "alignment_asserts": False,
                "scalar_asserts": False}
        self._fn = torch.compile(fn, fullgraph=True, dynamic=False, options=opts)
        self.steps = 0  # compiled steps run
        self.error: str | None = None  # set when compiling failed: eager steps from then on

    def can_run(self, meta, num_tokens: int) -> bool:
        """A decode-only reference-path step: every group's one sub-batch has one query per sequence."""
        return self.error is None and not meta.use_kernels and all(
            len(gm.sub_batches) == 1 and tuple(gm.sub_batches[0].token_index.shape) == (num_tokens, 1)
            for gm in meta.groups)

    def __call__(self, h: torch.Tensor, meta, kv_caches: list) -> torch.Tensor | None:
        """Final-normed hidden states [num_tokens, hidden], or None if compiling failed (run eagerly)."""
        n = h.shape[0]
        # rows and context length vary from step to step: symbolic sizes, so that one graph serves them all
        # (dynamo still specializes 1 row, and the matmuls' row-count regimes guard on it)
        dyn = torch._dynamo.maybe_mark_dynamic
        for t in (h, meta.cos, meta.sin):
            dyn(t, 0)
        for gm in meta.groups:
            sb = gm.sub_batches[0]
            plan = sb.plan  # (built with the step's metadata: it reads tensor data, outside the graph)
            if plan.mask is None and n > 1:  # one graph for masked and unmasked steps (adding +0.0: same bits)
                plan.mask = torch.zeros(n, 1, 1, sb.key_slots.shape[1], dtype=h.dtype)
            dyn(gm.slot_mapping, 0)
            for t in (plan.slots, plan.key_rows, plan.bag_rows, plan.bag_offsets):
                if t is not None:
                    dyn(t, 0)
            for t in (sb.key_slots, plan.mask):  # [B, L], [B, 1, 1, L]
                if t is not None:
                    dyn(t, 0)
                    dyn(t, t.dim() - 1)
        try:
            out = self._fn(self.model, h, meta, kv_caches)
        except Exception as e:  # inductor/compiler failures: the eager path computes the same step
            self.error = f"{type(e).__name__}: {e}"
            log.warning("compiled CPU decode failed, running eagerly from now on (drop --compile to silence): %s",
                        self.error.splitlines()[0][:500])
            return None
        self.steps += 1
        return out
