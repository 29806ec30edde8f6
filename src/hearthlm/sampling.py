"""SamplingParams: what a request asks of the sampler, validated up front."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from .errors import InvalidRequestError

MAX_INT32 = 2**31 - 1
MAX_N = 128
MAX_LOGPROBS = 20
MAX_STOPS = 16
MAX_STOP_CHARS = 4096
MAX_STOP_TOKEN_IDS = 1024
MAX_TEMPERATURE = 1e4
MAX_LOGIT_BIAS = 1024  # entries of logit_bias (each a token id)
LOGIT_BIAS_RANGE = 100.0  # OpenAI's: -100 bans a token, +100 all but forces it
# Below this temperature sampling is greedy (vLLM's _SAMPLING_EPS): logits / T would overflow float32 to inf and
# softmax would turn them into NaN (T <= ~1e-37 emitted token 0 forever)
GREEDY_TEMPERATURE = 1e-5
MAX_GRAMMAR_CHARS = 256 * 1024  # a JSON schema (as JSON text), regex or EBNF grammar
MAX_CHOICES = 1024


@dataclass(frozen=True)
class StructuredOutput:
    """Constrain a request's output to a grammar (compiled by xgrammar, enforced as a token mask in the sampler).
    Exactly one field is set:
    json: a JSON schema (a dict, or its JSON text), or True for any JSON object (OpenAI's json_object mode);
    regex: a regular expression the whole output matches;
    grammar: an EBNF grammar (xgrammar's dialect, which reads GBNF) whose rule `root` is the output;
    choice: the output is exactly one of these strings."""

    json: dict | str | bool | None = None
    regex: str | None = None
    grammar: str | None = None
    choice: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.choice, list):
            object.__setattr__(self, "choice", tuple(self.choice))
        if isinstance(self.json, str):  # schema text -> a dict (one cache key per schema, whatever its spacing)
            try:
                object.__setattr__(self, "json", json.loads(self.json))
            except ValueError as e:
                raise InvalidRequestError(f"structured.json is not valid JSON: {e}", param="structured") from None
        set_ = [k for k in ("json", "regex", "grammar", "choice") if getattr(self, k) not in (None, False)]
        if len(set_) != 1:
            raise InvalidRequestError("structured must set exactly one of json, regex, grammar or choice, got "
                                      f"{', '.join(set_) or 'none'}", param="structured")
        kind = set_[0]
        value = getattr(self, kind)
        if kind == "json" and not (value is True or isinstance(value, dict)):
            raise InvalidRequestError(f"structured.json must be a JSON schema object or true, got {_kind(value)}",
                                      param="structured")
        if kind in ("regex", "grammar") and (not isinstance(value, str) or not value.strip()):
            raise InvalidRequestError(f"structured.{kind} must be a non-empty string", param="structured")
        if kind == "choice" and (not value or len(value) > MAX_CHOICES
                                 or any(not isinstance(c, str) or not c for c in value)):
            raise InvalidRequestError(f"structured.choice must be 1 to {MAX_CHOICES} non-empty strings",
                                      param="structured")
        if len(self.key[1]) > MAX_GRAMMAR_CHARS:
            raise InvalidRequestError(f"structured.{kind} is longer than {MAX_GRAMMAR_CHARS:,} characters",
                                      param="structured")

    @property
    def kind(self) -> str:
        return next(k for k in ("json", "regex", "grammar", "choice") if getattr(self, k) not in (None, False))

    @property
    def key(self) -> tuple[str, str]:
        """(kind, canonical text): the compiled-grammar cache key."""
        kind = self.kind
        value = getattr(self, kind)
        if kind == "json":
            return kind, "true" if value is True else json.dumps(value, sort_keys=True, separators=(",", ":"))
        if kind == "choice":
            return kind, json.dumps(list(value))
        return kind, value

    @classmethod
    def coerce(cls, value: object) -> "StructuredOutput | None":
        """None, a StructuredOutput, or a dict of its fields ({"json": schema}, {"regex": "..."})."""
        if value is None or isinstance(value, StructuredOutput):
            return value
        if isinstance(value, dict):
            unknown = set(value) - {"json", "regex", "grammar", "choice"}
            if unknown:
                raise InvalidRequestError(f"structured has unknown field(s) {', '.join(sorted(map(str, unknown)))}: "
                                          "use json, regex, grammar or choice", param="structured")
            return cls(**value)
        raise InvalidRequestError(f"structured must be a StructuredOutput or an object, got {_kind(value)}",
                                  param="structured")


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_k: int = -1  # -1 / 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None  # top-n logprobs per generated token (0 = only the chosen token)
    skip_special_tokens: bool = True
    truncate: str | None = None  # None | "left"
    # token id -> a value in [-100, 100] added to its logit before sampling (OpenAI's logit_bias; JSON's string
    # keys are read as ids); logprobs stay the model's
    logit_bias: dict[int, float] | None = None
    # the output follows a grammar (JSON schema, regex, EBNF, choice); see StructuredOutput
    structured: StructuredOutput | None = None

    def __post_init__(self) -> None:
        self.structured = StructuredOutput.coerce(self.structured)
        self.stop = _as_list(self.stop, "stop", "a string or a list of strings", single=str)
        self.stop_token_ids = _as_list(self.stop_token_ids, "stop_token_ids", "a list of token ids")
        self.logit_bias = _token_map(self.logit_bias, "logit_bias")
        self.validate()

    def validate(self, vocab_size: int | None = None) -> None:
        """Check every field's type and range; with vocab_size, also the token-id fields against the vocabulary.
        Every message starts with the field's name (dialects rename it, see `renamed`)."""
        def bad(msg: str, param: str) -> None:
            raise InvalidRequestError(msg, param=param)

        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_number(v) or not math.isfinite(v):
                bad(f"{name} must be a finite number, got {_show(v)}", name)
        for name, lo, hi in (("n", 1, MAX_N), ("top_k", -1, MAX_INT32), ("min_tokens", 0, MAX_INT32)):
            v = getattr(self, name)
            if not _is_int(v) or not lo <= v <= hi:
                bad(f"{name} must be an integer in [{lo}, {hi}], got {_show(v)}", name)
        if self.temperature < 0 or self.temperature > MAX_TEMPERATURE:
            bad(f"temperature must be in [0, {MAX_TEMPERATURE:g}] (below 1e-5 = greedy), got {self.temperature}", "temperature")
        if not 0 < self.top_p <= 1:
            bad(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if not 0 <= self.min_p <= 1:
            bad(f"min_p must be in [0, 1], got {self.min_p}", "min_p")
        if vocab_size is not None and self.top_k > vocab_size:
            bad(f"top_k must be -1 or 0 (off) or at most the vocabulary size {vocab_size:,}, got {self.top_k:,}",
                "top_k")
        if self.repetition_penalty <= 0:
            bad(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}", "repetition_penalty")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                bad(f"{name} must be in [-2, 2], got {getattr(self, name)}", name)
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or not 1 <= self.max_tokens <= MAX_INT32):
            bad(f"max_tokens must be a positive integer (at most {MAX_INT32:,}), got {_show(self.max_tokens)}",
                "max_tokens")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad(f"min_tokens ({self.min_tokens:,}) must not exceed max_tokens ({self.max_tokens:,})", "min_tokens")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            bad(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {_show(self.logprobs)}", "logprobs")
        if self.seed is not None and (not _is_int(self.seed) or not -2**63 <= self.seed < 2**64):
            bad(f"seed must be an integer that fits in 64 bits, got {_show(self.seed)}", "seed")
        if not isinstance(self.stop, list) or any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop must be a non-empty string or a list of non-empty strings", "stop")
        if len(self.stop) > MAX_STOPS:
            bad(f"stop: at most {MAX_STOPS} stop strings are allowed, got {len(self.stop)}", "stop")
        if any(len(s) > MAX_STOP_CHARS for s in self.stop):
            bad(f"stop strings must be at most {MAX_STOP_CHARS:,} characters long", "stop")
        if not isinstance(self.stop_token_ids, list) or len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            bad(f"stop_token_ids must be a list of at most {MAX_STOP_TOKEN_IDS} token ids", "stop_token_ids")
        hi = vocab_size if vocab_size is not None else MAX_INT32 + 1
        for t in self.stop_token_ids:
            if not _is_int(t) or not 0 <= t < hi:
                bad(f"stop_token_ids must be token ids in [0, {hi:,}), got {_show(t)}", "stop_token_ids")
        for name in ("include_stop_str_in_output", "ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                bad(f"{name} must be true or false, got {_show(getattr(self, name))}", name)
        if self.truncate not in (None, "left"):
            bad(f"truncate must be None or 'left', got {_show(self.truncate)}", "truncate")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict) or len(self.logit_bias) > MAX_LOGIT_BIAS:
                bad(f"logit_bias must map at most {MAX_LOGIT_BIAS} token ids to values", "logit_bias")
            for t, v in self.logit_bias.items():
                if not _is_int(t) or not 0 <= t < hi:
                    bad(f"logit_bias keys must be token ids in [0, {hi:,}), got {_show(t)}", "logit_bias")
                if not _is_number(v) or not -LOGIT_BIAS_RANGE <= v <= LOGIT_BIAS_RANGE:
                    bad(f"logit_bias values must be numbers in [-100, 100], got {_show(v)} for token {t}",
                        "logit_bias")

        if self.structured is not None and self.min_tokens:
            bad("min_tokens cannot be combined with structured output (the grammar decides where the output ends)",
                "min_tokens")

    @property
    def greedy(self) -> bool:
        """Argmax instead of a draw: temperature below GREEDY_TEMPERATURE (0 included)."""
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 \
            or bool(self.logit_bias)


def _as_list(value: object, name: str, what: str, single: type | None = None) -> list:
    """None -> [], a list or tuple -> a list, a lone `single` -> [value]; anything else is a 400 naming the field."""
    if value is None:
        return []
    if single is not None and isinstance(value, single):
        return [value]
    if isinstance(value, (list, tuple)):
        return list(value)
    raise InvalidRequestError(f"{name} must be {what}, got {_kind(value)}", param=name)


def _token_map(value: object, name: str) -> dict | None:
    """None / {} -> None; a dict whose keys are ints or decimal strings (JSON object keys) -> keys as ints (the
    values are checked by validate); anything else is a 400 naming the field."""
    if value is None or value == {}:
        return None
    if not isinstance(value, dict):
        raise InvalidRequestError(f"{name} must be an object mapping token ids to numbers, got {_kind(value)}",
                                  param=name)
    out = {}
    for k, v in value.items():
        if isinstance(k, str) and k.strip().isdigit():
            k = int(k)
        if not _is_int(k):
            raise InvalidRequestError(f"{name} keys must be token ids, got {_show(k)}", param=name)
        out[k] = v
    return out


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _kind(v: object) -> str:
    return f"{type(v).__name__} {_show(v)}"


def _show(v: object, limit: int = 60) -> str:
    """repr(v), shortened for error messages (a value may be megabytes long)."""
    text = repr(v) if not isinstance(v, int) or abs(v) < 10**30 else f"an integer of {len(str(abs(v)))} digits"
    return text if len(text) <= limit else text[:limit] + "..."


def renamed(err: InvalidRequestError, names: dict[str, str]) -> InvalidRequestError:
    """The same error with a SamplingParams field named as a dialect spells it (top_k -> options.top_k)."""
    wire = names.get(err.param or "")
    if wire is None:
        return err
    msg = str(err)
    if msg.startswith(err.param):
        msg = wire + msg[len(err.param):]
    else:
        msg = f"{wire}: {msg}"
    new = type(err).__new__(type(err))
    InvalidRequestError.__init__(new, msg, param=wire)
    return new
