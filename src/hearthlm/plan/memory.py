"""The VRAM geometry: bytes of weights, KV cache, activations and overhead, and whether they fit.

Every size is in bytes (``int``) unless its name says otherwise. Nothing here allocates tensors; torch is
imported only by ``device_spec("auto")`` to ask CUDA for its free memory.

    total_bytes = weights_bytes + kv_bytes(ctx, concurrency) + activation_bytes + overhead_bytes
    usable_bytes = device memory_bytes x gpu_memory_utilization
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from ..config import ModelConfig
from ..errors import InvalidRequestError

KiB, MiB, GiB = 1024, 1024**2, 1024**3

# ggml block formats: (bytes per block, weights per block), as in llama.cpp's ggml-common.h
GGML_BLOCKS: dict[str, tuple[int, int]] = {
    "q8_0": (34, 32), "q4_0": (18, 32), "q4_1": (20, 32), "q5_0": (22, 32), "q5_1": (24, 32),
    "q2_k": (84, 256), "q3_k": (110, 256), "q4_k": (144, 256), "q5_k": (176, 256), "q6_k": (210, 256),
}
# Bits per weight of each --quant, largest first.
QUANT_BITS_PER_WEIGHT: dict[str, float] = {
    "f32": 32.0,
    "f16": 16.0,
    "bf16": 16.0,
    "q8_0": 8.0 * 34 / 32,
    # --quantization int8 at load (int8-g32, quant/weight_quant.py): a 16-bit scale per 32 codes
    "int8": 8.0 + 16 / 32,
    "int8-gptq-g128": 8.0 + (16 + 8) / 128,  # a GPTQ 8-bit checkpoint: f16 scale + 8-bit zero point per 128
    "fp8": 8.0,  # e4m3; per-tensor/per-channel scales (< 0.01 bpw) ignored
    "q6_k": 8.0 * 210 / 256,
    "q5_1": 8.0 * 24 / 32,
    "q5_k_m": 5.69,  # llama.cpp-reported effective bpw of the Q*_K_M mixes (whole model, head included)
    "q5_0": 8.0 * 22 / 32,
    "q4_1": 8.0 * 20 / 32,
    "int4": 4.0 + (16 + 16) / 32,  # --quantization int4 at load (int4-g32): a 16-bit scale and min per 32 codes
    "q4_k_m": 4.85,
    "q4_0": 8.0 * 18 / 32,
    "int4-awq-g128": 4.0 + (16 + 4) / 128,  # AWQ/GPTQ 4-bit checkpoints: f16 scale + 4-bit zero point per 128
    "q3_k_m": 3.91,
    "q2_k": 8.0 * 84 / 256,
}
QUANTS = tuple(QUANT_BITS_PER_WEIGHT)
_QUANT_ALIASES = {"fp16": "f16", "float16": "f16", "half": "f16", "bfloat16": "bf16", "fp32": "f32",
                  "float32": "f32", "float": "f32", "fp8_e4m3": "fp8", "q8": "q8_0",
                  "awq": "int4-awq-g128", "gptq": "int4-awq-g128", "int4-g32": "int4", "int8-g32": "int8"}
# llama.cpp's quantizer stores the output head (or the tied token embedding) in Q6_K -- Q8_0 when the
# row length is not a multiple of 256 -- for these pure block formats.
_HEAD_UPGRADED = ("q4_0", "q4_1", "q5_0", "q5_1", "q2_k")

KV_DTYPE_BYTES: dict[str, int] = {"auto": 2, "bf16": 2, "f16": 2, "f32": 4, "fp8": 1, "int8": 1, "fp8_e4m3": 1}
# Scale bytes per (token, kv head) for K and for V: fp8 and int8 pools keep one f32 scale per token and head
# next to the codes (kernels/kv_quant.py; the runner's kv_bytes_per_block counts the same bytes).
KV_SCALE_BYTES_PER_HEAD: dict[str, int] = {"fp8": 4, "int8": 4}
_KV_ALIASES = {"fp16": "f16", "float16": "f16", "bfloat16": "bf16", "float32": "f32", "fp32": "f32",
               "fp8_e5m2": "fp8"}

CPU_RAM_BANDWIDTH_BYTES_PER_S = 50e9  # dual-channel DDR5 desktop / one socket of a server, roughly
DEFAULT_GPU_BANDWIDTH_BYTES_PER_S = 1e12  # a GPU given only by its memory size
GPU_OVERHEAD_BYTES = 512 * MiB  # CUDA context (~300-500 MiB) + caching-allocator fragmentation
CPU_OVERHEAD_BYTES = 256 * MiB  # Python + torch runtime

Verdict = Literal["fits", "kv_spills", "partial_offload", "does_not_fit"]


def normalize_quant(quant: str) -> str:
    """Lower-case `quant` and resolve aliases; raise InvalidRequestError naming the choices if unknown."""
    q = quant.strip().lower()
    if q not in QUANT_BITS_PER_WEIGHT and q not in _QUANT_ALIASES:  # q4-k-m: llama.cpp's names use '_'
        q = q.replace("-", "_")
    q = _QUANT_ALIASES.get(q, q)
    if q not in QUANT_BITS_PER_WEIGHT:
        raise InvalidRequestError(f"unknown quantization {quant!r}: choose one of {', '.join(QUANTS)}", param="quant")
    return q


def normalize_kv_dtype(kv_dtype: str) -> str:
    k = kv_dtype.strip().lower()
    k = _KV_ALIASES.get(k, k)
    if k not in KV_DTYPE_BYTES:
        raise InvalidRequestError(
            f"unknown KV cache dtype {kv_dtype!r}: choose one of {', '.join(KV_DTYPE_BYTES)}", param="kv_cache_dtype")
    return k


# ----------------------------------------------------------------------------------------------- weights
@dataclass
class WeightBytes:
    """Weight bytes split by placement unit. `lm_head_bytes == 0` means the head is tied to the embedding."""

    embedding_bytes: int
    lm_head_bytes: int
    layer_bytes: list[int]  # one entry per transformer block
    other_bytes: int  # final norm and anything not in a block
    exact: bool  # True when summed from a file's tensor list, False when estimated from the config

    @property
    def total_bytes(self) -> int:
        return self.embedding_bytes + self.lm_head_bytes + sum(self.layer_bytes) + self.other_bytes

    @property
    def head_bytes(self) -> int:
        """The output matrix read once per decoded token: lm_head, or the embedding when tied."""
        return self.lm_head_bytes or self.embedding_bytes

    def __int__(self) -> int:
        return self.total_bytes


def _quant_bytes(n_weights: int, quant: str) -> int:
    """ceil(n_weights x bpw / 8); exact for block formats when n_weights is a multiple of the block."""
    if quant in GGML_BLOCKS:
        nbytes, nweights = GGML_BLOCKS[quant]
        return -(-n_weights * nbytes // nweights)
    return math.ceil(n_weights * QUANT_BITS_PER_WEIGHT[quant] / 8)


def weights_bytes(cfg: ModelConfig, quant: str) -> WeightBytes:
    """Estimate weight bytes from the config's shapes at `quant` (``int(result)`` is the total).

    Per block: matrices (q, k, v, o, gate, up, down: h*q + 2*h*kv + q*h + 3*h*I weights; a mixture-of-experts
    block holds all its experts' gate/up/down and the router instead) at the quant's bits per weight; norms (2 per block, 4 with Gemma-2 post-norms, + 2*head_dim with QK-norm) and
    attention biases stay f32 (4 B). Embeddings: the token embedding (V*h) is counted once; an untied
    lm_head adds another V*h; both at the quant, except that for the pure ggml formats q4_0, q4_1, q5_0,
    q5_1 and q2_k the output matrix (lm_head, or the embedding when tied) is counted at Q6_K (Q8_0 when
    h % 256 != 0), as llama.cpp's quantizer stores it. The Q*_K_M mixes use llama.cpp's effective bpw
    for the whole model, which already includes their Q6_K head. The final norm is f32.
    """
    q = normalize_quant(quant)
    h, qd, kvd, inter = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    attn = h * qd + 2 * h * kvd + qd * h
    f32_params = (4 if cfg.post_norms else 2) * h + (2 * cfg.head_dim if cfg.qk_norm else 0)
    f32_params += (qd + 2 * kvd) if cfg.attention_bias else 0
    dense = _quant_bytes(attn + 3 * h * inter, q) + 4 * f32_params
    # mixture of experts: every expert's matrices (and the router) stay in memory, whichever a token uses
    sparse = _quant_bytes(attn + cfg.num_experts * (3 * h * cfg.moe_intermediate_size + h), q) + 4 * f32_params
    layers = [dense if not cfg.num_experts or i in cfg.dense_layers else sparse for i in range(cfg.num_layers)]
    head_q = ("q6_k" if h % 256 == 0 else "q8_0") if q in _HEAD_UPGRADED else q
    emb_n = cfg.vocab_size * h
    if cfg.tie_word_embeddings:
        embedding, head = _quant_bytes(emb_n, head_q), 0
    else:
        embedding, head = _quant_bytes(emb_n, q), _quant_bytes(emb_n, head_q)
    return WeightBytes(embedding, head, layers, 4 * h, exact=False)


_LAYER_RE = re.compile(r"(?:^|\.)(?:blk|layers|h|block)\.(\d+)\.")


def expert_bytes(cfg: ModelConfig, w: WeightBytes) -> list[int]:
    """Per block, the bytes of its experts' matrices (routers excluded; 0 for dense blocks and dense models): the
    block's bytes shared in proportion to its weights, exact when the block has one format, else an estimate."""
    if not cfg.num_experts:
        return [0] * len(w.layer_bytes)
    h, qd, kvd = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    experts = cfg.num_experts * 3 * h * cfg.moe_intermediate_size
    rest = h * qd + 2 * h * kvd + qd * h + cfg.num_experts * h
    return [0 if i in cfg.dense_layers else b * experts // (experts + rest) for i, b in enumerate(w.layer_bytes)]


def weights_bytes_from_tensors(tensors: Iterable[tuple[str, int]]) -> WeightBytes:
    """Exact weight bytes from (tensor name, nbytes) pairs -- a GGUF tensor list or safetensors headers.

    Names with ``blk.N.`` / ``layers.N.`` go to block N; ``token_embd`` / ``embed_tokens`` / ``wte`` are the
    embedding; ``output.weight`` / ``lm_head`` the head; everything else (final norm, rope tables) is other.
    """
    layers: dict[int, int] = {}
    embedding = head = other = 0
    for name, nbytes in tensors:
        if m := _LAYER_RE.search(name):
            layers[int(m.group(1))] = layers.get(int(m.group(1)), 0) + int(nbytes)
        elif "token_embd" in name or "embed_tokens" in name or name.split(".")[-2:-1] == ["wte"]:
            embedding += int(nbytes)
        elif name == "output.weight" or name.startswith("lm_head") or ".lm_head." in name:
            head += int(nbytes)
        else:
            other += int(nbytes)
    n = max(layers) + 1 if layers else 0
    return WeightBytes(embedding, head, [layers.get(i, 0) for i in range(n)], other, exact=True)


# ---------------------------------------------------------------------------------------------- KV cache
def kv_bytes_per_token(cfg: ModelConfig, kv_dtype: str = "auto") -> int:
    """KV data bytes per token = sum over layers of 2 (K and V) x num_kv_heads x head_dim x dtype bytes.

    Scales of quantized caches are not included: see `kv_scale_bytes_per_token`.
    """
    return cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * KV_DTYPE_BYTES[normalize_kv_dtype(kv_dtype)]


def kv_scale_bytes_per_token(cfg: ModelConfig, kv_dtype: str = "auto") -> int:
    """Scale overhead per token = num_layers x 2 x num_kv_heads x scale bytes (fp8, int8: f32 per token and head)."""
    return cfg.num_layers * 2 * cfg.num_kv_heads * KV_SCALE_BYTES_PER_HEAD.get(normalize_kv_dtype(kv_dtype), 0)


def kv_blocks_per_seq(window: int | None, num_tokens: int, block_size: int = 16, chunk: int = 1) -> int:
    """Blocks one sequence of `num_tokens` tokens holds at its peak in a KV group: THE KV-per-token formula, used
    by the plan, the engine's pool (`kv_pool_blocks`) and the scheduler's admission check (KVCacheManager).

    Full attention keeps every token: ceil(num_tokens / block_size). A sliding-window layer, while a step of
    `chunk` new tokens runs (1 when decoding, up to --max-num-batched-tokens in a prefill chunk), keeps the
    `window - 1` keys before the step's first query plus the step's tokens: window + chunk - 1 tokens whose start
    is not block-aligned, so at most ceil((window + chunk - 1) / block_size) + 1 blocks.
    """
    full = -(-num_tokens // block_size)
    if window is None:
        return full
    return min(full, -(-(window + max(1, chunk) - 1) // block_size) + 1)


def kv_tokens_per_layer(cfg: ModelConfig, ctx: int, block_size: int = 16) -> list[int]:
    """Cached tokens per layer for one decoding sequence of `ctx` tokens, in whole blocks (`kv_blocks_per_seq`).

    Full-attention layers keep ctx tokens; a sliding-window layer keeps min(ctx, window + block_size) --
    the extra block because the window's start is not block-aligned.
    """
    return [kv_blocks_per_seq(w, ctx, block_size) * block_size for w in cfg.layer_windows]


def kv_group_order(windows: Iterable[int | None]) -> list[int | None]:
    """The KV groups' windows in their fixed order: full attention first, then sliding windows ascending
    (engine/kv_cache.kv_group_windows)."""
    return sorted(set(windows), key=lambda w: (w is not None, w or 0))


def kv_pool_blocks(cfg: ModelConfig, ctx: int, concurrency: int = 1, block_size: int = 16,
                   max_num_batched_tokens: int = 2048) -> dict[int | None, int]:
    """Blocks of each KV group's pool (by window) for `concurrency` sequences of `ctx` tokens all at their peak:

        concurrency x kv_blocks_per_seq(window, ctx)
        + (sliding groups) the extra blocks of one prefill chunk of min(max_num_batched_tokens, ctx) tokens
        + 1 null block (block 0, never handed out)

    The engine's KV pool on the CPU is exactly this (capped by memory); on CUDA it is the most blocks worth having.
    """
    chunk = min(max_num_batched_tokens, ctx)
    out = {}
    for w in kv_group_order(cfg.layer_windows):
        per_seq = kv_blocks_per_seq(w, ctx, block_size)
        out[w] = concurrency * per_seq + kv_blocks_per_seq(w, ctx, block_size, chunk) - per_seq + 1
    return out


def kv_pool_bytes(cfg: ModelConfig, pool_blocks: dict[int | None, int], kv_dtype: str = "auto",
                  block_size: int = 16, layers: Iterable[int] | None = None) -> int:
    """Bytes of the pools of `layers` (default all) holding `pool_blocks` blocks per window:
    sum over layers of blocks x block_size x 2 (K and V) x num_kv_heads x (head_dim x dtype bytes + scale bytes)."""
    k = normalize_kv_dtype(kv_dtype)
    per_layer_token = 2 * cfg.num_kv_heads * (cfg.head_dim * KV_DTYPE_BYTES[k] + KV_SCALE_BYTES_PER_HEAD.get(k, 0))
    idx = range(cfg.num_layers) if layers is None else layers
    return sum(pool_blocks[cfg.layer_windows[i]] for i in idx) * block_size * per_layer_token


def kv_pool_tokens(cfg: ModelConfig, pool_blocks: dict[int | None, int], block_size: int = 16) -> int:
    """Tokens the first group's pool holds for sequences (its null block excluded): the engine's KV capacity."""
    return (pool_blocks[kv_group_order(cfg.layer_windows)[0]] - 1) * block_size


def kv_bytes_for_context(cfg: ModelConfig, ctx: int, concurrency: int = 1, kv_dtype: str = "auto",
                         block_size: int = 16, layers: Iterable[int] | None = None) -> int:
    """KV bytes for `concurrency` sequences of `ctx` tokens (data + scales), over `layers` (default all).

    = concurrency x sum over layers of kv_tokens_per_layer[i] x 2 x num_kv_heads x (head_dim x dtype bytes
    + scale bytes per head). The engine's pool adds its null block (and a prefill chunk for sliding layers):
    `kv_pool_bytes(cfg, kv_pool_blocks(...))`, which the plan reports.
    """
    k = normalize_kv_dtype(kv_dtype)
    per_layer_token = 2 * cfg.num_kv_heads * (cfg.head_dim * KV_DTYPE_BYTES[k] + KV_SCALE_BYTES_PER_HEAD.get(k, 0))
    tokens = kv_tokens_per_layer(cfg, ctx, block_size)
    idx = range(cfg.num_layers) if layers is None else layers
    return concurrency * per_layer_token * sum(tokens[i] for i in idx)


# ------------------------------------------------------------------------------- activations, overhead
def activation_bytes(cfg: ModelConfig, max_num_batched_tokens: int = 2048, dtype: str = "bf16",
                     max_num_seqs: int = 1) -> int:
    """Peak activation bytes of one forward over T = max_num_batched_tokens tokens.

    = T x b x (2h [residual + normed input] + (q + 2kv) [fused qkv] + 2I [fused gate/up])
      + min(max_num_seqs, T) x vocab x 4      [f32 logits, only for the rows that are sampled]
    with b = 4 for f32 compute else 2. Attention is assumed to be flash/SDPA-style (no T x T scores);
    the attention and MLP workspaces are added as if alive together, which covers the transient
    attention-output / activation buffers that reuse them.
    """
    t, b = max_num_batched_tokens, 4 if dtype in ("f32", "float32") else 2
    qd, kvd = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    hidden = t * b * (2 * cfg.hidden_size + qd + 2 * kvd + 2 * cfg.intermediate_size)
    return hidden + min(max_num_seqs, t) * cfg.vocab_size * 4


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    kind: Literal["gpu", "cpu"]
    memory_bytes: int  # total (presets) or currently free (auto, cpu)
    bandwidth_bytes_per_s: float


def overhead_bytes(device: DeviceSpec | str) -> int:
    """Fixed runtime overhead: 512 MiB on a GPU (CUDA context + allocator slack), 256 MiB on CPU."""
    kind = device.kind if isinstance(device, DeviceSpec) else ("cpu" if device == "cpu" else "gpu")
    return CPU_OVERHEAD_BYTES if kind == "cpu" else GPU_OVERHEAD_BYTES


DEVICE_PRESETS: dict[str, DeviceSpec] = {
    "h100": DeviceSpec("h100", "gpu", 80 * GiB, 3.35e12),
    "h200": DeviceSpec("h200", "gpu", 141 * GiB, 4.8e12),
    "a100-80": DeviceSpec("a100-80", "gpu", 80 * GiB, 2.039e12),
    "a100-40": DeviceSpec("a100-40", "gpu", 40 * GiB, 1.555e12),
    "rtx4090": DeviceSpec("rtx4090", "gpu", 24 * GiB, 1.008e12),
}


def system_memory_bytes() -> int:
    """Available system RAM: MemAvailable from /proc/meminfo, else psutil, else 16 GiB."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * KiB
    except OSError:
        pass
    try:
        import psutil  # type: ignore[import-not-found]

        return int(psutil.virtual_memory().available)
    except ImportError:
        return 16 * GiB


def device_spec(name: str) -> DeviceSpec:
    """A preset name, ``cpu`` (available RAM), ``auto`` (free memory of the current CUDA device, else
    cpu), or a number of GiB (a GPU of that size at 1 TB/s)."""
    key = name.strip().lower().removesuffix("gib").strip()
    if key in DEVICE_PRESETS:
        return DEVICE_PRESETS[key]
    if key == "cpu":
        return DeviceSpec("cpu", "cpu", system_memory_bytes(), CPU_RAM_BANDWIDTH_BYTES_PER_S)
    if key == "auto":
        import torch

        if not torch.cuda.is_available():
            return device_spec("cpu")
        free, _total = torch.cuda.mem_get_info()
        gpu = torch.cuda.get_device_name()
        bw = next((d.bandwidth_bytes_per_s for k, d in DEVICE_PRESETS.items()
                   if k.split("-")[0] in gpu.lower().replace(" ", "")), DEFAULT_GPU_BANDWIDTH_BYTES_PER_S)
        return DeviceSpec(f"{gpu} (free)", "gpu", int(free), bw)
    try:
        gib = float(key)
    except ValueError:
        raise InvalidRequestError(
            f"unknown device {name!r}: use one of {', '.join(DEVICE_PRESETS)}, cpu, auto, or a size in GiB "
            "such as 24", param="device") from None
    if not gib > 0:
        raise InvalidRequestError(f"device size must be > 0 GiB, got {name!r}", param="device")
    return DeviceSpec(f"{gib:g} GiB", "gpu", int(gib * GiB), DEFAULT_GPU_BANDWIDTH_BYTES_PER_S)


# ----------------------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class MemoryFigures:
    """What a model takes: weights + KV pool + activations + runtime overhead, in bytes. `hearth plan` computes
    them before loading (MemoryPlan.figures), the engine from what it holds (plan.preflight.engine_memory; its
    start-up log line), `hearth ps` shows their total; `line()` is the one format all three print."""

    weights_bytes: int
    kv_bytes: int
    kv_tokens: int  # tokens the KV pool holds for sequences
    activation_bytes: int
    overhead_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.activation_bytes + self.overhead_bytes

    def line(self) -> str:
        """'weights 0.12 GiB + KV 0.05 GiB (1,024 tokens) + activations 0.05 GiB + overhead 0.25 GiB = 0.47 GiB'"""
        return (f"weights {gib(self.weights_bytes)} + KV {gib(self.kv_bytes)} ({self.kv_tokens:,} tokens) + "
                f"activations {gib(self.activation_bytes)} + overhead {gib(self.overhead_bytes)} = "
                f"{gib(self.total_bytes)}")


@dataclass
class MemoryPlan:
    """Where the bytes go for one model x quant x context x concurrency on one device.

    `*_bytes` without a prefix count everything on the device; `device_*` are what the chosen placement
    (`gpu_layers` of `num_layers` blocks on the device) puts there, `host_bytes` what it leaves in RAM.
    """

    model: str
    quant: str
    weights_exact: bool
    device: DeviceSpec
    ctx: int
    concurrency: int
    kv_dtype: str
    block_size: int
    max_num_batched_tokens: int
    gpu_memory_utilization: float
    num_layers: int
    weights_bytes: int
    kv_bytes_per_token: int
    kv_scale_bytes_per_token: int
    kv_bytes: int
    activation_bytes: int
    overhead_bytes: int
    total_bytes: int
    usable_bytes: int
    verdict: Verdict
    ok: bool  # the requested configuration runs (exit code 0)
    gpu_layers: int
    device_weights_bytes: int
    device_kv_bytes: int
    device_total_bytes: int
    kv_budget_bytes: int  # usable - device weights - activations - overhead: what the engine's KV pool may take
    host_bytes: int
    host_available_bytes: int | None
    max_context: int  # at `concurrency`, with this placement
    max_concurrency: int  # at `ctx`, with this placement
    cpu_weight_read_fraction: float
    slowdown: float  # decode time vs all weights on the device (decode_slowdown)
    # the bandwidths that slowdown assumes: the device's (device.bandwidth_bytes_per_s) and system RAM's
    host_bandwidth_bytes_per_s: float = CPU_RAM_BANDWIDTH_BYTES_PER_S
    requested_gpu_layers: int | str | None = None
    warnings: list[str] = field(default_factory=list)
    weights_detail: WeightBytes | None = field(default=None, repr=False)
    kv_tokens: int = 0  # tokens the KV pool (kv_bytes) holds for sequences: ctx x concurrency in whole blocks

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("weights_detail")
        return d

    def figures(self) -> MemoryFigures:
        """The four figures `hearth plan`, the engine's start-up log and `hearth ps` all show."""
        return MemoryFigures(self.weights_bytes, self.kv_bytes, self.kv_tokens, self.activation_bytes,
                             self.overhead_bytes)


def decode_slowdown(device_read_bytes: int, host_read_bytes: int, device_bandwidth: float,
                    host_bandwidth: float = CPU_RAM_BANDWIDTH_BYTES_PER_S) -> float:
    """Decode is bound by reading every weight once per step, so

        slowdown = (W_dev / BW_dev + W_host / BW_host) / ((W_dev + W_host) / BW_dev)

    with W_host the bytes of offloaded blocks (read from RAM at ~50 GB/s). KV reads, CPU compute and
    PCIe activation hops are ignored, so this is a lower bound on the slowdown.
    """
    total = device_read_bytes + host_read_bytes
    if total == 0:
        return 1.0
    return (device_read_bytes / device_bandwidth + host_read_bytes / host_bandwidth) / (total / device_bandwidth)


def make_plan(cfg: ModelConfig, quant: str, ctx: int, concurrency: int = 1, kv_dtype: str = "auto",
              device_bytes: int | DeviceSpec = 80 * GiB, gpu_memory_utilization: float = 0.9,
              gpu_layers: int | Literal["auto"] | None = None, max_num_batched_tokens: int = 2048, *,
              weights: WeightBytes | None = None, host_bytes: int | None = None,
              block_size: int = 16) -> MemoryPlan:
    """Plan memory for `concurrency` sequences of `ctx` tokens.

    device_bytes: a DeviceSpec, or a byte count meaning a GPU of that size at 1 TB/s.
    gpu_layers: None = all blocks on the device (the engine's default); "auto" = the most that fit
    (partial offload accepted); N = the last N blocks on the device, llama.cpp's -ngl. When partially
    offloaded the output head (and the embedding if tied), final norm, activations and the KV of the
    device blocks stay on the device; the other blocks, their KV and an untied embedding sit in RAM
    (where the engine puts them: models/llama.py Placement).
    weights: exact sizes (from `weights_bytes_from_tensors`); else estimated with `weights_bytes`.
    host_bytes: RAM available for offloaded blocks and their KV; None = not checked.

    Verdicts: fits (everything on the device); kv_spills (weights fit but not the KV for ctx x
    concurrency); partial_offload (only `gpu_layers` blocks fit next to their KV); does_not_fit.
    """
    if ctx < 1 or concurrency < 1 or max_num_batched_tokens < 1 or block_size < 1:
        raise InvalidRequestError("ctx, concurrency, max_num_batched_tokens and block_size must be >= 1")
    if not 0 < gpu_memory_utilization <= 1:
        raise InvalidRequestError(
            f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}", param="gpu_memory_utilization")
    kv = normalize_kv_dtype(kv_dtype)
    q = quant.lower() if weights is not None else normalize_quant(quant)
    dev = device_bytes if isinstance(device_bytes, DeviceSpec) else \
        DeviceSpec(f"{device_bytes / GiB:g} GiB", "gpu", int(device_bytes), DEFAULT_GPU_BANDWIDTH_BYTES_PER_S)
    w = weights if weights is not None else weights_bytes(cfg, q)
    L = len(w.layer_bytes)
    if L != cfg.num_layers:
        raise InvalidRequestError(f"the tensor list has {L} blocks but the config has {cfg.num_layers}")
    on_cpu = dev.kind == "cpu"
    usable = int(dev.memory_bytes * gpu_memory_utilization)
    overhead = overhead_bytes(dev)
    act_dtype = "f32" if q == "f32" else "bf16"
    if on_cpu:  # the CPU engine computes (and caches K/V) in float32 unless given a 16-bit dtype
        act_dtype = q if q in ("bf16", "f16") else "f32"
        kv = act_dtype if kv == "auto" else kv
    tied = w.lm_head_bytes == 0

    def pool_kv(c: int, conc: int, layers: Iterable[int] | None = None) -> int:
        """Bytes of the engine's KV pools (of `layers`) for conc sequences of c tokens: kv_pool_blocks."""
        return kv_pool_bytes(cfg, kv_pool_blocks(cfg, c, conc, block_size, max_num_batched_tokens), kv,
                             block_size, layers)

    def placement(n: int) -> tuple[int, int]:
        """(device weight bytes, host weight bytes) with the last n blocks on the device."""
        if n >= L:
            return w.total_bytes, 0
        dev_w = sum(w.layer_bytes[L - n:]) + w.head_bytes + w.other_bytes
        return dev_w, sum(w.layer_bytes[:L - n]) + (0 if tied else w.embedding_bytes)

    def need(n: int, c: int, conc: int) -> tuple[int, int, int, int]:
        """(device total, host total, device weights, device kv) for n device blocks, ctx c, conc seqs."""
        dev_w, host_w = placement(n)
        dev_kv = pool_kv(c, conc, range(L - n, L))
        host_kv = pool_kv(c, conc, range(L - n)) if n < L else 0
        act = activation_bytes(cfg, max_num_batched_tokens, act_dtype, conc)
        return dev_w + dev_kv + act + overhead, host_w + host_kv, dev_w, dev_kv

    def fits(n: int, c: int, conc: int) -> bool:
        d, h, _, _ = need(n, c, conc)
        return d <= usable and (n >= L or host_bytes is None or h <= host_bytes)

    def best_layers() -> int:
        """Largest n < L that fits with the requested KV, or -1."""
        return next((n for n in range(L - 1, -1, -1) if fits(n, ctx, concurrency)), -1)

    full_kv = pool_kv(ctx, concurrency)
    act = activation_bytes(cfg, max_num_batched_tokens, act_dtype, concurrency)
    total = w.total_bytes + full_kv + act + overhead
    req = gpu_layers
    if isinstance(req, int) and (req < 0 or req > L):
        raise InvalidRequestError(f"--gpu-layers must be between 0 and {L} (the model has {L} blocks), got {req}",
                                  param="gpu_layers")
    n = L
    if on_cpu or req is None or req == L or (req == "auto" and total <= usable):
        if total <= usable:
            verdict: Verdict = "fits"
        elif w.total_bytes + act + overhead <= usable:
            verdict = "kv_spills"
        else:
            n = -1 if on_cpu else best_layers()
            verdict = "partial_offload" if n >= 0 else "does_not_fit"
        ok = verdict == "fits"
    elif isinstance(req, int) and fits(req, ctx, concurrency):
        n, verdict, ok = req, "partial_offload", True
    else:  # "auto", or an explicit N that does not fit
        n = best_layers()
        verdict = "partial_offload" if n >= 0 else "does_not_fit"
        ok = verdict == "partial_offload" and req == "auto"
    place = L if n < 0 or verdict == "kv_spills" else n

    def max_ctx() -> int:
        top = max(1, cfg.max_position_embeddings)
        lo, hi = 0, -(-top // block_size)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fits(place, min(mid * block_size, top), concurrency):
                lo = mid
            else:
                hi = mid - 1
        return min(lo * block_size, top)

    def max_conc() -> int:
        if not fits(place, ctx, 1):
            return 0
        lo = 1
        while lo < 2**20 and fits(place, ctx, lo * 2):
            lo *= 2
        hi = min(lo * 2 - 1, 2**20)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(place, ctx, mid) else (lo, mid - 1)
        return lo

    dev_total, host_total, dev_w, dev_kv = need(place, ctx, concurrency)
    host_read = sum(w.layer_bytes[:L - place])
    read_total = sum(w.layer_bytes) + w.head_bytes
    warnings = []
    if on_cpu and (req == "auto" or (isinstance(req, int) and req < L)):
        warnings.append(f"no CUDA device: all layers run on the CPU (--gpu-layers {req} does not apply)")
    if ctx > cfg.max_position_embeddings:
        warnings.append(f"ctx {ctx:,} exceeds the model's max_position_embeddings {cfg.max_position_embeddings:,}")
    if not w.exact:
        warnings.append("weights estimated from the config (no tensor sizes available)")
    return MemoryPlan(
        model=cfg.name, quant=q, weights_exact=w.exact, device=dev, ctx=ctx, concurrency=concurrency,
        kv_dtype=kv, block_size=block_size, max_num_batched_tokens=max_num_batched_tokens,
        gpu_memory_utilization=gpu_memory_utilization, num_layers=L, weights_bytes=w.total_bytes,
        kv_bytes_per_token=kv_bytes_per_token(cfg, kv), kv_scale_bytes_per_token=kv_scale_bytes_per_token(cfg, kv),
        kv_bytes=full_kv, activation_bytes=act, overhead_bytes=overhead, total_bytes=total, usable_bytes=usable,
        verdict=verdict, ok=ok, gpu_layers=place if verdict != "does_not_fit" else 0,
        device_weights_bytes=dev_w, device_kv_bytes=dev_kv, device_total_bytes=dev_total,
        kv_budget_bytes=max(0, usable - (dev_total - dev_kv)),
        host_bytes=host_total, host_available_bytes=host_bytes,
        max_context=max_ctx() if verdict != "does_not_fit" else 0,
        max_concurrency=max_conc() if verdict != "does_not_fit" else 0,
        cpu_weight_read_fraction=host_read / read_total if read_total else 0.0,
        slowdown=decode_slowdown(read_total - host_read, host_read, dev.bandwidth_bytes_per_s),
        requested_gpu_layers=req, warnings=warnings, weights_detail=w,
        kv_tokens=kv_pool_tokens(cfg, kv_pool_blocks(cfg, ctx, concurrency, block_size, max_num_batched_tokens),
                                 block_size),
    )


def gib(nbytes: float) -> str:
    """Format bytes as GiB with two decimals: 16106127360 -> '15.00 GiB'."""
    return f"{nbytes / GiB:,.2f} GiB"


def effective_bits_per_weight(cfg: ModelConfig, nbytes: int) -> float:
    """8 x bytes / parameters: how to compare an exact file against the QUANT_BITS_PER_WEIGHT table."""
    return 8 * nbytes / cfg.num_params

