"""hearthlm: local-first LLM inference and serving."""
from .engine.sequence import CompletionOutput, RequestOutput
from .llm import LLM
from .sampling import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"
