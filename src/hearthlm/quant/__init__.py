"""Quantization: GGUF quantization (`hearth quantize`), sliding-window perplexity (`hearth perplexity`), the
group-wise weight form the kernels take (group_quant.py) and --quantization's quantizers (weight_quant.py).

The public names load on first use (PEP 562): loading a model imports group_quant without the quantize tools."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .formats import TARGETS, tensor_type
    from .kquants import quantize_k
    from .perplexity import PerplexityResult, perplexity, perplexity_llm, plan_windows, window_logits
    from .writer import QuantizeReport, quantize_model

_WHERE = {"TARGETS": "formats", "tensor_type": "formats", "quantize_k": "kquants", "PerplexityResult": "perplexity",
          "perplexity": "perplexity", "perplexity_llm": "perplexity", "plan_windows": "perplexity",
          "window_logits": "perplexity", "QuantizeReport": "writer", "quantize_model": "writer"}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    mod = importlib.import_module("." + _WHERE[name], __name__)
    for n, where in _WHERE.items():  # all of the module's names: `perplexity` the function, not the submodule
        if where == _WHERE[name]:
            globals()[n] = getattr(mod, n)
    return globals()[name]
