"""hearthlm: local-first LLM inference and serving."""
from __future__ import annotations

from .runtime.threads import set_wait_policy as _set_wait_policy

_set_wait_policy()  # before torch loads libgomp: bounded OpenMP spin-waits, unless set (runtime/threads.py)

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for type checkers and IDEs; at runtime these load on first use (they import torch)
    from .engine.sequence import CompletionOutput, RequestOutput
    from .llm import LLM
    from .sampling import SamplingParams, StructuredOutput

__all__ = ["LLM", "SamplingParams", "StructuredOutput", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"

# public name -> submodule that defines it; imported lazily (PEP 562) so `import hearthlm` and the
# metadata-only CLI commands (list, show, ps, plan) do not pay for torch
_LAZY = {"LLM": ".llm", "SamplingParams": ".sampling", "StructuredOutput": ".sampling", "RequestOutput": ".engine.sequence",
         "CompletionOutput": ".engine.sequence"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
