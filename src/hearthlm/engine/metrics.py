"""Engine counters, the per-request log line and periodic engine stats (vLLM-style)."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

log = logging.getLogger("hearthlm")


@dataclass
class EngineStats:
    prompt_tokens: int = 0  # computed this process (prefill), cache hits excluded
    generation_tokens: int = 0
    requests_finished: int = 0
    requests_aborted: int = 0
    steps: int = 0
    busy_seconds: float = 0.0
    interval_s: float = 10.0
    _last_log: float = field(default_factory=time.monotonic)
    _last_prompt: int = 0
    _last_gen: int = 0

    def step(self, batch, seconds: float) -> None:
        self.steps += 1
        self.busy_seconds += seconds
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            if seq.num_computed_tokens + n >= seq.num_tokens and (seq.output_ids or seq.pending.count):
                self.generation_tokens += 1
                self.prompt_tokens += n - 1
            else:
                self.prompt_tokens += n

    def finished(self, state, aborted: bool = False, log_line: bool = True) -> None:
        """Count a finished request; log its line unless the caller logs one for a group (embeddings inputs)."""
        if aborted:
            self.requests_aborted += 1
        else:
            self.requests_finished += 1
        if not log_line:
            return
        now = time.monotonic()
        completion = sum(len(s.output_ids) for s in state.seqs)
        ttft = (state.first_token_time - state.arrival) if state.first_token_time else None
        gen_time = now - (state.first_token_time or now)
        tps = (completion - len(state.seqs)) / gen_time if gen_time > 0 else 0.0
        reasons = ",".join(str(s.result.finish_reason) for s in state.seqs)
        log.info("request id=%s prompt_tokens=%d completion_tokens=%d cached_tokens=%d ttft_ms=%s tok_s=%.1f "
                 "finish=%s", state.request_id, len(state.prompt_ids), completion, state.seqs[0].num_cached_tokens,
                 f"{ttft * 1000:.1f}" if ttft is not None else "-", tps, reasons)

    def maybe_log(self, engine, force: bool = False) -> None:
        now = time.monotonic()
        dt = now - self._last_log
        if not force and dt < self.interval_s:
            return
        s = engine.scheduler
        log.info("engine running=%d waiting=%d kv_usage=%.1f%% prefix_hit=%.1f%% prompt_tok_s=%.1f gen_tok_s=%.1f "
                 "preemptions=%d", len(s.running), len(s.waiting), 100 * engine.kv.usage,
                 100 * engine.kv.prefix_hit_rate, (self.prompt_tokens - self._last_prompt) / max(dt, 1e-9),
                 (self.generation_tokens - self._last_gen) / max(dt, 1e-9), s.num_preemptions)
        self._last_log, self._last_prompt, self._last_gen = now, self.prompt_tokens, self.generation_tokens
