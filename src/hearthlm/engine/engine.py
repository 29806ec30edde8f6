"""The synchronous engine: add requests, step (schedule -> run -> sample -> detokenize -> emit)."""
from __future__ import annotations

import functools
import json
import logging
import os
import random
import time
from dataclasses import dataclass, field, replace

import torch

from ..config import EngineConfig
from ..errors import CapacityError, ContextLengthError, HearthError, InvalidRequestError
from ..loader import LoadedModel, load_model
from ..runtime.grammar import Grammars
from ..runtime.runner import HIDDEN_ALL, HIDDEN_LAST, HIDDEN_NONE, Batch, ModelRunner, StepHandle
from ..runtime.sampler import SampleRequest, needs_host_sampling
from ..sampling import SamplingParams
from .detokenizer import TextState
from .kv_cache import KVCacheManager, kv_group_windows
from .metrics import EngineStats
from .scheduler import Scheduler
from .sequence import CompletionOutput, PoolingTask, RequestOutput, Sequence

log = logging.getLogger("hearthlm")


@dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    texts: list[TextState]
    truncated_tokens: int = 0
    arrival: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    finished: bool = False


@dataclass
class _Step:
    seqs: list[Sequence]
    sample: list[SampleRequest | None]  # None: a prefill chunk that samples nothing
    handle: StepHandle


class RequestFailedError(HearthError):
    """One request's sampling or output handling raised; that request alone was stopped (HTTP 500)."""

    code = "request_failed"


class PromptTooLongError(ContextLengthError):
    """Refused before tokenizing: the prompt has more characters than max_model_len tokens can ever hold."""

    def __init__(self, chars: int, min_tokens: int, max_model_len: int):
        InvalidRequestError.__init__(
            self, f"prompt is {chars:,} characters, so at least {min_tokens:,} tokens, but max_model_len is "
            f"{max_model_len:,}: shorten the prompt, raise --max-model-len, or pass truncate='left' to drop the "
            "oldest tokens", param="prompt")
        self.prompt_tokens, self.max_tokens, self.max_model_len = min_tokens, 0, max_model_len


def request_error(request_id: str, exc: BaseException, during: str) -> HearthError:
    """The typed error a failed request's stream receives: its own typed error if it has one (an
    InvalidRequestError is the request's fault: 400), else a 500 that names the request."""
    if isinstance(exc, HearthError):
        return exc
    return RequestFailedError(f"request {request_id} failed during {during} ({type(exc).__name__}: {exc}); it was "
                              "stopped and other requests go on: retry with other sampling parameters, and report "
                              "this if it persists")


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def gpu_layers_for(gpu_layers: int | str | None, device: torch.device) -> int | str | None:
    """--gpu-layers as this device can honour it: offload needs CUDA; on the CPU every block runs there already,
    so auto and 0 say so and go on, and N > 0 is an InvalidRequestError."""
    if gpu_layers is None or device.type == "cuda":
        return gpu_layers
    why = "no CUDA device" if not torch.cuda.is_available() else f"the engine runs on {device}"
    if gpu_layers in ("auto", 0):
        log.info("--gpu-layers %s: %s: all layers run on the CPU", gpu_layers, why)
        return None
    raise InvalidRequestError(f"--gpu-layers {gpu_layers}: {why}: all layers run on the CPU; drop --gpu-layers "
                              "(it offloads blocks from a GPU to the CPU)", param="gpu_layers")


class LLMEngine:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None):
        # the engine resolves limits (max_model_len, the token budget) in its own copy; the caller's stays as given
        self.config = config = config.copy()
        self.device = pick_device(config.device)
        self._cpu_share = None  # torch's and the native kernel's CPU threads, fewer beside busy neighbours
        if self.device.type == "cpu" or config.threads:
            from ..runtime.threads import start_threads
            self._cpu_share = start_threads(config.threads)
        if loaded is None:
            from ..loader import resolve_model_path
            from ..loader.load import normalize_quantization, resolve_dtype
            from ..plan.preflight import offloaded_layers, preflight

            quantization = normalize_quantization(config.quantization)
            gpu_layers = gpu_layers_for(config.gpu_layers, self.device)
            invariant_gpu = config.batch_invariant and self.device.type == "cuda"
            if invariant_gpu and (quantization != "none" or gpu_layers is not None):
                flag = "--quantization" if quantization != "none" else "--gpu-layers"
                raise InvalidRequestError(f"--batch-invariant runs dense weights with every block on the GPU: drop "
                                          f"{flag}, or drop --batch-invariant", param="batch_invariant")
            path = resolve_model_path(config.model)
            dtype = str(resolve_dtype(config.dtype, self.device)).replace("torch.", "")
            from ..kernels.cpu_quant import using

            with using(config.cpu_kernel):  # the CPU kernel's ISA (raises if the CPU lacks it): plan and weights
                plan = preflight(path, self.device.type, dtype, config.scheduler.max_model_len,
                                 config.scheduler.max_num_batched_tokens, config.cache.memory_fraction,
                                 kv_dtype=config.cache.cache_dtype, quantization=quantization,
                                 gpu_layers=gpu_layers, requested_dtype=str(config.dtype).replace("torch.", ""),
                                 weights="dequantize" if invariant_gpu else config.weights,
                                 cpu_dense_memory=config.cpu_dense_memory)
                loaded = load_model(path, config.dtype, self.device, quantization=quantization,
                                    gpu_layers=offloaded_layers(plan),
                                    weights="dequantize" if invariant_gpu else config.weights, kernels=config.kernels,
                                    gemv=config.gemv, cpu_dense_memory=config.cpu_dense_memory, cpu_moe=config.cpu_moe)
        self.loaded = loaded
        self.model_config = cfg = self.loaded.config
        self.tokenizer = self.loaded.tokenizer
        self.grammars = Grammars(self.tokenizer, self.loaded.config.vocab_size)  # structured outputs (lazy)
        sched = config.scheduler
        if sched.max_model_len > cfg.max_position_embeddings:
            log.info("max_model_len %d exceeds the model's trained context %d; using %d", sched.max_model_len,
                     cfg.max_position_embeddings, cfg.max_position_embeddings)
            sched.max_model_len = cfg.max_position_embeddings
        if not sched.enable_chunked_prefill:
            sched.max_num_batched_tokens = max(sched.max_num_batched_tokens, sched.max_model_len)
        windows = kv_group_windows(cfg.layer_windows)
        if self.device.type == "cuda":  # (the CPU default path is invariant already)
            if config.batch_invariant and self.loaded.model.placement.offloaded:
                raise InvalidRequestError("--batch-invariant runs every block on the GPU: drop --gpu-layers",
                                          param="batch_invariant")
            self.loaded.model.set_batch_invariant(config.batch_invariant)
        self.runner = ModelRunner(self.loaded.model, config.cache, sched, windows, self.device, config.kernels)
        salt = f"{self.loaded.path.resolve()}|{self.runner.dtype}|{config.cache.cache_dtype}".encode()  # KV identity
        self.kv = KVCacheManager(cfg.layer_windows, config.cache.block_size, self.runner.num_blocks,
                                 config.cache.enable_prefix_caching, salt=salt)
        self.scheduler = Scheduler(sched, self.kv)
        self.requests: dict[str, RequestState] = {}
        self.stats = EngineStats()
        self._rng = random.Random(config.seed)
        self._inflight: _Step | None = None  # launched step whose tokens are not read yet (CUDA overlap)
        self._host_sampled: set[str] = set()  # unfinished requests that need host-side sampling
        self._next_id = 0
        full = self.runner.num_blocks[0] - 1
        place = self.loaded.model.placement
        offload = ""
        if place.offloaded:
            offload = (f"; --gpu-layers {place.gpu_layers}: blocks 0-{place.num_host_layers - 1} on {place.host} "
                       f"(KV {self.runner.host_kv_cache_bytes / 2**20:.1f} MiB there), eager steps")
        from ..plan.preflight import engine_memory  # the figures `hearth plan` and `hearth ps` show

        log.info("model %s (%s, %s) loaded in %.2fs on %s; memory: %s; KV cache %d blocks x %d%s%s",
                 self.loaded.path.name, cfg.architecture, self.loaded.quantization, self.loaded.load_seconds,
                 self.device, engine_memory(self).line(), full, config.cache.block_size, offload,
                 "" if self.kv.enable_prefix_caching else "; prefix caching off")

    @property
    def max_model_len(self) -> int:
        return self.config.scheduler.max_model_len

    @property
    def kv_capacity_tokens(self) -> int:
        return (self.runner.num_blocks[0] - 1) * self.config.cache.block_size

    # ---- requests ----
    def new_request_id(self) -> str:
        self._next_id += 1
        return f"req-{self._next_id}"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """tokenizer.encode, releasing the GIL while it runs when the backend allows it (tokenizers'
        encode_batch does, encode does not), so a big prompt encoded on a worker thread stalls no other thread."""
        backend = getattr(self.tokenizer, "backend", None)
        if len(text) > 4096 and hasattr(backend, "encode_batch") and \
                type(self.tokenizer).encode is _TOKENIZER_ENCODE:
            # one text gains nothing from tokenizers' rayon pool; without it the work stays on this thread (and
            # its priority: serve runs it on low-priority workers)
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            return backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    @functools.cached_property
    def max_token_bytes(self) -> int | None:
        """The most UTF-8 bytes of input text one token can stand for, where the tokenizer bounds it exactly:
        BPE with no normalizer, no unknown-token fusing and pre-tokenizers that keep every character, and added
        tokens that absorb no whitespace. None otherwise (then no prompt is refused before tokenizing)."""
        b = getattr(self.tokenizer, "backend", None)
        try:
            if b is None or b.normalizer is not None or type(b.model).__name__ != "BPE" or \
                    (b.model.unk_token is not None and b.model.fuse_unk):
                return None
            if b.pre_tokenizer is not None:
                pre = json.loads(b.pre_tokenizer.__getstate__())
                parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
                if any(t.get("type") not in ("ByteLevel", "Digits", "Split", "Metaspace", "Punctuation")
                       or t.get("behavior") == "Removed" for t in parts):
                    return None
            if any(t.lstrip or t.rstrip for t in b.get_added_tokens_decoder().values()):
                return None
            # a token's vocabulary spelling takes at least as many bytes as the text it covers (byte-level and
            # metaspace alphabets spell one input byte with one or more)
            return max(len(k.encode("utf-8")) for k in b.get_vocab(with_added_tokens=True))
        except Exception:  # noqa: BLE001 - an unfamiliar backend: no early refusal
            return None

    def refuse_unfittable(self, chars: int, params: SamplingParams) -> None:
        """Raise PromptTooLongError, without tokenizing, for a text prompt of `chars` characters that cannot fit
        max_model_len whatever its tokens (exact: at least chars / max_token_bytes tokens)."""
        per_token = self.max_token_bytes
        if params.truncate == "left" or per_token is None or chars <= self.max_model_len * per_token:
            return
        raise PromptTooLongError(chars, -(-chars // per_token), self.max_model_len)

    def tokenize_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt is empty: send at least one character or token", param="prompt")
            return self.encode(prompt)
        if not isinstance(prompt, (list, tuple)) or not prompt:
            raise InvalidRequestError("prompt must be a non-empty string or a non-empty list of token ids",
                                      param="prompt")
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"prompt holds token ids {[_short(t) for t in bad[:5]]} outside the vocabulary "
                                      f"[0, {vocab}): send ids the model's tokenizer produces", param="prompt")
        return list(prompt)

    def fit_context(self, prompt_ids: list[int], params: SamplingParams, keep_prefix: int = 0) -> tuple[list[int], int]:
        """Check prompt + max_tokens against max_model_len; left-truncate only when asked."""
        limit = self.max_model_len
        max_tokens = params.max_tokens if params.max_tokens is not None else max(1, limit - len(prompt_ids))
        if len(prompt_ids) + max_tokens <= limit:
            return prompt_ids, 0
        if params.truncate != "left":
            raise ContextLengthError(len(prompt_ids), max_tokens, limit)
        keep = limit - max_tokens
        if keep <= keep_prefix:
            raise InvalidRequestError(
                f"max_tokens {max_tokens:,} leaves {max(0, keep):,} of max_model_len {limit:,} for the prompt, "
                f"less than the {keep_prefix:,} kept tokens (system prompt): lower max_tokens", param="max_tokens")
        dropped = len(prompt_ids) - keep
        return prompt_ids[:keep_prefix] + prompt_ids[keep_prefix + dropped:], dropped

    def chat_prompt(self, messages: list[dict], params: SamplingParams, refuse: bool = True,
                    template_kwargs: dict | None = None) -> tuple[list[int], int, int]:
        """Token ids of the templated conversation; with truncate='left', oldest turns are dropped first.
        refuse: a rendering too long to ever fit raises PromptTooLongError before it is encoded.
        template_kwargs: passed to the chat template (tools=...).

        Returns (prompt_ids, kept_prefix_tokens, dropped_tokens)."""
        tok = self.tokenizer
        kw = template_kwargs or {}
        render = lambda msgs: tok.apply_chat_template(msgs, **kw)  # noqa: E731
        encode = lambda msgs: self.encode(render(msgs), add_special_tokens=False)  # noqa: E731
        if params.truncate != "left":
            text = render(messages)
            if refuse:
                self.refuse_unfittable(len(text), params)
            return self.encode(text, add_special_tokens=False), 0, 0
        ids = encode(messages)
        limit = self.max_model_len - (params.max_tokens or 1)
        system = [m for m in messages[:1] if m["role"] == "system"]
        rest = messages[len(system):]
        full = len(ids)
        if len(ids) > limit and len(rest) > 1:
            # drop the fewest oldest turns that make it fit (all but the last at most), by bisection; a
            # rendering longer than max_token_bytes * limit characters cannot fit and is not encoded
            per = self.max_token_bytes

            def fits(d: int) -> bool:
                text = render(system + rest[d:])
                return (per is None or len(text) <= limit * per) and \
                    len(self.encode(text, add_special_tokens=False)) <= limit

            lo, hi = 1, len(rest) - 1
            while lo < hi:
                mid = (lo + hi) // 2
                if fits(mid):
                    hi = mid
                else:
                    lo = mid + 1
            rest = rest[lo:]
            ids = encode(system + rest)
        keep = len(encode(system)) if system else 0
        if system:  # the template may prepend a default system prompt; keep exactly what the shortest form shares
            keep = _common_prefix(ids, encode(system))
        return ids, keep, full - len(ids)

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, keep_prefix: int = 0, truncated: int = 0) -> str:
        if params is None:
            params = SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("sampling_params must be a SamplingParams")
        params.validate(vocab_size=self.model_config.vocab_size)
        # the request's own copy: max_tokens is resolved below, and the caller may share one object across
        # prompts or change it later (lists copied too: SamplingParams' __post_init__ re-checks them)
        params = replace(params)
        request_id = request_id or self.new_request_id()
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", param="request_id")
        prompt_ids = self.tokenize_prompt(prompt)
        prompt_ids, dropped = self.fit_context(prompt_ids, params, keep_prefix)
        if params.max_tokens is None:
            params.max_tokens = self.max_model_len - len(prompt_ids)
        total = len(prompt_ids) + params.max_tokens
        if not self.kv.fits_ever(total, self.config.scheduler.max_num_batched_tokens):
            raise CapacityError(
                f"this request needs up to {total:,} tokens of KV cache but the pool holds "
                f"{self.kv_capacity_tokens:,}: lower max_tokens or the prompt, or give the cache more memory "
                "(--kv-cache-memory / --gpu-memory-utilization)", param="max_tokens")
        base_seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        # compiled (or a 400) before anything is queued
        grammar = self.grammars.compile(params.structured) if params.structured is not None else None
        seqs: list[Sequence] = []
        for i in range(params.n):
            seq = Sequence(request_id, i, list(prompt_ids), params, seed=hash((base_seed, i)),
                           parent=seqs[0] if seqs else None)
            if grammar is not None:
                seq.grammar = self.grammars.state(grammar, self._stop_ids(params))
            seqs.append(seq)
            self.scheduler.add(seq)
        if needs_host_sampling(params):
            self._host_sampled.add(request_id)
        self.requests[request_id] = RequestState(request_id, prompt if isinstance(prompt, str) else None, prompt_ids,
                                                 params, seqs, [TextState() for _ in seqs],
                                                 truncated_tokens=truncated + dropped)
        return request_id

    def add_pooling_request(self, prompt_ids: list[int], all_rows: bool, request_id: str | None = None) -> str:
        """Queue an embeddings request: its prompt is computed beside generation (chunked, batched and preempted
        like a prefill) and its finished RequestOutput carries hidden_states: the final hidden states of every
        prompt token (all_rows) or of the last one. Overlapped steps are off while it runs."""
        request_id = request_id or self.new_request_id()
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", param="request_id")
        ids = list(prompt_ids)
        if not ids:
            raise InvalidRequestError("an input to embed has no tokens", param="input")
        if len(ids) > self.max_model_len:
            raise InvalidRequestError(f"an input of {len(ids):,} tokens is longer than the model's limit of "
                                      f"{self.max_model_len:,}: shorten it or ask for truncation", param="input")
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise InvalidRequestError(f"token ids must lie in [0, {vocab})", param="input")
        if not self.kv.fits_ever(len(ids), self.config.scheduler.max_num_batched_tokens):
            raise CapacityError(f"an input of {len(ids):,} tokens needs more KV cache than the pool holds "
                                f"({self.kv_capacity_tokens:,} tokens): shorten it or give the cache more memory",
                                param="input")
        params = SamplingParams(temperature=0.0, max_tokens=1)  # never sampled: accounting only
        seq = Sequence(request_id, 0, ids, params, seed=0, pooling=PoolingTask(all_rows))
        self.scheduler.add(seq)
        self._host_sampled.add(request_id)  # its rows are read on the host each step: no overlap
        self.requests[request_id] = RequestState(request_id, None, ids, params, [seq], [TextState()])
        return request_id

    def _stop_ids(self, p: SamplingParams) -> list[int]:
        """The tokens that end a sequence: eos (unless ignore_eos) and stop_token_ids."""
        return ([] if p.ignore_eos else self.tokenizer.eos_token_ids) + p.stop_token_ids

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its KV blocks."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return None
        for seq in state.seqs:
            if not seq.is_finished:
                seq.result.finish_reason = "abort"
                self.scheduler.finish(seq)
        state.finished = True
        self._host_sampled.discard(request_id)
        self.stats.finished(state, aborted=True, log_line=state.seqs[0].pooling is None)
        return self._output(state)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self._inflight is not None

    # ---- stepping ----
    def step(self, emit_unfinished: bool = True) -> list[RequestOutput]:
        """One engine iteration; returns outputs of requests that advanced (only finished ones when
        emit_unfinished is False, which skips per-step detokenization for offline batches).

        On CUDA, steps overlap: step N+1 is scheduled and launched before step N's tokens are read back, so
        host work hides behind device work; step N's outputs are returned by the call that launches N+1.
        Requests whose sampling reads their token history on the host (penalties, logprobs, min_tokens)
        turn the overlap off while they run."""
        outputs: list[RequestOutput] = []
        if self._cpu_share is not None:
            self._cpu_share.poll()
        overlap = self.runner.can_overlap and not self._host_sampled
        previous, self._inflight = self._inflight, None  # cleared first: a failing step is never retried
        if previous is not None and not overlap:
            outputs += self._finish_step(previous, emit_unfinished)
            previous = None
        sched = self.scheduler.schedule()
        launched = self._launch(sched) if sched else None
        if previous is not None:
            outputs += self._finish_step(previous, emit_unfinished)
        if launched is not None:
            if overlap:
                self._inflight = launched
            else:
                outputs += self._finish_step(launched, emit_unfinished)
        self.stats.maybe_log(self)
        return outputs

    def _launch(self, sched) -> "_Step":
        stop_ids_cache: dict[int, list[int]] = {}
        batch = Batch([], [], [], [])
        rows = 0
        for seq, n in zip(sched.seqs, sched.num_new_tokens):
            start = seq.num_computed_tokens
            prev_row = -1
            if n == 1 and start == seq.num_tokens - 1:
                if seq.pending.count:  # its input is the token the in-flight step is sampling
                    batch.token_ids.append([0])
                    prev_row = seq.pending.row
                else:
                    batch.token_ids.append([seq.output_ids[-1] if seq.output_ids else seq.prompt_ids[-1]])
            else:
                assert not seq.pending.count, "a prefill chunk never contains a pending token"
                batch.token_ids.append(seq.all_ids[start:start + n])
            batch.prev_rows.append(prev_row)
            batch.start_positions.append(start)
            batch.block_tables.append(seq.kv.block_tables)
            batch.seq_keys.append((seq.seq_id, seq.num_preemptions))
            if seq.pooling is not None:
                batch.hidden += [HIDDEN_NONE] * (len(batch.token_ids) - 1 - len(batch.hidden))
                batch.hidden.append(HIDDEN_ALL if seq.pooling.all_rows else
                                    HIDDEN_LAST if start + n == seq.num_tokens else HIDDEN_NONE)
                batch.sample.append(None)
            elif start + n == seq.num_tokens:
                p = seq.params
                key = id(p)
                if key not in stop_ids_cache:
                    stop_ids_cache[key] = self._stop_ids(p)
                batch.sample.append(SampleRequest(p, seq.prompt_ids, seq.output_ids, seq.seed, stop_ids_cache[key],
                                                  seq.pending.count, grammar=seq.grammar))
            else:
                batch.sample.append(None)
        if batch.hidden:
            batch.hidden += [HIDDEN_NONE] * (len(batch.token_ids) - len(batch.hidden))
        t0 = time.perf_counter()
        handle = self.runner.launch(batch)
        self.stats.step(sched, time.perf_counter() - t0)
        for seq, n, req in zip(sched.seqs, sched.num_new_tokens, batch.sample):
            seq.num_computed_tokens += n
            if req is not None:
                seq.pending.count += 1
                seq.pending.row = rows
                rows += 1
        return _Step(sched.seqs, batch.sample, handle)

    def _finish_step(self, step: "_Step", emit_unfinished: bool) -> list[RequestOutput]:
        result = step.handle.result()
        touched: dict[str, RequestState] = {}
        results = iter(zip(result.token_ids, result.logprobs))
        now = time.monotonic()
        outputs: list[RequestOutput] = []
        hidden = step.handle.hidden or [None] * len(step.seqs)
        for seq, req, rows in zip(step.seqs, step.sample, hidden):
            token, logprobs = next(results) if req is not None else (None, None)
            if seq.is_finished:  # stopped, aborted or failed while this step was in flight: its token is dropped
                continue
            if seq.pooling is not None:
                self.kv.commit(seq)
                out = self._pooled(seq, rows)
                if out is not None:
                    outputs.append(out)
                continue
            if req is not None:
                seq.pending.count -= 1
                if req.error is not None:  # sampling this row raised: the request fails alone
                    outputs.append(self._fail(self.requests[seq.request_id], req.error, "sampling"))
                    touched.pop(seq.request_id, None)
                    continue
                seq.output_ids.append(token)
                if seq.grammar is not None and not seq.grammar.accept(token):
                    outputs.append(self._fail(self.requests[seq.request_id], InvalidRequestError(
                        f"structured output: the grammar does not accept token {token} (an unsatisfiable grammar)",
                        param="structured"), "structured output"))
                    touched.pop(seq.request_id, None)
                    continue
            self.kv.commit(seq)
            if req is None:
                continue
            state = self.requests[seq.request_id]
            if logprobs is not None:
                seq.result.logprobs.append(logprobs)
            if state.first_token_time is None:
                state.first_token_time = now
            try:
                self._check_stop(seq, state, token, req.stop_ids)
            except Exception as e:  # noqa: BLE001 - stop strings / detokenization: this request fails alone
                outputs.append(self._fail(state, e, "stop handling"))
                touched.pop(seq.request_id, None)
                continue
            touched[seq.request_id] = state
        for state in touched.values():
            if all(s.is_finished for s in state.seqs):
                state.finished = True
                del self.requests[state.request_id]
                self._host_sampled.discard(state.request_id)
                self.stats.finished(state)
            if state.finished or emit_unfinished:
                try:
                    outputs.append(self._output(state))
                except Exception as e:  # noqa: BLE001 - detokenization: this request fails alone
                    outputs.append(self._fail(state, e, "detokenization"))
        return outputs

    def _pooled(self, seq: Sequence, rows: torch.Tensor | None) -> RequestOutput | None:
        """Collect a pooling sequence's rows of this step; its output once the whole prompt is computed."""
        if rows is not None:
            seq.pooling.chunks.append(rows)
        if seq.num_computed_tokens < seq.num_tokens:
            return None
        state = self.requests.pop(seq.request_id)
        seq.result.finish_reason = "stop"
        self.scheduler.finish(seq)
        state.finished = True
        state.first_token_time = time.monotonic()
        self._host_sampled.discard(seq.request_id)
        self.stats.finished(state, log_line=False)  # the endpoint logs one line per HTTP request
        hidden = torch.cat(seq.pooling.chunks) if len(seq.pooling.chunks) > 1 else seq.pooling.chunks[0]
        seq.pooling.chunks = []
        return RequestOutput(state.request_id, None, state.prompt_ids, [], finished=True,
                             num_cached_tokens=seq.num_cached_tokens, hidden_states=hidden,
                             metrics={"ttft_s": state.first_token_time - state.arrival, "arrival": state.arrival})

    def _fail(self, state: RequestState, exc: BaseException, during: str) -> RequestOutput:
        """Stop one request whose sampling or output handling raised; its output carries the typed error."""
        log.warning("request %s failed during %s: %s: %s", state.request_id, during, type(exc).__name__, exc,
                    exc_info=not isinstance(exc, HearthError))
        for seq in state.seqs:
            if not seq.is_finished:
                seq.result.finish_reason = "abort"
                self.scheduler.finish(seq)
        if not state.finished:
            state.finished = True
            self.stats.finished(state, aborted=True, log_line=state.seqs[0].pooling is None)
        self.requests.pop(state.request_id, None)
        self._host_sampled.discard(state.request_id)
        outs = [CompletionOutput(index=seq.index, text=text.text, token_ids=list(seq.output_ids),
                                 finish_reason=seq.result.finish_reason, stop_reason=seq.result.stop_reason)
                for seq, text in zip(state.seqs, state.texts)]
        return RequestOutput(state.request_id, state.prompt, state.prompt_ids, outs, finished=True,
                             num_cached_tokens=state.seqs[0].num_cached_tokens,
                             truncated_tokens=state.truncated_tokens,
                             error=request_error(state.request_id, exc, during))

    def _check_stop(self, seq: Sequence, state: RequestState, token: int, stop_ids: list[int]) -> None:
        p = seq.params
        text = state.texts[seq.index]
        is_stop_token = token in stop_ids  # the sampler masks these until min_tokens is reached
        if not is_stop_token:
            text.num_text_tokens = len(seq.output_ids)
        hit = None
        if p.stop:  # otherwise text is decoded only when an output is built
            # stop strings count only once min_tokens are out; text before that is never searched again
            hit = text.update(self.tokenizer, seq.output_ids, p.skip_special_tokens,
                              p.stop if len(seq.output_ids) >= p.min_tokens else [], p.include_stop_str_in_output)
        if is_stop_token:
            seq.result.finish_reason, seq.result.stop_reason = "stop", token
        elif hit is not None:
            seq.result.finish_reason, seq.result.stop_reason = "stop", hit
        elif seq.grammar is not None and seq.grammar.terminated:  # its stop token, taken although ignore_eos
            seq.result.finish_reason, seq.result.stop_reason = "stop", token
        elif len(seq.output_ids) >= p.max_tokens or seq.num_known_tokens >= self.max_model_len:
            seq.result.finish_reason = "length"
        if seq.result.finish_reason is not None:
            self.scheduler.finish(seq)

    def _output(self, state: RequestState) -> RequestOutput:
        outs = []
        for seq, text in zip(state.seqs, state.texts):
            finished = seq.is_finished
            text.update(self.tokenizer, seq.output_ids, seq.params.skip_special_tokens, seq.params.stop,
                        seq.params.include_stop_str_in_output)
            lps = seq.result.logprobs if seq.params.logprobs is not None else None
            outs.append(CompletionOutput(
                index=seq.index, text=text.stable_text(seq.params.stop, finished), token_ids=list(seq.output_ids),
                finish_reason=seq.result.finish_reason, stop_reason=seq.result.stop_reason, logprobs=lps,
                cumulative_logprob=sum(d[t] for d, t in zip(lps, seq.output_ids)) if lps else None))
        ttft = (state.first_token_time - state.arrival) if state.first_token_time else None
        return RequestOutput(state.request_id, state.prompt, state.prompt_ids, outs, finished=state.finished,
                             num_cached_tokens=state.seqs[0].num_cached_tokens,
                             truncated_tokens=state.truncated_tokens,
                             metrics={"ttft_s": ttft, "arrival": state.arrival})


def _short(v: object) -> str:
    text = repr(v)
    return text if len(text) <= 24 else text[:24] + "..."


def _tokenizer_encode():
    from ..loader.tokenizer import Tokenizer

    return Tokenizer.encode


_TOKENIZER_ENCODE = _tokenizer_encode()


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
