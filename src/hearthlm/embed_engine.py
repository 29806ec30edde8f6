"""An engine that only embeds: what the server (serve/models.py) and LLM read of an LLMEngine, for a BERT-family
encoder (embed.EncoderEmbedder), which has no KV cache, scheduler or sampler. Generation requests get a 400 saying
the model only embeds."""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from .embed import EncoderEmbedder
from .errors import InvalidRequestError


@dataclass
class EncoderLoaded:
    """LoadedModel's fields that the server reads (path, quantization, load time)."""

    path: Path
    quantization: str
    load_seconds: float
    config: Any = None


class EncoderEngine:
    """What the server and LLM read of an LLMEngine, for a model that only embeds: generation requests get a 400
    saying so; metrics read an idle engine (no KV cache)."""

    def __init__(self, embedder: EncoderEmbedder, config=None):
        self.embedder = embedder
        self.config = config
        self.device = embedder.device
        cfg = embedder.config
        self.model_config = SimpleNamespace(architecture=cfg.model_type, vocab_size=cfg.vocab_size,
                                            num_params=cfg.num_params, max_position_embeddings=cfg.max_tokens)
        self.loaded = EncoderLoaded(embedder.path, str(embedder.dtype).replace("torch.", ""),
                                    embedder.load_seconds, self.model_config)
        self.tokenizer = embedder.tokenizer
        self.max_model_len = embedder.max_tokens
        self.kv = SimpleNamespace(usage=0.0, prefix_hit_rate=0.0)
        self.runner = SimpleNamespace(dtype=embedder.dtype)
        self.kv_capacity_tokens = 0
        self.scheduler = SimpleNamespace(running=[], waiting=[])

    def only_embeds(self) -> InvalidRequestError:
        return InvalidRequestError(f"model {self.embedder.name!r} only computes embeddings (a "
                                   f"{self.model_config.architecture} encoder): use /v1/embeddings, /api/embed or "
                                   "LLM.embed, or serve a text-generation model", param="model")

    def add_request(self, *args: Any, **kwargs: Any) -> str:
        raise self.only_embeds()

    def chat_prompt(self, *args: Any, **kwargs: Any):
        raise self.only_embeds()

    def tokenize_prompt(self, prompt: str | list[int]) -> list[int]:
        return self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)

    def has_unfinished(self) -> bool:
        return False

    def step(self, emit_unfinished: bool = True) -> list:
        return []

    def abort_request(self, request_id: str) -> None:
        return None


class AsyncEncoder:
    """AsyncEngine's surface for an EncoderEngine: run(fn) calls fn(engine) on one worker thread of its own (the
    forwards never run on the event loop, one at a time)."""

    def __init__(self, engine: EncoderEngine):
        self.engine = engine
        self.dead: BaseException | None = None
        self.num_running = 0
        self.num_waiting = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hearth-embed")

    async def run(self, fn):
        return await asyncio.wrap_future(self._pool.submit(fn, self.engine))

    async def submit(self, *args: Any, **kwargs: Any):
        raise self.engine.only_embeds()

    def fail_all(self, exc: BaseException) -> None:
        return None

    def shutdown(self, timeout: float = 30.0) -> None:
        self._pool.shutdown(wait=True)
