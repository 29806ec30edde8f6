"""Sequence state and request outputs."""
from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

from ..sampling import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_seq_ids = itertools.count()


@dataclass
class SeqKV:
    """A sequence's KV blocks: owned by the KVCacheManager (engine/kv_cache.py)."""

    block_tables: list[list[int]] = field(default_factory=list)  # one table per KV group
    block_hashes: list[bytes] = field(default_factory=list)  # SHA-256 chain keys of full known blocks
    num_registered: int = 0  # leading blocks already published to the prefix cache


@dataclass
class SeqPending:
    """Tokens sampled by a launched step whose ids the host has not read yet: owned by the engine's overlapped
    steps (LLMEngine._launch / _finish_step)."""

    count: int = 0
    row: int = -1  # row of the latest pending token among that step's sampled tokens


@dataclass
class SeqResult:
    """How the sequence ended and what it reports: owned by the engine's output processing."""

    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[dict[int, float]] = field(default_factory=list)


@dataclass
class PoolingTask:
    """A sequence that only computes its prompt's hidden states (embeddings): the scheduler batches it with
    generation; the runner returns its rows of each step's final hidden states, collected here in order."""

    all_rows: bool  # the pooling reads every token's state (mean, cls, max); else only the last token's
    chunks: list = field(default_factory=list)  # [n, hidden] float32 host tensors, one per step

    def reset(self) -> None:
        """Recompute preemption: the prompt is computed again from its first token."""
        self.chunks.clear()


@dataclass(eq=False)
class Sequence:
    """One generated continuation. A request with n > 1 owns n sequences sharing its prompt. The scheduler owns
    status, num_computed_tokens and num_preemptions; the other owners' state sits in kv, pending and result."""

    request_id: str
    index: int  # position among the request's n outputs
    prompt_ids: list[int]
    params: SamplingParams
    seed: int  # per-sequence seed: same seed -> same text regardless of batch composition
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    output_ids: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (first schedule)
    num_preemptions: int = 0
    parent: "Sequence | None" = None  # n > 1: siblings start after the first one's prefill
    kv: SeqKV = field(default_factory=SeqKV)
    pending: SeqPending = field(default_factory=SeqPending)
    result: SeqResult = field(default_factory=SeqResult)
    grammar: object = None  # structured output: a runtime.grammar.GrammarState, advanced by the engine
    pooling: PoolingTask | None = None  # an embeddings request: prompt only, no sampling

    @property
    def num_tokens(self) -> int:
        """Tokens the scheduler accounts for, pending ones included."""
        return len(self.prompt_ids) + len(self.output_ids) + self.pending.count

    @property
    def num_known_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def ends_with_pending(self, max_model_len: int) -> bool:
        """The pending token is this sequence's last (length limit): nothing more to schedule."""
        return self.pending.count > 0 and (len(self.output_ids) + self.pending.count >= self.params.max_tokens
                                         or self.num_tokens >= max_model_len)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def is_finished(self) -> bool:
        return self.status == SeqStatus.FINISHED

    @property
    def in_prefill(self) -> bool:
        return self.num_computed_tokens < self.num_tokens - 1


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: str | int | None = None
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0
    truncated_tokens: int = 0  # tokens dropped by truncate="left"
    metrics: dict = field(default_factory=dict)
    error: Exception | None = None  # set when this request alone failed (finished; its stream raises it)
    hidden_states: object = None  # pooling requests: [prompt tokens or 1, hidden] float32 final hidden states
