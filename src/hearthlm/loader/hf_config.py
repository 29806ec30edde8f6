"""ModelConfig from an HF `config.json` dict or from GGUF metadata, without touching weights."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from ..config import ModelConfig
from ..errors import UnsupportedModelError

# HF `architectures[0]` / `model_type` -> our family name
HF_FAMILIES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "MixtralForCausalLM": "mixtral",
    "Phi3ForCausalLM": "phi3",
}
MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2",
               "gemma3_text": "gemma3",
               "qwen3_moe": "qwen3_moe", "mixtral": "mixtral", "phi3": "phi3"}


def _eos_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def config_from_hf_dict(d: dict[str, Any], name: str = "") -> ModelConfig:
    """Build a ModelConfig from the contents of an HF config.json."""
    archs = d.get("architectures") or []
    family = next((HF_FAMILIES[a] for a in archs if a in HF_FAMILIES), None) or MODEL_TYPES.get(d.get("model_type", ""))
    if family is None:
        raise UnsupportedModelError(
            f"model architecture {archs or d.get('model_type')!r} is not supported; supported: "
            f"{', '.join(sorted(HF_FAMILIES))}"
        )
    n_layers = int(d["num_hidden_layers"])
    n_heads = int(d["num_attention_heads"])
    hidden = int(d["hidden_size"])
    head_dim = int(d.get("head_dim") or hidden // n_heads)
    windows: list[int | None] = [None] * n_layers
    sw = d.get("sliding_window")
    if family in ("mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe") and sw and \
            (family in ("mistral", "mixtral") or d.get("use_sliding_window")):
        max_window_layers = d.get("max_window_layers", n_layers) if family not in ("mistral", "mixtral") else 0
        layer_types = d.get("layer_types")
        for i in range(n_layers):
            if layer_types:
                windows[i] = int(sw) if layer_types[i] == "sliding_attention" else None
            elif i >= max_window_layers or family in ("mistral", "mixtral"):
                windows[i] = int(sw)
    cfg = ModelConfig(
        architecture=family,
        vocab_size=int(d["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(d["intermediate_size"]),
        num_layers=n_layers,
        num_heads=n_heads,
        num_kv_heads=int(d.get("num_key_value_heads") or n_heads),
        head_dim=head_dim,
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope_theta=float(d.get("rope_theta") or (d.get("rope_parameters") or {}).get("rope_theta") or 10000.0),
        rope_scaling=_rope_scaling(d),
        max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", family in ("gemma2", "gemma3"))),
        attention_bias=bool(d.get("attention_bias", family == "qwen2")),
        qk_norm=family in ("qwen3", "qwen3_moe"),
        hidden_act=d.get("hidden_activation") or d.get("hidden_act") or "silu",
        layer_windows=windows,
        bos_token_id=d.get("bos_token_id"),
        eos_token_ids=_eos_list(d.get("eos_token_id")),
        name=name,
    )
    if family == "phi3":
        _phi3_from_hf(cfg, d)
    if cfg.rope_scaling and cfg.rope_scaling["rope_type"] == "dynamic":  # the context it scales to (vLLM's rule)
        cfg.max_position_embeddings = int(cfg.max_position_embeddings * cfg.rope_scaling["factor"])
    if family == "gemma2":
        sw = int(d.get("sliding_window") or 4096)
        layer_types = d.get("layer_types")
        cfg.layer_windows = [
            (sw if (layer_types[i] == "sliding_attention" if layer_types else i % 2 == 0) else None)
            for i in range(n_layers)
        ]
        cfg.attn_logit_softcapping = d.get("attn_logit_softcapping")
        cfg.final_logit_softcapping = d.get("final_logit_softcapping")
        cfg.query_pre_attn_scalar = d.get("query_pre_attn_scalar")
        cfg.embedding_scale = float(hidden) ** 0.5
        cfg.post_norms = True
        cfg.hidden_act = d.get("hidden_activation") or "gelu_pytorch_tanh"
    elif family == "gemma3":
        return _gemma3_from_hf(cfg, d)
    elif family in ("qwen3_moe", "mixtral"):
        _moe_from_hf(cfg, d)
    return cfg


def _phi3_from_hf(cfg: ModelConfig, d: dict[str, Any]) -> None:
    """Phi-3: a sliding window on every layer where the config sets one; partial rotary (Phi-4-mini) as
    rope_scaling's rotary_dim (kernels/rope.py, models/phi3.py)."""
    rotary_dim = int(cfg.head_dim * float(d.get("partial_rotary_factor") or 1.0))
    if rotary_dim < cfg.head_dim:
        cfg.rope_scaling = dict(cfg.rope_scaling or {"rope_type": "default"}, rotary_dim=rotary_dim)
    if d.get("sliding_window"):
        cfg.layer_windows = [int(d["sliding_window"])] * cfg.num_layers


def _moe_from_hf(cfg: ModelConfig, d: dict[str, Any]) -> None:
    """Qwen3-MoE: num_experts, moe_intermediate_size, norm_topk_prob, dense layers (mlp_only_layers, and those off
    decoder_sparse_step); Mixtral: num_local_experts, the top-k weights always renormalized."""
    n = cfg.num_layers
    if cfg.architecture == "mixtral":
        cfg.num_experts = int(d["num_local_experts"])
        cfg.moe_intermediate_size = cfg.intermediate_size
        cfg.norm_topk_prob = True
    else:
        cfg.num_experts = int(d.get("num_experts") or d.get("num_local_experts") or 0)  # the Hub's / transformers 5's
        cfg.moe_intermediate_size = int(d["moe_intermediate_size"])
        cfg.norm_topk_prob = bool(d.get("norm_topk_prob", False))
        step = int(d.get("decoder_sparse_step") or 1)
        only = set(int(i) for i in d.get("mlp_only_layers") or [])
        cfg.dense_layers = [i for i in range(n) if i in only or cfg.num_experts == 0 or (i + 1) % step != 0]
    cfg.num_experts_per_tok = int(d["num_experts_per_tok"])
    if not 0 < cfg.num_experts_per_tok <= cfg.num_experts:
        raise UnsupportedModelError(f"num_experts_per_tok {cfg.num_experts_per_tok} must lie in 1..{cfg.num_experts}")


def _rope_scaling(d: dict[str, Any]) -> dict | None:
    rs = d.get("rope_scaling") or d.get("rope_parameters")
    if not rs:
        return None
    kind = rs.get("rope_type") or rs.get("type")
    if kind in (None, "default"):
        return None
    if kind not in ("llama3", "linear", "yarn", "dynamic", "longrope", "su"):
        raise UnsupportedModelError(f"rope scaling type {kind!r} is not supported yet (supported: llama3, linear, "
                                    "yarn, dynamic, longrope)")
    out = dict(rs, rope_type=kind)
    if kind in ("longrope", "su"):  # factors fixed by the context the engine allows (kernels/rope.py)
        out["rope_type"] = "longrope"
        out.setdefault("original_max_position_embeddings", d.get("original_max_position_embeddings")
                       or d.get("max_position_embeddings"))
        out["max_position_embeddings"] = d.get("max_position_embeddings")
    if kind == "dynamic":  # HF's original length is max_position_embeddings; the base is static (kernels/rope.py)
        out["original_max_position_embeddings"] = d.get("max_position_embeddings")
    if kind == "yarn":
        out.setdefault("original_max_position_embeddings", d.get("original_max_position_embeddings")
                       or d.get("max_position_embeddings"))
        if out.get("factor") is None:  # HF: the ratio of the context lengths
            out["factor"] = d["max_position_embeddings"] / out["original_max_position_embeddings"]
    return out


# GGUF general.architecture -> family
GGUF_FAMILIES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2", "gemma3": "gemma3",
                 "mistral": "llama", "qwen3moe": "qwen3_moe"}


def config_from_gguf_metadata(md: dict[str, Any], name: str = "") -> ModelConfig:
    """Build a ModelConfig from GGUF key/values (plain Python values, arrays as lists or lengths)."""
    arch = md.get("general.architecture")
    family = GGUF_FAMILIES.get(arch)
    if family is None:
        raise UnsupportedModelError(
            f"GGUF architecture {arch!r} is not supported; supported: {', '.join(sorted(GGUF_FAMILIES))}"
        )

    def get(key: str, default: Any = None) -> Any:
        return md.get(f"{arch}.{key}", default)

    n_layers = int(get("block_count"))
    n_heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    head_dim = int(get("attention.key_length") or get("rope.dimension_count") or hidden // n_heads)
    vocab = get("vocab_size")
    if vocab is None:
        tokens = md.get("tokenizer.ggml.tokens")
        vocab = tokens if isinstance(tokens, int) else len(tokens)
    n_kv = get("attention.head_count_kv", n_heads)
    eos = md.get("tokenizer.ggml.eos_token_id")
    cfg = ModelConfig(
        architecture=family,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=n_layers,
        num_heads=n_heads,
        num_kv_heads=int(n_kv),
        head_dim=head_dim,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=None,  # Llama-3 scaling arrives as the rope_freqs tensor (see loader.gguf)
        max_position_embeddings=int(get("context_length", 4096)),
        tie_word_embeddings=not md.get("_has_output_weight", True),  # set by the reader from the tensor list
        attention_bias=family == "qwen2",
        qk_norm=family in ("qwen3", "qwen3_moe"),
        bos_token_id=md.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=_eos_list(eos),
        name=name or str(md.get("general.name", "")),
    )
    if get("rope.scaling.type") == "yarn":
        cfg.rope_scaling = {"rope_type": "yarn", "factor": float(get("rope.scaling.factor")),
                            "original_max_position_embeddings": int(get("rope.scaling.original_context_length")),
                            "beta_fast": float(get("rope.scaling.yarn_beta_fast", 32.0)),
                            "beta_slow": float(get("rope.scaling.yarn_beta_slow", 1.0))}
    sw = get("attention.sliding_window")
    if family == "gemma2":
        sw = int(sw or 4096)
        cfg.layer_windows = [sw if i % 2 == 0 else None for i in range(n_layers)]
        cfg.attn_logit_softcapping = get("attn_logit_softcapping")
        cfg.final_logit_softcapping = get("final_logit_softcapping")
        # llama.cpp: Gemma-2 27B (46 layers) scales by hidden/heads, the others by head_dim
        cfg.query_pre_attn_scalar = float(hidden // n_heads if n_layers == 46 else head_dim)
        cfg.embedding_scale = float(hidden) ** 0.5
        cfg.post_norms = True
        cfg.hidden_act = "gelu_pytorch_tanh"
    elif family == "gemma3":
        return _gemma3_from_gguf(cfg, get, md)
    elif sw:
        cfg.layer_windows = [int(sw)] * n_layers
    if get("expert_count"):  # qwen3moe, or llama with experts (Mixtral); llama.cpp renormalizes their top k
        if family == "llama":
            cfg.architecture = "mixtral"
        cfg.num_experts, cfg.num_experts_per_tok = int(get("expert_count")), int(get("expert_used_count"))
        cfg.moe_intermediate_size = int(get("expert_feed_forward_length") or cfg.intermediate_size)
        cfg.norm_topk_prob = True
    return cfg


# ---- Gemma 3 text: local (sliding) and global layers, each kind with its own RoPE
@dataclass
class Gemma3Config(ModelConfig):
    """rope_theta and rope_scaling are the global layers'; the local (sliding-window) layers rotate with
    rope_local_theta and no scaling."""

    rope_local_theta: float = 10000.0


def _gemma3(cfg: ModelConfig, sliding: list[bool], window: int, local_theta: float, scalar: float,
            softcaps: tuple[float | None, float | None]) -> Gemma3Config:
    g = Gemma3Config(**{f.name: getattr(cfg, f.name) for f in fields(ModelConfig)}, rope_local_theta=local_theta)
    g.layer_windows = [window if s else None for s in sliding]
    g.qk_norm, g.post_norms, g.query_pre_attn_scalar = True, True, float(scalar)
    g.attn_logit_softcapping, g.final_logit_softcapping = (float(c) if c else None for c in softcaps)
    g.embedding_scale = float(g.hidden_size) ** 0.5
    return g


def _gemma3_from_hf(cfg: ModelConfig, d: dict[str, Any]) -> Gemma3Config:
    """Old configs: rope_theta, rope_local_base_freq, rope_scaling, sliding_window_pattern; transformers >= 5:
    rope_parameters per layer type and layer_types."""
    if d.get("use_bidirectional_attention"):
        raise UnsupportedModelError("bidirectional Gemma 3 (EmbeddingGemma) is not supported: hearthlm runs Gemma 3 "
                                    "text models as causal decoders")
    n = cfg.num_layers
    types = d.get("layer_types") or ["full_attention" if (i + 1) % int(d.get("sliding_window_pattern") or 6) == 0
                                     else "sliding_attention" for i in range(n)]
    rp = d.get("rope_parameters") or {}
    full, local = rp.get("full_attention") or {}, rp.get("sliding_attention") or {}
    if local.get("rope_type") not in (None, "default"):
        raise UnsupportedModelError(f"Gemma 3 local-layer rope type {local['rope_type']!r} is not supported")
    cfg.rope_theta = float(full.get("rope_theta") or d.get("rope_theta") or 1_000_000.0)
    cfg.rope_scaling = _rope_scaling({"rope_scaling": d.get("rope_scaling") or full})
    cfg.hidden_act = d.get("hidden_activation") or "gelu_pytorch_tanh"
    return _gemma3(cfg, [t == "sliding_attention" for t in types], int(d.get("sliding_window") or 4096),
                   float(local.get("rope_theta") or d.get("rope_local_base_freq") or 10000.0),
                   d.get("query_pre_attn_scalar") or 256,
                   (d.get("attn_logit_softcapping"), d.get("final_logit_softcapping")))


def _gemma3_from_gguf(cfg: ModelConfig, get: Any, md: dict[str, Any]) -> Gemma3Config:
    """As llama.cpp reads gemma3: every 6th layer global (or attention.sliding_window_pattern), local layers at
    base 10000 unscaled, the 27B (62 layers) scaling queries by hidden/heads, the others by head_dim."""
    n = cfg.num_layers
    pattern = get("attention.sliding_window_pattern")
    if isinstance(pattern, list):
        sliding = [bool(p) for p in pattern]
    else:
        sliding = [(i + 1) % int(pattern or 6) != 0 for i in range(n)]
    if get("rope.scaling.type") == "linear" and get("rope.scaling.factor"):
        cfg.rope_scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    cfg.rope_theta = float(get("rope.freq_base", 1_000_000.0))
    cfg.hidden_act = "gelu_pytorch_tanh"
    tokens = md.get("tokenizer.ggml.tokens")
    if isinstance(tokens, list) and "<end_of_turn>" in tokens:  # a chat turn's end (llama.cpp: end of generation)
        cfg.eos_token_ids = sorted(set(cfg.eos_token_ids) | {tokens.index("<end_of_turn>")})
    scalar = cfg.hidden_size // cfg.num_heads if n == 62 else cfg.head_dim
    return _gemma3(cfg, sliding, int(get("attention.sliding_window") or 4096), 10000.0, scalar,
                   (get("attn_logit_softcapping"), get("final_logit_softcapping")))
