"""BERT-family encoders (BERT, RoBERTa, XLM-RoBERTa) as sentence-transformers ship them: the token states of the
last layer, which embed.py pools. Plain torch, post-norm blocks, bidirectional attention over right-padded rows.

Weights are looked up by their HF names, with or without the `bert.` / `roberta.` prefix of task checkpoints."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..errors import ModelLoadError, UnsupportedModelError

# HF model_type -> whether positions start after the padding id (RoBERTa's learned-position offset)
ENCODER_TYPES = {"bert": False, "roberta": True, "xlm-roberta": True, "camembert": True}
_ACTS = {"gelu": lambda x: F.gelu(x), "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
         "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu, "silu": F.silu}


@dataclass
class EncoderConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    layer_norm_eps: float
    hidden_act: str
    pad_token_id: int

    @property
    def position_offset(self) -> int:
        """First position id: RoBERTa numbers real tokens from padding_idx + 1."""
        return self.pad_token_id + 1 if ENCODER_TYPES[self.model_type] else 0

    @property
    def max_tokens(self) -> int:
        """The longest input the position table covers."""
        return self.max_position_embeddings - self.position_offset

    @property
    def num_params(self) -> int:
        h, i = self.hidden_size, self.intermediate_size
        return (self.vocab_size + self.max_position_embeddings) * h + self.num_layers * (4 * h * h + 2 * h * i)

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> EncoderConfig:
        kind = d.get("model_type", "")
        if kind not in ENCODER_TYPES:
            raise UnsupportedModelError(f"encoder model_type {kind!r} is not supported; supported: "
                                        f"{', '.join(sorted(ENCODER_TYPES))}")
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise UnsupportedModelError(f"position_embedding_type {d['position_embedding_type']!r} is not supported "
                                        "(absolute positions only)")
        act = d.get("hidden_act", "gelu")
        if act not in _ACTS:
            raise UnsupportedModelError(f"hidden_act {act!r} is not supported for encoders ({', '.join(_ACTS)})")
        return cls(kind, int(d["vocab_size"]), int(d["hidden_size"]), int(d["num_hidden_layers"]),
                   int(d["num_attention_heads"]), int(d["intermediate_size"]), int(d["max_position_embeddings"]),
                   float(d.get("layer_norm_eps", 1e-12)), act, int(d.get("pad_token_id") or 0))


_PREFIXES = ("", "bert.", "roberta.", "model.")


class BertEncoder:
    """The encoder's weights and forward. get(name) -> tensor or None (HF names without a task prefix)."""

    def __init__(self, cfg: EncoderConfig, get: Callable[[str], torch.Tensor | None]):
        self.cfg = cfg
        self.act = _ACTS[cfg.hidden_act]

        def need(name: str) -> torch.Tensor:
            for p in _PREFIXES:
                t = get(p + name)
                if t is not None:
                    return t
            raise ModelLoadError(f"weight {name!r} is missing from the checkpoint: the file is incomplete or "
                                 "belongs to another architecture; re-download the model")

        def ln(prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
            return need(prefix + ".weight"), need(prefix + ".bias")

        self.word = need("embeddings.word_embeddings.weight")
        self.pos = need("embeddings.position_embeddings.weight")
        self.type0 = need("embeddings.token_type_embeddings.weight")[0]  # sentence embeddings use segment 0
        self.emb_ln = ln("embeddings.LayerNorm")
        self.layers = []
        for i in range(cfg.num_layers):
            p = f"encoder.layer.{i}."
            att = p + "attention.self."
            qkv_w = torch.cat([need(att + f"{n}.weight") for n in ("query", "key", "value")])
            qkv_b = torch.cat([need(att + f"{n}.bias") for n in ("query", "key", "value")])
            self.layers.append({
                "qkv": (qkv_w, qkv_b), "o": (need(p + "attention.output.dense.weight"),
                                             need(p + "attention.output.dense.bias")),
                "ln1": ln(p + "attention.output.LayerNorm"),
                "up": (need(p + "intermediate.dense.weight"), need(p + "intermediate.dense.bias")),
                "down": (need(p + "output.dense.weight"), need(p + "output.dense.bias")),
                "ln2": ln(p + "output.LayerNorm")})

    @property
    def dtype(self) -> torch.dtype:
        return self.word.dtype

    @property
    def device(self) -> torch.device:
        return self.word.device

    def weight_tensors(self) -> list[torch.Tensor]:
        out = [self.word, self.pos, *self.emb_ln]
        for layer in self.layers:
            for pair in layer.values():
                out.extend(pair)
        return out

    @torch.inference_mode()
    def forward(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """rows: token ids per input (each at most cfg.max_tokens) -> (states [B, L, hidden], mask [B, L] bool),
        rows right-padded to the longest."""
        cfg, dev = self.cfg, self.device
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), cfg.pad_token_id, dtype=torch.long)
        lens = torch.tensor([len(r) for r in rows])
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask = (torch.arange(width)[None, :] < lens[:, None]).to(dev)
        ids = ids.to(dev)
        pos = torch.arange(cfg.position_offset, cfg.position_offset + width, device=dev)
        h = self.word[ids] + (self.pos[pos] + self.type0)[None]
        eps = cfg.layer_norm_eps
        h = F.layer_norm(h, (cfg.hidden_size,), *self.emb_ln, eps)
        b, heads = len(rows), cfg.num_heads
        hd = cfg.hidden_size // heads
        attn_mask = mask[:, None, None, :]  # [B, 1, 1, L]: keys that are real tokens
        for layer in self.layers:
            qkv = F.linear(h, *layer["qkv"]).view(b, width, 3, heads, hd).permute(2, 0, 3, 1, 4)
            ctx = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=attn_mask)
            ctx = ctx.transpose(1, 2).reshape(b, width, cfg.hidden_size)
            h = F.layer_norm(F.linear(ctx, *layer["o"]) + h, (cfg.hidden_size,), *layer["ln1"], eps)
            up = self.act(F.linear(h, *layer["up"]))
            h = F.layer_norm(F.linear(up, *layer["down"]) + h, (cfg.hidden_size,), *layer["ln2"], eps)
        return h, mask
