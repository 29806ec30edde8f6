"""Offline API, mirroring vLLM: LLM(...).generate / .chat / .stream."""
from __future__ import annotations

from typing import Iterator

from .config import CacheConfig, EngineConfig, SchedulerConfig
from .engine.engine import LLMEngine
from .errors import InvalidRequestError
from .sampling import SamplingParams
from .engine.sequence import RequestOutput


def encoder_engine(config: EngineConfig):
    """An EncoderEngine when config.model is a BERT-family directory (embeddings only), else None."""
    from .embed import EncoderEmbedder, is_encoder_dir
    from .embed_engine import EncoderEngine
    from .loader import resolve_model_path

    path = resolve_model_path(config.model)
    if not is_encoder_dir(path):
        return None
    from .engine.engine import pick_device

    return EncoderEngine(EncoderEmbedder(path, pick_device(config.device), config.dtype), config)


class LLM:
    def __init__(self, model: str | None = None, dtype: str = "auto", device: str = "auto",
                 max_model_len: int | None = None, max_num_seqs: int = 64, max_num_batched_tokens: int = 2048,
                 block_size: int = 16, kv_cache_memory: int | None = None, num_kv_blocks: int | None = None,
                 enable_prefix_caching: bool = True, enable_chunked_prefill: bool = True, seed: int = 0,
                 cuda_graphs: bool = True, async_scheduling: bool | None = None, kv_cache_dtype: str = "auto",
                 quantization: str = "none", gpu_layers: int | str | None = None,
                 gpu_memory_utilization: float = 0.9, cpu_compile: bool = False,
                 batch_invariant: bool = False, threads: int | None = None, cpu_kernel: str = "auto",
                 weights: str = "auto", kernels: str = "auto", gemv: str = "auto", cpu_dense_memory: int = 1 << 30,
                 cpu_moe: int = 0, loaded=None):
        """gpu_layers (CUDA): the last N blocks on the GPU, the others on the CPU (llama.cpp's -ngl); "auto" = the
        most that fit; None = all on the GPU. With `loaded`, the loaded model's placement applies.
        cpu_compile (CPU): decode steps run a torch.compile'd layer stack (each graph compiles on first use, then
        comes from inductor's disk cache).
        batch_invariant (CUDA): a request's tokens do not depend on the rest of the batch (EngineConfig).
        threads (CPU): torch and native-kernel threads; None = the physical cores.
        cpu_kernel (CPU): the native kernel's ISA, auto | avx512vnni | avx2 | torch (PyTorch's int4 kernel).
        weights, kernels, gemv, cpu_dense_memory, cpu_moe: EngineConfig's fields of those names (config.py)."""
        sched = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                max_model_len=max_model_len or 1 << 30,  # None: clamped to the model's context
                                enable_chunked_prefill=enable_chunked_prefill,
                                async_scheduling=async_scheduling)
        cache = CacheConfig(block_size=block_size, kv_cache_memory=kv_cache_memory, num_blocks=num_kv_blocks,
                            enable_prefix_caching=enable_prefix_caching, cuda_graphs=cuda_graphs,
                            cache_dtype=kv_cache_dtype, memory_fraction=gpu_memory_utilization,
                            cpu_compile=cpu_compile)
        config = EngineConfig(model=model, dtype=dtype, device=device, seed=seed, cache=cache, scheduler=sched,
                              quantization=quantization, gpu_layers=gpu_layers, batch_invariant=batch_invariant,
                              threads=threads, cpu_kernel=cpu_kernel, weights=weights, kernels=kernels, gemv=gemv,
                              cpu_dense_memory=cpu_dense_memory, cpu_moe=cpu_moe)
        encoder = loaded is None and encoder_engine(config)  # a BERT-family model: it only embeds
        self.engine = encoder or LLMEngine(config, loaded=loaded)
        self.tokenizer = self.engine.tokenizer

    def embed(self, texts: str | list[str] | list[int] | list[list[int]], truncate: bool | int = False,
              dimensions: int | None = None, batch_size: int = 64) -> list[list[float]]:
        """One vector per text (or token-id list), pooled and normalized as the model's sentence-transformers
        config says (embed.py). truncate: False (a too-long input raises), True (cut to the model's limit) or a
        token count. dimensions: a shorter Matryoshka size, where the model has one."""
        from .embed import batches, embedder_of

        items = [texts] if isinstance(texts, str) or (texts and isinstance(texts[0], int)) else list(texts)
        if not items:
            raise InvalidRequestError("embed() needs at least one text", param="input")
        emb = embedder_of(self.engine)
        dims = emb.check_dimensions(dimensions)
        rows = emb.tokenize(items, truncate).rows
        out: list[list[float]] = [[] for _ in rows]
        for group in batches(rows, batch_size, 16384, emb.padded):
            vecs = emb.cut(emb.embed_ids([rows[i] for i in group]), dims)
            for i, v in zip(group, vecs.tolist()):
                out[i] = v
        return out

    def _params_list(self, params, n: int) -> list[SamplingParams]:
        """One SamplingParams per prompt; a shared object is safe: the engine resolves each request in a copy."""
        if params is None:
            return [SamplingParams() for _ in range(n)]
        if isinstance(params, SamplingParams):
            return [params] * n
        if len(params) != n:
            raise InvalidRequestError(f"got {len(params)} sampling params for {n} prompts")
        return list(params)

    def generate(self, prompts: str | list[str] | list[list[int]],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = self._params_list(sampling_params, len(prompts))
        ids = []
        try:
            for p, sp in zip(prompts, params):
                ids.append(self.engine.add_request(p, sp))
        except Exception:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        return self._run(ids, use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        results: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm and len(ids) > 1:
            from tqdm import tqdm

            bar = tqdm(total=len(ids), desc="generate", unit="req", leave=False)
        try:
            while len(results) < len(ids):
                for out in self.engine.step(emit_unfinished=False):
                    if out.finished:
                        results[out.request_id] = out
                        if bar:
                            bar.update(1)
        finally:
            if bar:
                bar.close()
            for rid in ids:
                if rid not in results:
                    self.engine.abort_request(rid)
        failed = next((results[r].error for r in ids if results[r].error is not None), None)
        if failed is not None:  # one request failed alone (engine isolation): never hand back its partial text
            raise failed
        return [results[r] for r in ids]

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             use_tqdm: bool = True) -> list[RequestOutput]:
        convs = messages if messages and isinstance(messages[0], list) else [messages]
        params = self._params_list(sampling_params, len(convs))
        ids = []
        try:
            for conv, sp in zip(convs, params):
                prompt_ids, keep, dropped = self.engine.chat_prompt(conv, sp)
                ids.append(self.engine.add_request(prompt_ids, sp, keep_prefix=keep, truncated=dropped))
        except Exception:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        return self._run(ids, use_tqdm)

    def stream(self, prompt: str | list[int], sampling_params: SamplingParams | None = None) -> Iterator[str]:
        """Yield text deltas of one request as they are generated (n must be 1)."""
        params = sampling_params or SamplingParams()
        if params.n != 1:
            raise InvalidRequestError("stream() supports n=1; use generate() for n > 1", param="n")
        rid = self.engine.add_request(prompt, params)
        sent = 0
        try:
            while True:
                for out in self.engine.step():
                    if out.request_id != rid:
                        continue
                    if out.error is not None:
                        raise out.error
                    text = out.outputs[0].text
                    if len(text) > sent:
                        yield text[sent:]
                        sent = len(text)
                    if out.finished:
                        return
        finally:
            self.engine.abort_request(rid)

