"""Embeddings: the pooling a sentence-transformers model directory names, and two embedders that produce pooled
vectors from token ids -- a BERT-family encoder (models/bert.py) and a decoder served by an LLMEngine
(Qwen3-Embedding style: last-token pooling over the final-norm hidden states).

Rules:
- The pipeline is the directory's modules.json: Transformer -> Pooling (1_Pooling/config.json) -> Normalize.
  Other modules (Dense, ...) are refused at load, never skipped.
- Text is tokenized with the model's special tokens (tokenizer.json's post-processor, as sentence-transformers
  does); token-id inputs are used as given.
- An input longer than the limit (sentence_bert_config.json max_seq_length, the position table, the engine's
  max_model_len) is an error naming `input` unless the caller asks for truncation; truncation keeps the first
  tokens and the special tokens around them, as sentence-transformers truncates.
- `dimensions` (Matryoshka) only where config.json says so (vLLM's `is_matryoshka` / `matryoshka_dimensions`), or
  equal to the full size; the cut vector is re-normalized when the model normalizes.
- A decoder is an embedding model only when it names its pooling (a sentence-transformers Pooling module, or a
  GGUF `<arch>.pooling_type`, normalized as llama.cpp does): the caller gets an error naming `model` otherwise (a
  chat model's last token is no sentence embedding).
"""
from __future__ import annotations

import json
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .errors import InvalidRequestError, ModelLoadError, UnavailableError, UnsupportedModelError

POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
_LEGACY_MODES = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                 "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                 "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}
_ST = "sentence_transformers.models."
# models trained for shorter vectors (their cards say so) whose configs do not: matched in the directory name or
# config.json's _name_or_path, lower-case (vLLM asks for hf_overrides={"is_matryoshka": true} instead)
MATRYOSHKA_NAMES = ("qwen3-embedding", "mxbai-embed-large-v1", "snowflake-arctic-embed-m-v1.5",
                    "snowflake-arctic-embed-l-v2.0")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path} is not valid JSON ({e}): re-download the model") from None


@dataclass
class PoolingSpec:
    """How token states become one vector: modes (concatenated in order), then optional L2 normalization."""

    modes: tuple[str, ...] = ("lasttoken",)
    normalize: bool = False
    max_seq_length: int | None = None
    prompt: str = ""  # config_sentence_transformers.json's default prompt, put before every text
    matryoshka: bool = False
    matryoshka_dimensions: tuple[int, ...] = ()

    @classmethod
    def from_dir(cls, path: Path) -> PoolingSpec | None:
        """The spec of a sentence-transformers directory; None when it has no modules.json with a Pooling module."""
        path = Path(path)
        if not path.is_dir():
            return None
        modules = _read_json(path / "modules.json")
        if not isinstance(modules, list) or not any(str(m.get("type", "")).endswith("Pooling") for m in modules):
            return None
        spec = cls()
        for m in sorted(modules, key=lambda m: int(m.get("idx", 0))):
            kind = str(m.get("type", "")).removeprefix(_ST).rsplit(".", 1)[-1]
            if kind == "Transformer":
                continue
            if kind == "Pooling":
                spec.modes = _pooling_modes(_read_json(path / m.get("path", "") / "config.json") or {})
            elif kind == "Normalize":
                spec.normalize = True
            else:
                raise UnsupportedModelError(f"{path.name}: sentence-transformers module {m.get('type')!r} is not "
                                            "supported (Transformer, Pooling and Normalize are)")
        st = _read_json(path / "sentence_bert_config.json") or {}
        if st.get("max_seq_length"):
            spec.max_seq_length = int(st["max_seq_length"])
        cst = _read_json(path / "config_sentence_transformers.json") or {}
        name = cst.get("default_prompt_name")
        if name:
            spec.prompt = str((cst.get("prompts") or {}).get(name, ""))
        hf = _read_json(path / "config.json") or {}
        dims = hf.get("matryoshka_dimensions")
        name = f"{hf.get('_name_or_path') or ''} {path.name}".lower()
        spec.matryoshka = bool(hf.get("is_matryoshka") or dims or any(k in name for k in MATRYOSHKA_NAMES))
        spec.matryoshka_dimensions = tuple(int(d) for d in dims or ())
        return spec


# llama.cpp's enum llama_pooling_type (GGUF `<arch>.pooling_type`): 0 none, 1 mean, 2 cls, 3 last, 4 rank
GGUF_POOLING = {1: "mean", 2: "cls", 3: "lasttoken"}
_GGUF_VOCAB = frozenset({"tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
                         "tokenizer.ggml.merges"})


def spec_from_gguf(md: dict[str, Any]) -> PoolingSpec | None:
    """The pooling of a GGUF embedding model (llama.cpp's `<arch>.pooling_type`), L2-normalized as llama.cpp's and
    Ollama's embeddings are; None for a generative model (no pooling type, or none)."""
    kind = md.get(f"{md.get('general.architecture')}.pooling_type")
    if kind is None or int(kind) == 0:  # type: ignore[arg-type]
        return None
    if int(kind) not in GGUF_POOLING:  # type: ignore[arg-type]
        raise UnsupportedModelError(f"GGUF pooling_type {kind} is not supported (1 mean, 2 cls, 3 last)")
    return PoolingSpec(modes=(GGUF_POOLING[int(kind)],), normalize=True)  # type: ignore[arg-type]


def pooling_spec(path: str | Path) -> PoolingSpec | None:
    """The pooling a model names: a sentence-transformers directory, or a GGUF file's pooling_type; None: none."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        from .loader.gguf_header import GGUFFile

        return spec_from_gguf(GGUFFile(path, skip_arrays=_GGUF_VOCAB).metadata)
    return PoolingSpec.from_dir(path)


def _pooling_modes(cfg: dict[str, Any]) -> tuple[str, ...]:
    mode = cfg.get("pooling_mode")
    if mode is None:
        modes = tuple(v for k, v in _LEGACY_MODES.items() if cfg.get(k))
        modes = modes or ("mean",)
    else:
        modes = (mode,) if isinstance(mode, str) else tuple(mode)
    bad = [m for m in modes if m not in POOLING_MODES]
    if bad:
        raise UnsupportedModelError(f"pooling mode {bad[0]!r} is not supported ({', '.join(POOLING_MODES)})")
    if cfg.get("include_prompt") is False:
        raise UnsupportedModelError("pooling with include_prompt=false (instructor models) is not supported")
    return modes


def pool(hidden: torch.Tensor, lens: list[int], modes: tuple[str, ...]) -> torch.Tensor:
    """hidden: [T, H] the rows' token states packed back to back (len lens[i] each) -> [B, H * len(modes)] fp32."""
    h = hidden.float()
    n = torch.tensor(lens, device=h.device)
    ends = n.cumsum(0)
    starts = ends - n
    seg = torch.repeat_interleave(torch.arange(len(lens), device=h.device), n)
    out = []
    summed = None
    for mode in modes:
        if mode == "cls":
            out.append(h[starts])
        elif mode == "lasttoken":
            out.append(h[ends - 1])
        elif mode == "max":
            out.append(torch.full((len(lens), h.shape[1]), float("-inf"), device=h.device)
                       .scatter_reduce_(0, seg[:, None].expand_as(h), h, "amax"))
        elif mode in ("mean", "mean_sqrt_len_tokens"):
            if summed is None:
                summed = torch.zeros(len(lens), h.shape[1], device=h.device).index_add_(0, seg, h)
            denom = n[:, None].float()
            out.append(summed / (denom if mode == "mean" else denom.sqrt()))
        else:  # weightedmean: token i (from 1) of a row weighs i
            w = (torch.arange(h.shape[0], device=h.device) - starts[seg] + 1).float()[:, None]
            total = torch.zeros(len(lens), h.shape[1], device=h.device).index_add_(0, seg, h * w)
            out.append(total / (n * (n + 1) / 2).float()[:, None])
    return torch.cat(out, dim=1)


@dataclass
class Inputs:
    """Token ids of each input, ready for the model, and how many tokens truncation dropped in all."""

    rows: list[list[int]]
    truncated_tokens: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(len(r) for r in self.rows)


class Embedder:
    """Token ids -> pooled (and normalized) vectors of one model. Subclasses give `forward_pooled` and whether a
    batch is padded (encoders: cost = rows x longest) or packed (decoders: cost = tokens)."""

    padded = False

    def __init__(self, tokenizer, spec: PoolingSpec, vocab_size: int, max_tokens: int, name: str):
        self.tokenizer, self.spec, self.vocab_size, self.max_tokens, self.name = (tokenizer, spec, vocab_size,
                                                                                  max_tokens, name)
        backend = getattr(tokenizer, "backend", None)
        self._num_special = backend.num_special_tokens_to_add(False) if backend is not None else 0
        self.dimension: int = 0  # set by subclasses: the pooled vector's size

    # ---- inputs ----
    def tokenize(self, inputs: list[str] | list[list[int]], truncate: bool | int = False,
                 param: str = "input") -> Inputs:
        """Texts or token-id lists -> Inputs. truncate: False (too long is an error naming `param`), True (cut to
        the model's limit) or a token count (cut to at most that many, and to the limit)."""
        limit = self.max_tokens
        if truncate is not True and truncate is not False:
            if int(truncate) < 1:
                raise InvalidRequestError(f"the truncation length must be at least 1, got {truncate}", param=param)
            limit = min(limit, int(truncate))
        out, dropped = [], 0
        for i, item in enumerate(inputs):
            where = f"{param}[{i}]" if len(inputs) > 1 else param
            if isinstance(item, str):
                ids, cut = self._encode(item, limit if truncate is not False else None)
            else:
                bad = next((t for t in item if not 0 <= t < self.vocab_size), None)
                if bad is not None:
                    raise InvalidRequestError(f"{where}: token id {bad} is outside the vocabulary [0, "
                                              f"{self.vocab_size})", param=param)
                ids, cut = (list(item[:limit]), max(0, len(item) - limit)) if truncate is not False \
                    else (list(item), 0)
            if not ids:
                raise InvalidRequestError(f"{where} is empty: send at least one token of text", param=param)
            if len(ids) > limit:
                raise InvalidRequestError(
                    f"{where} is {len(ids):,} tokens but {self.name} embeds at most {limit:,}: shorten it, or ask "
                    "for truncation (truncate_prompt_tokens on /v1/embeddings, truncate on /api/embed)", param=param)
            out.append(ids)
            dropped += cut
        return Inputs(out, dropped)

    def _encode(self, text: str, limit: int | None) -> tuple[list[int], int]:
        """Text -> ids with special tokens; cut to `limit` tokens (special ones kept) when limit is given."""
        if not text:
            return [], 0
        text = self.spec.prompt + text
        backend = getattr(self.tokenizer, "backend", None)
        if backend is None:  # a tokenizer without the Rust backend (transformers fallback): cut the ids
            ids = self.tokenizer.encode(text)
            return (ids, 0) if limit is None or len(ids) <= limit else (ids[:limit], len(ids) - limit)
        enc = backend.encode(text, add_special_tokens=False)
        n = len(enc.ids)
        if limit is not None and n + self._num_special > limit:
            enc.truncate(max(0, limit - self._num_special))
        return backend.post_process(enc).ids, n - len(enc.ids)

    # ---- vectors ----
    def embed_ids(self, rows: list[list[int]]) -> torch.Tensor:
        """Pooled vectors [B, dimension] float32 on the CPU (normalized when the model's pipeline says so)."""
        v = self.forward_pooled(rows)
        if self.spec.normalize:
            v = F.normalize(v, p=2, dim=1)
        return v.cpu()

    def forward_pooled(self, rows: list[list[int]]) -> torch.Tensor:
        raise NotImplementedError

    def check_dimensions(self, dimensions: int | None, param: str = "dimensions") -> int | None:
        """None or the full size: no cut. Else the size to cut to, if the model was trained for it."""
        if dimensions is None or dimensions == self.dimension:
            return None
        if not self.spec.matryoshka:
            raise InvalidRequestError(f"{self.name} has no Matryoshka training, so its vectors cannot be shortened: "
                                      f"leave {param} out (or at {self.dimension})", param=param)
        allowed = self.spec.matryoshka_dimensions
        if dimensions < 1 or dimensions > self.dimension or (allowed and dimensions not in allowed):
            sizes = ", ".join(map(str, allowed)) if allowed else f"1..{self.dimension}"
            raise InvalidRequestError(f"{param} must be one of {sizes} for {self.name}, got {dimensions}",
                                      param=param)
        return dimensions

    def cut(self, vectors: torch.Tensor, dimensions: int | None) -> torch.Tensor:
        """Vectors cut to `dimensions` (checked by check_dimensions), re-normalized when the model normalizes."""
        if dimensions is None:
            return vectors
        v = vectors[:, :dimensions]
        return F.normalize(v, p=2, dim=1) if self.spec.normalize else v


def batches(rows: list[list[int]], max_rows: int, max_cost: int, padded: bool) -> list[list[int]]:
    """Indices of rows grouped for forwards: sorted by length, each group within max_rows rows and max_cost tokens
    (padded: rows x longest; packed: the sum); a row longer than max_cost goes alone. Padded groups also split
    where padding would outweigh the real tokens (a long row does not pad many short ones)."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    groups: list[list[int]] = []
    cur: list[int] = []
    total = 0
    for i in order:
        n = len(rows[i])
        cost = n * (len(cur) + 1) if padded else total + n
        if cur and (len(cur) >= max_rows or cost > max_cost or padded and cost > 2 * (total + n) + 64):
            groups.append(cur)
            cur, total = [], 0
        cur.append(i)
        total += n
    if cur:
        groups.append(cur)
    return groups


# ---- BERT-family encoders ----

def is_encoder_dir(path: str | Path) -> bool:
    """Whether path is an HF directory of a BERT-family encoder (config.json model_type)."""
    from .models.bert import ENCODER_TYPES

    p = Path(path)
    if not p.is_dir():
        return False
    cfg = _read_json(p / "config.json")
    return isinstance(cfg, dict) and cfg.get("model_type") in ENCODER_TYPES


class EncoderEmbedder(Embedder):
    """A BERT-family sentence-transformers model, computed whole by models/bert.py (no KV cache)."""

    padded = True

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype = "auto"):
        from .loader.load import resolve_dtype
        from .loader.safetensors import SafetensorsWeights
        from .loader.tokenizer import tokenizer_from_dir
        from .models.bert import BertEncoder, EncoderConfig

        start = time.perf_counter()
        self.path = Path(path)
        device = torch.device(device)
        self.dtype = resolve_dtype(dtype, device)
        self.device = device
        cfg = EncoderConfig.from_hf(_read_json(self.path / "config.json"))
        st = SafetensorsWeights(self.path)
        self.model = BertEncoder(cfg, lambda n: None if (t := st.get(n)) is None else t.to(device, self.dtype))
        tokenizer = tokenizer_from_dir(self.path, [])
        spec = PoolingSpec.from_dir(self.path) or PoolingSpec(modes=("cls",))  # a bare BERT: its [CLS] state
        limit = min(cfg.max_tokens, spec.max_seq_length or cfg.max_tokens)
        super().__init__(tokenizer, spec, cfg.vocab_size, limit, self.path.name)
        self.config = cfg
        self.dimension = cfg.hidden_size * len(spec.modes)
        self.load_seconds = time.perf_counter() - start

    def forward_pooled(self, rows: list[list[int]]) -> torch.Tensor:
        states, mask = self.model.forward(rows)
        return pool(states[mask], [len(r) for r in rows], self.spec.modes)

    @property
    def weights_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.model.weight_tensors())


# ---- decoders served by an LLMEngine ----

class DecoderEmbedder(Embedder):
    """A decoder embedding model loaded by the engine: each input is a pooling request that the engine's
    scheduler batches beside generation (chunked prefill, prefix cache for last-token pooling, preemption), pooled
    from the final-norm hidden states it returns. embed_ids steps an idle engine itself (LLM.embed);
    embed_async goes through a running AsyncEngine (the server)."""

    def __init__(self, engine, spec: PoolingSpec):
        cfg = engine.model_config
        limit = min(engine.max_model_len, spec.max_seq_length or engine.max_model_len)
        super().__init__(engine.tokenizer, spec, cfg.vocab_size, limit, engine.loaded.path.name)
        self.engine = engine
        self.dimension = cfg.hidden_size * len(spec.modes)
        self.all_rows = any(m != "lasttoken" for m in spec.modes)  # else the engine returns last rows only

    @classmethod
    def for_engine(cls, engine, name: str) -> DecoderEmbedder:
        """The embedder of an engine's model, or an error naming `model` when it is a generative model."""
        spec = pooling_spec(engine.loaded.path)
        if spec is None:
            raise InvalidRequestError(
                f"model {name!r} is a text-generation model, not an embedding model: it names no pooling (a "
                "sentence-transformers modules.json with a Pooling module, or a GGUF pooling_type), so its hidden "
                "states are not trained as embeddings; serve an embedding model (Qwen3-Embedding, "
                "all-MiniLM-L6-v2, ...)", param="model")
        return cls(engine, spec)

    def pool_states(self, states: list[torch.Tensor]) -> torch.Tensor:
        """The engine's hidden states per input ([tokens or 1, H]) -> normalized vectors [B, dimension] (CPU)."""
        v = pool(torch.cat(states), [s.shape[0] for s in states], self.spec.modes)
        return F.normalize(v, p=2, dim=1) if self.spec.normalize else v

    @torch.inference_mode()
    def embed_ids(self, rows: list[list[int]]) -> torch.Tensor:
        eng = self.engine
        ids = [eng.add_pooling_request(r, self.all_rows) for r in rows]
        done: dict[str, torch.Tensor] = {}
        try:
            while len(done) < len(ids):
                if not eng.has_unfinished():
                    raise UnavailableError("the engine stopped before the embeddings were computed", retry_after=1)
                for out in eng.step(emit_unfinished=False):
                    if out.error is not None:
                        raise out.error
                    if out.hidden_states is not None:
                        done[out.request_id] = out.hidden_states
        finally:
            for rid in ids:
                if rid not in done:
                    eng.abort_request(rid)
        return self.pool_states([done[r] for r in ids])

    async def embed_async(self, aengine, rows: list[list[int]]) -> torch.Tensor:
        """The vectors of rows through a running AsyncEngine: one pooling request each, batched by its scheduler
        with whatever else runs."""
        return self.pool_states(await aengine.pool(rows, self.all_rows))


def embedder_of(engine, name: str = "") -> Embedder:
    """The embedder of an LLMEngine or EncoderEngine (cached on the engine)."""
    if isinstance(getattr(engine, "embedder", None), EncoderEmbedder):  # embed_engine.EncoderEngine
        return engine.embedder
    emb = _DECODER_EMBEDDERS.get(engine)
    if emb is None:
        emb = _DECODER_EMBEDDERS[engine] = DecoderEmbedder.for_engine(engine, name or engine.loaded.path.name)
    return emb


_DECODER_EMBEDDERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
