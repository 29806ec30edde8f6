"""Llama-style decoder: Llama 2/3.x, SmolLM, Mistral (sliding window), Qwen2 (qkv bias), Qwen3 (q/k norm).

Weights are looked up by their HF names; q/k/v and gate/up are fused at load.
"""
from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .. import kernels as K
from ..config import ModelConfig
from ..errors import InvalidRequestError, ModelLoadError
from ..layers.activation import gated_act
from ..kernels.quant_gemv_a8 import QuantizedX
from ..kernels.kv_quant import KVPool
from ..layers.attention import paged_attention
from ..layers.linear import Linear
from ..layers.norm import rms_norm
from ..layers.rotary import Rotary, apply_rotary

WeightGetter = Callable[[str], "torch.Tensor | None"]
log = logging.getLogger("hearthlm")


def require(get: WeightGetter, name: str) -> torch.Tensor:
    w = get(name)
    if w is None:
        raise ModelLoadError(f"weight {name!r} is missing from the checkpoint: the file is incomplete or "
                             "belongs to another architecture; re-download the model")
    return w


class LlamaLayer:
    """A decoder block's weights and its reference forward (torch ops, any device, any attention backend).

    The runner binds each block to the forward of its side (LlamaModel.bind): this class, NativeLlamaLayer (the
    native CPU kernel's fused entry points) or FusedLlamaLayer (the fused GPU kernels). Every forward has one
    signature: (h, residual, meta, kv_cache) -> (h, residual); residual is the fused paths' separate residual
    stream (their h is then the block's delta), None for the others."""

    native_cls: type[LlamaLayer] | None = None  # set below
    fused_cls: type[LlamaLayer] | None = None
    compiles = True  # --compile may trace the reference forward (models/cpu_compile.py)
    sinks: torch.Tensor | None = None  # [heads] float32 attention sinks of families that have them (gpt-oss)

    def __init__(self, cfg: ModelConfig, idx: int, get: WeightGetter):
        p = f"model.layers.{idx}."
        self.cfg, self.idx = cfg, idx
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        att = p + "self_attn."
        self.qkv = Linear.fused([require(get, att + f"{n}_proj.weight") for n in "qkv"],
                                [get(att + f"{n}_proj.bias") for n in "qkv"])
        self.o = Linear(require(get, att + "o_proj.weight"), get(att + "o_proj.bias"))
        self.q_norm = get(att + "q_norm.weight") if cfg.qk_norm else None
        self.k_norm = get(att + "k_norm.weight") if cfg.qk_norm else None
        self.init_mlp(get, p)
        self.input_norm = require(get, p + "input_layernorm.weight")
        self.post_attn_norm = require(get, p + "post_attention_layernorm.weight")

    def init_mlp(self, get: WeightGetter, p: str) -> None:
        """The block's MLP weights (p: the block's name prefix); mixture-of-experts blocks override it."""
        self.gate_up = Linear.fused([require(get, p + "mlp.gate_proj.weight"), require(get, p + "mlp.up_proj.weight")])
        self.down = Linear(require(get, p + "mlp.down_proj.weight"))

    @classmethod
    def fusable(cls, cfg: ModelConfig) -> bool:
        """Whether fused_cls can run this config (its activation has a fused kernel)."""
        return cls.fused_cls is not None and cfg.hidden_act == "silu"

    def rebind(self, cls: type[LlamaLayer]) -> LlamaLayer:
        """This block's weights under another forward (a class of the same family)."""
        if type(self) is cls:
            return self
        layer = cls.__new__(cls)
        layer.__dict__.update(self.__dict__)
        return layer

    def norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, w, self.cfg.rms_norm_eps)

    def project_qkv(self, x: torch.Tensor, xa: QuantizedX | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # x: [num_tokens, hidden] -> q [T, heads, head_dim], k/v [T, kv_heads, head_dim] (views of one buffer)
        cfg, n = self.cfg, x.shape[0]
        q, k, v = self.qkv(x, xa).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        return (q.view(n, cfg.num_heads, cfg.head_dim), k.view(n, cfg.num_kv_heads, cfg.head_dim),
                v.view(n, cfg.num_kv_heads, cfg.head_dim))

    def attention(self, h: torch.Tensor, meta, kv_cache: tuple[KVPool, KVPool]) -> torch.Tensor:
        # h: [num_tokens, hidden]
        return self.o(self.attend(h, meta, kv_cache))

    def attend(self, h: torch.Tensor, meta, kv_cache: tuple[KVPool, KVPool]) -> torch.Tensor:
        """Attention before the output projection. h: [num_tokens, hidden] -> [num_tokens, heads * head_dim]."""
        if self.q_norm is not None:
            q, k, v = self.project_qkv(h)
            cos, sin = meta.cos, meta.sin
            q, k = apply_rotary(self.norm(q, self.q_norm), cos, sin), apply_rotary(self.norm(k, self.k_norm), cos, sin)
            return self._attend(q, k, v, meta, kv_cache)
        # a CPU int4 projection stays in bf16: RoPE's products with float32 cos/sin upcast it exactly and write_kv
        # casts v to the pool's dtype
        return self.attend_qkv(self.qkv.native_dtype(h), meta, kv_cache)

    def attend_qkv(self, qkv: torch.Tensor, meta, kv_cache: tuple[KVPool, KVPool]) -> torch.Tensor:
        """attend from the fused q/k/v projection (q/k norms, if any, applied): q and k are adjacent, so one RoPE
        covers both."""
        cfg, n = self.cfg, qkv.shape[0]
        qk = apply_rotary(qkv[:, :self.q_size + self.kv_size].view(n, -1, cfg.head_dim), meta.cos, meta.sin)
        q, k = qk[:, :cfg.num_heads], qk[:, cfg.num_heads:]
        v = qkv[:, self.q_size + self.kv_size:].view(n, cfg.num_kv_heads, cfg.head_dim)
        return self._attend(q, k, v, meta, kv_cache)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta,
                kv_cache: tuple[KVPool, KVPool]) -> torch.Tensor:
        cfg = self.cfg
        o = paged_attention(q, k, v, kv_cache, meta, self.idx, cfg.attn_scale, cfg.attn_logit_softcapping,
                            sinks=self.sinks)
        return o.reshape(q.shape[0], self.q_size)

    def fused_attention(self, x: torch.Tensor, xa: QuantizedX | None, meta, kv_cache: tuple[KVPool, KVPool]
                        ) -> torch.Tensor:
        """Fused GPU blocks: q/k/v projection, RoPE (+ q/k norms) and the K/V write in one kernel, attention:
        x: [num_tokens, hidden] -> [num_tokens, heads * head_dim]."""
        cfg = self.cfg
        q, k, v = self.project_qkv(x, xa)
        kc, vc = kv_cache  # unscaled pools: RoPE's kernel stores k and v too (one launch less)
        write = (v, kc, vc, meta.groups[meta.layer_group[self.idx]].slot_mapping) \
            if K.can_fuse_kv_write(kc, vc) else None
        K.apply_rope_(q, k, meta.positions, meta.cos_sin,
                      None if self.q_norm is None else (self.q_norm, self.k_norm, cfg.rms_norm_eps), write)
        o = paged_attention(q, k, v, kv_cache, meta, self.idx, cfg.attn_scale, cfg.attn_logit_softcapping,
                            kv_written=write is not None, sinks=self.sinks)
        return o.reshape(x.shape[0], self.q_size)

    def mlp(self, h: torch.Tensor) -> torch.Tensor:
        return self.down(gated_act(self.gate_up(h), self.cfg.hidden_act))

    @functools.cached_property
    def native(self) -> bool:
        """Whether every projection runs the native CPU kernel (kernels/cpu_quant.py), so that the block can fuse
        the norms into the q/k/v and gate/up matmuls, SiLU * mul into down's, and the residual adds into o's and
        down's outputs (NativeLlamaLayer; biases and Qwen3's q/k norms apply between the calls)."""
        return self.native_cls is not None and self.cfg.hidden_act == "silu" and \
            all(lin.native is not None for lin in (self.qkv, self.o, self.gate_up, self.down)) and \
            self.input_norm.dtype == self.post_attn_norm.dtype == torch.float32 and \
            all(b is None or b.dtype == torch.float32 for b in (self.qkv.bias, self.o.bias, self.gate_up.bias,
                                                                 self.down.bias))

    def forward(self, h: torch.Tensor, residual: None, meta, kv_cache: tuple[KVPool, KVPool]
                ) -> tuple[torch.Tensor, None]:
        """h: [num_tokens, hidden] -> the block's output. The residual adds take o/down's bf16 result as is when
        their weights are CPU int4 (Linear.native): adding it to the float32 stream upcasts it exactly, the same sums
        without a cast op."""
        h = torch.add(h, self.o.native_dtype(self.attend(self.norm(h, self.input_norm), meta, kv_cache)))
        return torch.add(h, self.down.native_dtype(gated_act(self.gate_up(self.norm(h, self.post_attn_norm)),
                                                           self.cfg.hidden_act))), None


class NativeLlamaLayer(LlamaLayer):
    """The native CPU kernel's fused entry points (LlamaLayer.native); h (float32) is updated in place. Every row,
    prefill or decode, takes the same per-row arithmetic (the matmuls' residual pass, the native attention), so a
    row's result does not depend on the rows it is batched with."""

    def forward(self, h: torch.Tensor, residual: None, meta, kv_cache: tuple[KVPool, KVPool]
                ) -> tuple[torch.Tensor, None]:
        cfg = self.cfg
        eps = cfg.rms_norm_eps
        if not h.is_contiguous():
            h = h.contiguous()
        qkv = self.qkv.native.run(h, norm=(self.input_norm, eps))
        if self.qkv.bias is not None:
            qkv += self.qkv.bias
        if self.q_norm is not None:  # per-head norms before RoPE (Qwen3), in place
            n, d = qkv.shape[0], cfg.head_dim
            q = qkv[:, :self.q_size].view(n, -1, d)
            k = qkv[:, self.q_size:self.q_size + self.kv_size].view(n, -1, d)
            q.copy_(self.norm(q, self.q_norm))
            k.copy_(self.norm(k, self.k_norm))
        # RoPE, K/V writes and attention in one native call (runtime/backends/native.py), else the torch reference
        native = meta.groups[meta.layer_group[self.idx]].row_attention
        o = native(qkv, *kv_cache, self.sinks) if native is not None else self.attend_qkv(qkv, meta, kv_cache)
        self.o.native.run(o, out=h, accumulate=True)
        if self.o.bias is not None:
            h += self.o.bias
        gate_up = self.gate_up.native.run(h, norm=(self.post_attn_norm, eps))
        if self.gate_up.bias is not None:
            gate_up += self.gate_up.bias
        h = self.down.native.run(gate_up, out=h, accumulate=True, silu_mul=True)
        return (h if self.down.bias is None else h.add_(self.down.bias)), None


class FusedLlamaLayer(LlamaLayer):
    """GPU path with fused kernels: residual add inside RMSNorm, in-place RoPE (writing K/V too where it can),
    fused SiLU*mul; decode rows feed int8-activation GEMVs, each producer quantizing its output in its own launch.
    h: this block's input delta; residual: the stream so far (None before the first fused block)."""

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None, meta, kv_cache: tuple[KVPool, KVPool]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        eps = self.cfg.rms_norm_eps
        n, dev = h.shape[0], h.device
        x, new_res, xa = K.rms_norm_a8(h, self.input_norm, eps, residual, self.qkv.a8_bits(n, dev))
        residual = h if residual is None else new_res
        o = self.fused_attention(x, xa, meta, kv_cache)
        x, residual, xa = K.rms_norm_a8(self.o(o), self.post_attn_norm, eps, residual, self.gate_up.a8_bits(n, dev))
        a, xa = K.silu_and_mul_a8(self.gate_up(x, xa), self.down.a8_bits(n, dev))
        return self.down(a, xa), residual

    def add_norm(self, h: torch.Tensor, w: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """norm(h + residual): the final norm after a fused run."""
        return K.rms_norm(h, w, self.cfg.rms_norm_eps, residual=residual)[0]


LlamaLayer.native_cls, LlamaLayer.fused_cls = NativeLlamaLayer, FusedLlamaLayer


_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.")
_EXPERT_NAME = re.compile(r"^model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.")


@dataclass
class Placement:
    """Where each part of the model lives: --gpu-layers N (llama.cpp's -ngl).

    As in llama.cpp and the memory plan (plan/memory.py): the *last* N blocks, the final norm and the output head
    sit on the main `device`; blocks [0, L - N) sit on `host` (the CPU) as the loader gives them (mmap'd when the
    file stores the compute dtype) and run the torch reference path. The token embedding is on the host too unless
    it is tied to the output head (then it is the head, on the device). A step's hidden state crosses host ->
    device once (a tied embedding adds one device -> host hop after the lookup); logits and sampling stay on the
    device. None (or N = L) puts everything on `device`."""

    device: torch.device
    num_layers: int
    gpu_layers: int | None = None
    host: torch.device = field(default_factory=lambda: torch.device("cpu"))
    tied_embedding: bool = True  # the output head is the token embedding
    cpu_moe: int = 0  # --cpu-moe N: the experts of blocks [0, N) on `host` whatever side their block is on

    def __post_init__(self) -> None:
        self.device, self.host = torch.device(self.device), torch.device(self.host)
        n, L = self.gpu_layers, self.num_layers
        if n is not None and not (isinstance(n, int) and 0 <= n <= L):
            raise InvalidRequestError(f"--gpu-layers must be between 0 and {L} (the model has {L} blocks), got {n!r}",
                                      param="gpu_layers")

    @property
    def num_host_layers(self) -> int:
        return 0 if self.gpu_layers is None else self.num_layers - self.gpu_layers

    @property
    def offloaded(self) -> bool:
        return self.num_host_layers > 0

    def on_host(self, layer: int) -> bool:
        return layer < self.num_host_layers

    @property
    def layer_devices(self) -> list[torch.device]:
        return [self.host if self.on_host(i) else self.device for i in range(self.num_layers)]

    @property
    def embed_device(self) -> torch.device:
        return self.host if self.offloaded and not self.tied_embedding else self.device

    def weight_device(self, name: str) -> torch.device:
        """Device of the weight with this HF name (model.layers.{i}. -> block i; --cpu-moe: experts of the first
        N blocks -> host)."""
        if self.cpu_moe and (m := _EXPERT_NAME.match(name)) and int(m.group(1)) < self.cpu_moe:
            return self.host
        if m := _LAYER_NAME.match(name):
            return self.host if self.on_host(int(m.group(1))) else self.device
        return self.embed_device if name.startswith("model.embed_tokens.") else self.device

    def segments(self) -> list[tuple[int, int, bool]]:
        """Runs of consecutive blocks on one side: (first, end, on_host); one run when nothing is offloaded."""
        runs: list[tuple[int, int, bool]] = []
        for i in range(self.num_layers):
            if runs and runs[-1][2] == self.on_host(i):
                runs[-1] = (runs[-1][0], i + 1, runs[-1][2])
            else:
                runs.append((i, i + 1, self.on_host(i)))
        return runs


class LlamaModel:
    layer_cls = LlamaLayer

    def __init__(self, cfg: ModelConfig, get: WeightGetter, device: torch.device,
                 freq_factors: torch.Tensor | None = None, placement: Placement | None = None):
        """`get` returns each weight already on its device (`placement.weight_device`, the loader's job)."""
        self.cfg = cfg
        self.device = device
        self.placement = placement or Placement(device, cfg.num_layers)
        self.segments = self.placement.segments()
        self.embed = require(get, "model.embed_tokens.weight")
        self.layers = [self.layer_cls(cfg, i, get) for i in range(cfg.num_layers)]
        self.final_norm = require(get, "model.norm.weight")
        lm_head = get("lm_head.weight")
        self.lm_head = Linear(lm_head if lm_head is not None and not cfg.tie_word_embeddings else self.embed)
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, device, freq_factors)
        self.host_rotary = None
        if self.placement.offloaded:
            self.host_rotary = Rotary(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, self.placement.host,
                                      freq_factors)
        self.dtype = self.embed.dtype
        self.cpu_graph = None  # compiled CPU decode step (enable_cpu_compile)
        self.batch_invariant = False  # set_batch_invariant
        self.cos_sin = None  # the fused RoPE kernel's table: set where the fused GPU blocks can run
        if device.type == "cuda" and self.layer_cls.fusable(cfg):
            self.cos_sin = K.build_cos_sin_cache(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta,
                                                 cfg.rope_scaling, freq_factors, device=device)

    def bind(self, triton: tuple[bool, bool]) -> None:
        """Give each block the forward of its side (device, host): triton[side] says whether that side's attention
        backend is Triton (runtime/backends/). Triton sides run the fused GPU blocks where the family has them
        (cos_sin set), the others the native CPU blocks where every projection is native (LlamaLayer.native) and
        the model is float32; everything else runs the reference forward."""
        base = self.layer_cls
        for i, layer in enumerate(self.layers):
            host = self.placement.on_host(i)
            if triton[host]:
                cls = base.fused_cls if self.cos_sin is not None else base
            else:
                cls = base.native_cls if layer.native and self.dtype == torch.float32 else base
            self.layers[i] = layer.rebind(cls or base)

    def set_batch_invariant(self, on: bool) -> None:
        """--batch-invariant: every Linear takes the fixed-order matmul (kernels/invariant_matmul.py) and the
        attention metadata asks for one fixed-tiling kernel for every row (layers/attention.py)."""
        self.batch_invariant = on
        for lin in [self.lm_head] + [v for layer in self.layers for v in vars(layer).values() if isinstance(v, Linear)]:
            lin.set_invariant(on)

    def enable_cpu_compile(self) -> None:
        """Run decode-only steps through a torch.compile'd layer stack (models/cpu_compile.py). CPU models with
        nothing offloaded only; raises InvalidRequestError where inductor cannot build kernels."""
        if self.device.type != "cpu" or self.placement.offloaded:
            raise InvalidRequestError("--compile applies to models that run on the CPU without --gpu-layers; drop "
                                      "--compile or run with --device cpu", param="cpu_compile")
        if not self.layer_cls.compiles:  # Gemma 2: its attention's compiled rounding differs from eager's
            log.info("--compile: %s decode steps run eagerly", self.cfg.architecture)
            return
        if any(lin.native is not None for layer in self.layers for lin in (layer.qkv, layer.o, layer.gate_up,
                                                                            layer.down)):
            # opaque to dynamo, and with the norms, activation, residual adds and attention fused into them
            # (NativeLlamaLayer) nothing is left between the calls for inductor to fuse
            log.info("--compile: the native CPU kernels run the decode steps (eagerly); nothing to compile")
            return
        from .cpu_compile import CpuDecodeGraph

        self.cpu_graph = CpuDecodeGraph(self)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        e = self.embed  # a tensor, or a GroupQuant kept quantized (CPU)
        h = F.embedding(input_ids, e) if isinstance(e, torch.Tensor) else e.embedding(input_ids)
        if self.cfg.embedding_scale:
            h = h * torch.tensor(self.cfg.embedding_scale, dtype=h.dtype)
        return h

    @property
    def embed_device(self) -> torch.device:
        return self.placement.embed_device

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta,
                kv_caches: list[tuple[KVPool, KVPool]]) -> torch.Tensor:
        """input_ids, positions: [num_tokens] -> final-normed hidden: [num_tokens, hidden] on self.device.
        meta: the step's attention metadata (runtime/backends/), which carries RoPE's inputs (the positions are its
        too). Blocks run in segments (Placement.segments): one when nothing is offloaded; with --gpu-layers the
        host blocks read meta.host (their backend's metadata, host KV pools) and the hidden state moves at each
        boundary."""
        h, residual = self.embed_tokens(input_ids.to(self.embed_device)), None
        for start, end, on_host in self.segments:
            m, dev = (meta.host, self.placement.host) if on_host else (meta, self.device)
            if residual is not None:  # leaving a fused run: its stream is delta + residual
                h, residual = h + residual, None
            h = h.to(dev)
            if self.cpu_graph is not None and self.cpu_graph.can_run(m, h.shape[0]):  # whole stack + final norm
                out = self.cpu_graph(h, m, kv_caches)
                if out is not None:
                    return out
            for i in range(start, end):
                h, residual = self.layers[i].forward(h, residual, m, kv_caches[i])
        if residual is not None:
            return self.layers[-1].add_norm(h, self.final_norm, residual)
        return self.layers[-1].norm(h.to(self.device), self.final_norm)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [num_rows, hidden] -> [num_rows, vocab] fp32 (a native head: the residual pass, as every row)
        head = self.lm_head.native
        logits = head.run(hidden.float().contiguous()) if head is not None else self.lm_head(hidden).float()
        cap = self.cfg.final_logit_softcapping
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def weight_tensors(self) -> list[torch.Tensor]:
        embed = [self.embed] if isinstance(self.embed, torch.Tensor) else self.embed.tensors()
        out = embed + [self.final_norm] + [t for t in self.lm_head.tensors() if t is not self.embed]
        for layer in self.layers:
            out += [t for t in vars(layer).values() if isinstance(t, torch.Tensor)]
            out += [t for lin in vars(layer).values() if isinstance(lin, Linear) for t in lin.tensors()]
        return out
