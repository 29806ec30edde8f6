"""`hearth quantize`'s quality guard: perplexity of the source and of the quantized file on one text.

The text: `--eval-file`, or the built-in one -- the English prose of the Python documentation that every Python
install ships (`pydoc_data.topics`, topics in sorted key order), cut at `tokens` tokens. Both models run in
float32 on the CPU through the engine's runner (perplexity.py) over disjoint windows of `ctx` tokens, so the
change measures the weights alone. When the change is too large, tensors are ranked by their relative
quantization error ||W - deq(Q(W))|| / ||W|| (measured while writing, no extra model pass), grouped by kind
(`blk.*.ffn_down`), and the worst kinds are named with a higher-bit `--tensor-type` to try.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from ..errors import HearthError, InvalidRequestError
from .perplexity import PerplexityResult, perplexity, perplexity_llm

DEFAULT_TOKENS = 2048
DEFAULT_CTX = 512
# one step up per type, for the suggestion (K-quants and the legacy types move to Q6_K / Q8_0)
_HIGHER = {"Q4_0": "q6_k", "Q4_1": "q6_k", "Q5_0": "q8_0", "Q5_1": "q8_0", "Q4_K": "q6_k", "Q5_K": "q6_k",
           "Q6_K": "q8_0", "Q8_0": "f16"}
# what a load raises for a model this engine cannot run here (family, format, memory)
_CANNOT_RUN = (HearthError, NotImplementedError, KeyError, ValueError, RuntimeError, MemoryError)


def builtin_text() -> str:
    """The built-in evaluation text: pydoc_data.topics in sorted key order (deterministic for a Python version)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def quantized_tensors(model: Path) -> list[str]:
    """Names of the tensors of a .gguf `model` stored in a quantized type (none for directories / F32 / F16)."""
    if not model.is_file():
        return []
    import gguf

    from ..loader.gguf_header import GGUFFile

    plain = {"F32", "F16", "BF16", "F64"}
    return [n for n, t in GGUFFile(model).tensors.items() if gguf.GGMLQuantizationType(t.ggml_type).name not in plain]


class GuardUnavailable(HearthError):
    """The guard cannot evaluate this model here (family the engine does not run, too little memory, ...)."""


@dataclass
class Evaluator:
    """The source model loaded once; `ids` the evaluation tokens (its tokenizer)."""

    llm: object
    ids: list[int]
    ctx: int

    @classmethod
    def load(cls, model: Path, text: str, tokens: int = DEFAULT_TOKENS, ctx: int = DEFAULT_CTX,
             progress: bool | None = None) -> Evaluator:
        if tokens < 2:
            raise InvalidRequestError(f"--eval-tokens must be >= 2, got {tokens}", param="eval_tokens")
        ctx = max(2, min(ctx, tokens))
        try:
            llm = perplexity_llm(str(model), ctx, progress=progress)
        except _CANNOT_RUN as e:
            raise GuardUnavailable(f"the quality check cannot run this model here ({e})") from e
        ids = llm.tokenizer.encode(text)[:tokens]
        if len(ids) < 2:
            raise InvalidRequestError("the evaluation text has fewer than 2 tokens: give a longer --eval-file",
                                      param="eval_file")
        return cls(llm, ids, ctx)

    def ppl(self, llm=None, progress: bool | None = None) -> PerplexityResult:
        """Perplexity over disjoint windows of ctx tokens (each token evaluated once)."""
        return perplexity(llm or self.llm, self.ids, self.ctx, stride=self.ctx, progress=progress)

    def ppl_of(self, path: Path, progress: bool | None = None) -> PerplexityResult:
        """Perplexity of another model file with the same tokenizer (the quantized result)."""
        try:
            llm = perplexity_llm(str(path), self.ctx, progress=progress)
        except _CANNOT_RUN as e:
            raise GuardUnavailable(f"the quality check cannot run the quantized file ({e})") from e
        self.llm = None  # the source's weights are no longer needed: free them before the second copy runs
        return self.ppl(llm, progress)


def kind(name: str) -> str:
    """blk.3.ffn_down.weight -> blk.*.ffn_down; output.weight -> output."""
    parts = name.removesuffix(".weight").split(".")
    if parts[0] == "blk" and len(parts) > 2:
        return "blk.*." + ".".join(parts[2:])
    return ".".join(parts)


def worst_kinds(errors: dict[str, float], types: dict[str, str], n: int = 3) -> list[tuple[str, float, str]]:
    """(kind glob, mean relative error, GGML type most of it has) of the `n` kinds with the largest mean relative
    quantization error, largest first (F32 tensors excluded)."""
    groups: dict[str, list[str]] = defaultdict(list)
    for name, err in errors.items():
        if types.get(name) not in (None, "F32"):
            groups[kind(name)].append(name)
    ranked = sorted(groups.items(), key=lambda kv: -sum(errors[x] for x in kv[1]) / len(kv[1]))[:n]
    out = []
    for k, names in ranked:
        ts = [types[x] for x in names]
        out.append((k, sum(errors[x] for x in names) / len(names), max(set(ts), key=ts.count)))
    return out


def suggestion(worst: list[tuple[str, float, str]]) -> str:
    """`--tensor-type` flags that raise each worst kind one step (empty when none can go higher)."""
    flags = [f"--tensor-type '{k}={_HIGHER[t]}'" for k, _, t in worst if t in _HIGHER]
    return " ".join(flags)


__all__ = ["DEFAULT_CTX", "DEFAULT_TOKENS", "Evaluator", "GuardUnavailable", "builtin_text", "kind",
           "quantized_tensors", "suggestion", "worst_kinds"]
