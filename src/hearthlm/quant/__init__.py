"""GGUF quantization (`hearth quantize`) and sliding-window perplexity (`hearth perplexity`)."""
from .formats import TARGETS, tensor_type
from .kquants import quantize_k
from .perplexity import PerplexityResult, perplexity, perplexity_llm, plan_windows, window_logits
from .writer import QuantizeReport, quantize_model

__all__ = ["TARGETS", "PerplexityResult", "QuantizeReport", "perplexity", "perplexity_llm", "plan_windows",
           "quantize_k", "quantize_model", "tensor_type", "window_logits"]
