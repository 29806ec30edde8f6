"""Structured outputs: grammars compiled by xgrammar, enforced as per-row token masks in the sampler.

One `Grammars` per engine holds the tokenizer's vocabulary as xgrammar sees it and a cache of compiled grammars
keyed by StructuredOutput.key (a schema compiles once, whichever request sends it). Each sequence with a grammar
owns a `GrammarState` (an xgrammar matcher): the sampler fills its row of a bitmask from it before sampling
(runtime/sampler.py) and the engine advances it with each token appended to the sequence (engine.py), so its state
always matches the sequence's output: recompute preemption keeps the output and the matcher alike, abort drops
both. Requests with a grammar sample on the host side (needs_host_sampling), so no step is in flight with a token
the matcher has not seen; on CUDA the mask is filled on the host while the device still runs the step.

xgrammar is imported on the first structured request only (it costs seconds of start-up)."""
from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import torch

from ..errors import InvalidRequestError
from ..sampling import StructuredOutput

if TYPE_CHECKING:
    from ..loader.tokenizer import Tokenizer

CACHE_GRAMMARS = 256  # compiled grammars kept per engine (LRU)
JSON_SEPARATORS = (", ", ": ")  # JSON is generated on one line with these separators (no free whitespace)


def _xgr():
    import xgrammar

    return xgrammar


class GrammarState:
    """One sequence's position in its grammar."""

    __slots__ = ("matcher",)

    def __init__(self, matcher: Any):
        self.matcher = matcher

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token: int) -> bool:
        """Advance by one sampled token; False when the grammar cannot take it (the request then fails)."""
        return bool(self.matcher.accept_token(int(token)))

    @property
    def terminated(self) -> bool:
        """The grammar is complete and its stop token was accepted."""
        return bool(self.matcher.is_terminated())


class Grammars:
    """Compiles StructuredOutputs for one tokenizer and vocabulary (logits width); thread-safe."""

    def __init__(self, tokenizer: "Tokenizer", vocab_size: int):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._compiler = None
        self._cache: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def compiler(self):
        with self._lock:
            if self._compiler is None:
                xgr = _xgr()
                info = xgr.TokenizerInfo(self._vocab(), xgr.VocabType.RAW, vocab_size=self.vocab_size,
                                         stop_token_ids=list(self.tokenizer.eos_token_ids) or None)
                self._compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
            return self._compiler

    def _vocab(self) -> list[bytes]:
        """Each token's bytes; special and added control tokens are empty, which xgrammar never lets a grammar
        emit (only the stop tokens end the output)."""
        tok = self.tokenizer
        n = min(tok.vocab_size, self.vocab_size)
        special = set(tok.all_special_ids) | set(tok.eos_token_ids)
        return [b"" if i in special else tok.token_bytes(i) for i in range(n)]

    def compile(self, spec: StructuredOutput) -> Any:
        """The compiled grammar of spec (cached). A spec xgrammar rejects is a 400 naming `structured`."""
        key = spec.key
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        compiler = self.compiler
        try:
            compiled = self._compile(compiler, spec)
        except InvalidRequestError:
            raise
        except Exception as e:  # noqa: BLE001 - xgrammar reports bad schemas / regexes / grammars as exceptions
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InvalidRequestError(f"structured.{spec.kind} could not be compiled: {msg[:300]}",
                                      param="structured") from None
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > CACHE_GRAMMARS:
                self._cache.popitem(last=False)
        return compiled

    @staticmethod
    def _compile(compiler: Any, spec: StructuredOutput) -> Any:
        kind = spec.kind
        if kind == "json":
            schema = {"type": "object"} if spec.json is True else spec.json
            return compiler.compile_json_schema(json.dumps(schema), any_whitespace=False,
                                                separators=JSON_SEPARATORS, strict_mode=True)
        if kind == "regex":
            return compiler.compile_regex(spec.regex)
        if kind == "grammar":
            return compiler.compile_grammar(spec.grammar)
        return compiler.compile_grammar("root ::= " + " | ".join(json.dumps(c, ensure_ascii=False)
                                                                 for c in spec.choice))

    def state(self, compiled: Any, stop_ids: list[int]) -> GrammarState:
        """A fresh matcher over a compiled grammar (compile's) for one sequence; stop_ids end the output once the
        grammar is complete."""
        stops = [t for t in stop_ids if 0 <= t < self.vocab_size] or None
        return GrammarState(_xgr().GrammarMatcher(compiled, override_stop_tokens=stops))


def grammar_bitmask(states: list[GrammarState | None], vocab: int) -> torch.Tensor | None:
    """The rows' next-token bitmask on the host ([R, ceil(V / 32)] int32), or None when no row has a grammar."""
    if all(s is None for s in states):
        return None
    bitmask = _xgr().allocate_token_bitmask(len(states), vocab)
    for i, s in enumerate(states):
        if s is not None:
            s.fill(bitmask, i)
    return bitmask


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, states: list[GrammarState | None]) -> None:
    """-inf, in place, at every token a row's grammar does not allow next (logits: [R, V])."""
    rows = [i for i, s in enumerate(states) if s is not None]
    if logits.device.type != "cpu":
        bitmask = bitmask.to(logits.device, non_blocking=True)
    _xgr().apply_token_bitmask_inplace(logits, bitmask, vocab_size=logits.shape[1], indices=rows)
