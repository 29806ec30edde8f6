"""Serve config and the model manager: one model at a time, loaded on first use, unloaded after keep_alive idle."""
from __future__ import annotations

import asyncio
import gc
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..config import CacheConfig, EngineConfig, SchedulerConfig, normalize_cache_dtype
from ..engine.async_engine import AsyncEngine
from ..engine.engine import LLMEngine
from ..errors import InvalidRequestError, UnavailableError
from ..loader import resolve_model_path
from ..loader.load import DEFAULT_ALIASES

log = logging.getLogger("hearthlm.serve")
DEFAULT_NAME = "smollm2"
# model names TGI clients send when the URL already picks the model: huggingface_hub.InferenceClient(base_url)
# posts "dummy" (older releases "tgi") to /v1/chat/completions; they mean the model this server runs
PLACEHOLDER_NAMES = frozenset({"tgi", "dummy"})


@dataclass
class ServeConfig:
    model: str | None = None
    # --served-model-name (vLLM): the names the API reports and accepts for `model`; the first is the one shown
    served_model_name: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 11435
    max_model_len: int = 4096
    max_num_seqs: int | None = None  # None: SEQS_DEFAULT for the device
    max_num_batched_tokens: int = 2048
    max_queue: int = 256
    kv_cache_memory: int | None = None  # bytes; None = the planner's share of free memory
    enable_prefix_caching: bool = True
    kv_cache_dtype: str = "auto"  # auto | fp8 | int8
    quantization: str = "none"  # none | int8 | int4 | fp8 (weights)
    gpu_memory_utilization: float = 0.9  # CacheConfig.memory_fraction
    gpu_layers: int | str | None = None  # --gpu-layers N | auto (EngineConfig.gpu_layers); None = all on the GPU
    cpu_compile: bool = False  # --compile (CacheConfig.cpu_compile)
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    batch_invariant: bool = False  # --batch-invariant (EngineConfig.batch_invariant)
    threads: int | None = None  # -t/--threads (EngineConfig.threads); None = the physical cores
    cpu_kernel: str = "auto"  # --cpu-kernel (EngineConfig.cpu_kernel)
    weights: str = "auto"  # --weights, --kernels, --gemv, --cpu-dense-memory: EngineConfig's fields
    kernels: str = "auto"
    gemv: str = "auto"
    cpu_dense_memory: int = 1 << 30
    cpu_moe: int = 0  # --cpu-moe: the experts of the first N MoE blocks on the CPU
    keep_alive_s: float | None = 300.0  # None = forever
    stats_interval_s: float = 10.0
    preload: bool = True
    # security and lifecycle (SECURITY.md)
    api_keys: list[str] = field(default_factory=list)  # --api-key / HEARTH_API_KEY; empty = no key
    allowed_hosts: list[str] = field(default_factory=list)  # Host names beyond loopback names and IP literals
    allowed_origins: list[str] = field(default_factory=list)  # browser Origins beyond the local defaults
    insecure_no_auth: bool = False  # allow a non-loopback bind without an API key
    allow_local_paths: bool = False  # HTTP requests may name local files/directories as models
    allow_pull_hosts: list[str] = field(default_factory=list)  # URL pull hosts beyond the HF hub
    max_body_size: int = 4 << 20  # bytes; larger bodies get 413
    drain_timeout_s: float = 30.0  # SIGTERM: how long in-flight requests may finish

    def __post_init__(self) -> None:
        self.kv_cache_dtype = normalize_cache_dtype(self.kv_cache_dtype)  # fail before the server starts
        if isinstance(self.served_model_name, str):
            self.served_model_name = [self.served_model_name]
        self.served_model_name = [n.strip() for n in self.served_model_name if n and n.strip()]

    @property
    def model_name(self) -> str:
        """The name the API shows for the served model: the first --served-model-name, else the model argument."""
        return self.served_model_name[0] if self.served_model_name else self.model or DEFAULT_NAME

    def names_served_model(self, name: str) -> bool:
        """Whether a request's `model` means the model given on the command line: empty, a TGI placeholder, one
        of --served-model-name, or (without --served-model-name) the model argument or an alias of the default."""
        if not name or name.lower() in PLACEHOLDER_NAMES or name == self.model_name:
            return True
        if self.served_model_name:
            return name in self.served_model_name
        return self.model is None and name.lower() in DEFAULT_ALIASES


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
SEQS_DEFAULT = {"cuda": 64, "cpu": 4}  # --max-num-seqs unset: the CPU KV pool is max_model_len x this many tokens


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


FOREVER_S = 100 * 365 * 86400.0  # keep_alive at or past a century never expires (as a negative value)
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_keep_alive(value: float | str | None) -> float | None:
    """Ollama keep_alive: seconds or a Go duration ("5m", "1h30m"); negative or a century or more = forever
    (None)."""
    if isinstance(value, bool):
        raise InvalidRequestError(f"keep_alive must be a number of seconds or a duration like '5m', got {value!r}",
                                  param="keep_alive")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise InvalidRequestError(f"keep_alive must be a finite number of seconds, got {value!r}",
                                      param="keep_alive")
        return None if value < 0 or value >= FOREVER_S else float(value)
    text = str(value).strip()
    try:
        return parse_keep_alive(float(text))
    except ValueError:
        pass
    sign, body = (-1, text[1:]) if text.startswith("-") else (1, text)
    parts = _DURATION.findall(body)
    if not parts or "".join(n + u for n, u in parts) != body:
        raise InvalidRequestError(f"keep_alive must be a number of seconds or a duration like '5m', got {value!r}",
                                  param="keep_alive")
    seconds = sign * sum(float(n) * _UNITS[u] for n, u in parts)
    return parse_keep_alive(seconds)


@dataclass(eq=False)
class Loaded:
    name: str
    path: Path
    aengine: AsyncEngine
    load_seconds: float
    keep_alive_s: float | None
    loaded_at: float = field(default_factory=time.time)
    active: int = 0
    expires_at: float | None = None  # monotonic deadline while idle; None = busy or forever
    embed_batcher: object | None = None  # serve/embeddings.py's batcher, made on the first embeddings request

    @property
    def embed_only(self) -> bool:
        """A BERT-family encoder (embed_engine.EncoderEngine): it serves embeddings and nothing else."""
        from ..embed_engine import EncoderEngine

        return isinstance(self.aengine.engine, EncoderEngine)

    @property
    def engine(self) -> LLMEngine:
        return self.aengine.engine

    @property
    def size_bytes(self) -> int:
        """What the model takes: weights held + KV pool + a step's activations + runtime overhead, the total of
        the engine's start-up log line and of `hearth plan` for the same settings (plan.preflight.engine_memory)."""
        from ..plan.preflight import engine_memory

        if self.embed_only:
            return self.engine.embedder.weights_bytes
        return engine_memory(self.engine).total_bytes

    def expires_wall(self) -> float | None:
        """Unix time of the planned unload (None = never)."""
        if self.keep_alive_s is None:
            return None
        if self.expires_at is None:
            return time.time() + self.keep_alive_s
        return time.time() + max(0.0, self.expires_at - time.monotonic())


class ModelManager:
    def __init__(self, cfg: ServeConfig, on_fatal: Callable[[BaseException], None] | None = None):
        """on_fatal(error): called when the start-up preload fails (`hearth serve` then exits 1)."""
        self.cfg = cfg
        self.current: Loaded | None = None
        self.draining = False  # shutting down: new requests get 503
        self._on_fatal = on_fatal
        self._cond = asyncio.Condition()
        self._reaper: asyncio.Task | None = None
        self._preload: asyncio.Task | None = None

    @property
    def loading(self) -> bool:
        """The start-up preload is still running (requests get 503 with Retry-After meanwhile)."""
        return self._preload is not None and not self._preload.done()

    def check_available(self) -> None:
        if self.draining:
            raise UnavailableError("the server is shutting down: retry against a running server", retry_after=5)
        if self.loading:
            raise UnavailableError(f"model {self.cfg.model_name!r} is loading: retry in a few seconds", retry_after=2)

    # ---- names ----
    def _matches(self, name: str, m: Loaded) -> bool:
        """Whether a request's name means the loaded model: its name, an alias of the default, or (only where
        local paths are allowed) its path."""
        return name == m.name or (self.cfg.allow_local_paths and name == str(m.path)) or (
            name.lower() in DEFAULT_ALIASES and m.name == DEFAULT_NAME)

    def resolve(self, name: str | None) -> tuple[str, Path]:
        """(display name, path) of a model name from a request, under the store's policy (store.resolve_name):
        aliases, store names, the model the server was started with (a CLI path included), and local paths only
        with --allow-local-paths. 400 for paths and invalid names, 404 for names not in the store; nothing is
        unloaded or read before this succeeds."""
        n = (name or "").strip()
        n = n.removesuffix(":latest")
        cur = self.current
        if n.lower() in PLACEHOLDER_NAMES and cur is not None:  # TGI: the model this server runs now
            return cur.name, cur.path
        if self.cfg.names_served_model(n):
            n = self.cfg.model_name
        if cur is not None and self._matches(n, cur):
            return cur.name, cur.path
        if n == self.cfg.model_name:  # given on the command line by the local user: trusted
            return n, resolve_model_path(self.cfg.model)
        from ..store import resolve_name

        return n, resolve_name(n, allow_local_paths=self.cfg.allow_local_paths)

    # ---- lifecycle ----
    async def acquire(self, name: str | None, keep_alive: float | None | str = "default",
                      _preload: bool = False, purpose: str = "generate") -> tuple[Loaded, float]:
        """The loaded model for name (loading it, possibly swapping out an idle one); returns (model, load_s).
        503 while the start-up preload runs or the server drains. purpose: "generate" refuses (400) a model that
        only embeds; "embed" and "any" take every model."""
        if not _preload:
            self.check_available()
        display, path = self.resolve(name)
        load_s = 0.0
        async with self._cond:
            while self.current is not None and self.current.path != path:
                if self.current.active == 0:
                    await self._unload_locked()
                else:
                    await self._cond.wait()  # another model is busy; hearth serves one model at a time
            if self.current is None:
                self.current = await self._load(display, path)
                load_s = self.current.load_seconds
            m = self.current
            m.active += 1
            m.expires_at = None
            if keep_alive != "default":
                m.keep_alive_s = keep_alive  # type: ignore[assignment]
            if purpose == "generate" and m.embed_only:
                self.release(m)  # its idle timer runs as after any request
                raise m.engine.only_embeds()
            return m, load_s

    def release(self, m: Loaded) -> None:
        m.active -= 1
        if m.active == 0:
            m.expires_at = None if m.keep_alive_s is None else time.monotonic() + m.keep_alive_s
            asyncio.get_running_loop().create_task(self._on_idle(m))

    async def _on_idle(self, m: Loaded) -> None:
        async with self._cond:
            if m is self.current and m.active == 0 and m.keep_alive_s == 0:
                await self._unload_locked()
            self._cond.notify_all()

    async def unload(self, name: str | None = None) -> bool:
        """keep_alive 0: unload now if idle, else as soon as the running requests finish."""
        async with self._cond:
            m = self.current
            if m is None or (name and not self._matches(self.resolve(name)[0], m)):
                return False
            m.keep_alive_s = 0
            if m.active == 0:
                await self._unload_locked()
            return True

    async def _load(self, name: str, path: Path) -> Loaded:
        c = self.cfg
        seqs = c.max_num_seqs or SEQS_DEFAULT["cuda" if c.device.startswith("cuda") or c.device == "auto" and
                                              _cuda_available() else "cpu"]
        sched = SchedulerConfig(max_num_seqs=seqs, max_num_batched_tokens=c.max_num_batched_tokens,
                                max_model_len=c.max_model_len)
        cache = CacheConfig(kv_cache_memory=c.kv_cache_memory, enable_prefix_caching=c.enable_prefix_caching,
                            memory_fraction=c.gpu_memory_utilization,
                            cache_dtype=c.kv_cache_dtype, cpu_compile=c.cpu_compile)
        config = EngineConfig(model=str(path), dtype=c.dtype, device=c.device, seed=c.seed, cache=cache,
                              scheduler=sched, quantization=c.quantization,
                              gpu_layers=c.gpu_layers, batch_invariant=c.batch_invariant, threads=c.threads,
                              cpu_kernel=c.cpu_kernel, weights=c.weights, kernels=c.kernels, gemv=c.gemv,
                              cpu_dense_memory=c.cpu_dense_memory, cpu_moe=c.cpu_moe)
        start = time.perf_counter()
        from ..embed import is_encoder_dir

        if await asyncio.to_thread(is_encoder_dir, path):  # a BERT-family encoder: embeddings only, no KV cache
            from ..embed_engine import AsyncEncoder
            from ..llm import encoder_engine

            aencoder = AsyncEncoder(await asyncio.to_thread(encoder_engine, config))
            seconds = time.perf_counter() - start
            log.info("loaded %s from %s in %.2fs (an embedding model, max %d tokens per input)", name, path, seconds,
                     aencoder.engine.max_model_len)
            return Loaded(name, path, aencoder, seconds, c.keep_alive_s)  # type: ignore[arg-type]
        # built on the engine's own thread (AsyncEngine.build: one OpenMP team for loading and stepping)
        aengine = await asyncio.to_thread(AsyncEngine.build, lambda: LLMEngine(config), c.max_queue,
                                          c.stats_interval_s)
        seconds = time.perf_counter() - start
        log.info("loaded %s from %s in %.2fs (max_model_len=%d)", name, path, seconds, aengine.engine.max_model_len)
        return Loaded(name, path, aengine, seconds, c.keep_alive_s)

    async def _unload_locked(self) -> None:
        m, self.current = self.current, None
        if m is None:
            return
        await asyncio.to_thread(m.aengine.shutdown)
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        log.info("unloaded %s", m.name)
        self._cond.notify_all()

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            m = self.current
            if m is not None and m.active == 0 and m.expires_at is not None and time.monotonic() >= m.expires_at:
                async with self._cond:
                    if m is self.current and m.active == 0 and m.expires_at is not None \
                            and time.monotonic() >= m.expires_at:
                        await self._unload_locked()

    async def start(self, preload: bool = True) -> None:
        """Start the reaper, and the preload unless the caller starts it later (begin_preload, once bound)."""
        from ..store import recover_store

        for line in await asyncio.to_thread(recover_store):  # an interrupted re-pull, stale partial downloads
            log.info("model store: %s", line)
        self._reaper = asyncio.get_running_loop().create_task(self._reap())
        if preload:
            self.begin_preload()

    def begin_preload(self) -> None:
        """Load the served model in the background: the port answers (503) while it loads."""
        if self.cfg.preload and self._preload is None:
            self._preload = asyncio.get_running_loop().create_task(self._preload_default())

    async def _preload_default(self) -> None:
        try:
            m, _ = await self.acquire(None, _preload=True, purpose="any")
            self.release(m)
        except Exception as e:  # noqa: BLE001 - reported through on_fatal: the server cannot serve its model
            log.error("cannot load %s: %s", self.cfg.model_name, e)
            if self._on_fatal is not None:
                self._on_fatal(e)

    async def drain(self, timeout_s: float, grace_s: float = 5.0) -> int:
        """Refuse new requests, let running ones finish for up to timeout_s, then end the rest with a 503 error
        event. Returns how many requests were ended that way."""
        self.draining = True
        if self._preload is not None and not self._preload.done():
            self._preload.cancel()
        deadline = time.monotonic() + timeout_s
        while self.current is not None and self.current.active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        m = self.current
        if m is None or not m.active:
            return 0
        n = m.active
        log.warning("drain timeout (%.0fs, --drain-timeout): ending %d request(s) with an error", timeout_s, n)
        m.aengine.fail_all(UnavailableError(f"the server is shutting down and the request did not finish within "
                                            f"--drain-timeout {timeout_s:g}s", retry_after=5))
        deadline = time.monotonic() + grace_s
        while self.current is m and m.active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return n

    async def close(self) -> None:
        if self._reaper:
            self._reaper.cancel()
        if self._preload is not None and not self._preload.done():
            self._preload.cancel()
        async with self._cond:
            await self._unload_locked()
