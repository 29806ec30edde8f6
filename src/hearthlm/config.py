"""Configuration dataclasses shared by loader, planner, engine and servers."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from .errors import InvalidRequestError

# --kv-cache-dtype: auto = the model dtype; fp8 (e4m3) / int8 = codes + a float32 scale per slot and kv head;
# fp8_e4m3 = e4m3 values without scales, as vLLM's default fp8 cache (|x| > 448 saturates; CUDA, SM 8.9+)
KV_CACHE_DTYPES = ("auto", "fp8", "int8", "fp8_e4m3")
_KV_CACHE_DTYPE_ALIASES = {"fp8-e4m3": "fp8_e4m3", "float8_e4m3fn": "fp8_e4m3"}


def normalize_cache_dtype(value: str) -> str:
    """'auto' | 'fp8' | 'int8' | 'fp8_e4m3' (case-insensitive); anything else is an InvalidRequestError."""
    v = str(value).strip().lower()
    v = _KV_CACHE_DTYPE_ALIASES.get(v, v)
    if v not in KV_CACHE_DTYPES:
        raise InvalidRequestError(f"unknown KV cache dtype {value!r}: choose one of {', '.join(KV_CACHE_DTYPES)} "
                                  "(--kv-cache-dtype)", param="kv_cache_dtype")
    return v


# --cpu-kernel: the native CPU kernel's ISA (kernels/cpu_quant.py): auto = the best this CPU has; torch = PyTorch's
# int4 kernel (not batch-invariant)
CPU_KERNELS = ("auto", "avx512vnni", "avx2", "torch")


def normalize_cpu_kernel(value: str) -> str:
    """'auto' | 'avx512vnni' | 'avx2' | 'torch' (case-insensitive, '-' and '_' ignored: 'AVX512-VNNI'); anything
    else is an InvalidRequestError naming the field. (Whether this CPU has the ISA: cpu_quant.cpu_kernel_for.)"""
    v = str(value).strip().lower().replace("-", "").replace("_", "")
    if v not in CPU_KERNELS:
        raise InvalidRequestError(f"unknown cpu_kernel {value!r}: choose one of {', '.join(CPU_KERNELS)} "
                                  "(--cpu-kernel)", param="cpu_kernel")
    return v


# --weights: GGUF weights on CUDA. auto = dequantized to the compute dtype when that copy fits the memory share,
# else kept quantized; quantized = always kept quantized; dequantize = always dequantized (loader/load.py)
WEIGHTS = ("auto", "quantized", "dequantize")
# --kernels: auto = Triton kernels on CUDA; torch = the torch reference ops everywhere (A/B and debugging)
KERNELS = ("auto", "torch")
# --gemv: decode-row matmuls on CUDA. auto = GEMV kernels for few rows (quantized weights with int8 activations
# where the GPU has dp4a); a16 = 16-bit activations for quantized weights; off = also no GEMV kernel for dense and
# FP8 weights (cuBLAS / torch._scaled_mm for every row count)
GEMVS = ("auto", "a16", "off")


def normalize_choice(value, choices: tuple[str, ...], field: str) -> str:
    """value (case-insensitive, '-' read as '_') when it is one of `choices`, else an InvalidRequestError naming
    the field and its flag."""
    v = str(value).strip().lower().replace("-", "_")
    if v not in choices:
        raise InvalidRequestError(f"unknown {field} {value!r}: choose one of {', '.join(choices)} "
                                  f"(--{field.replace('_', '-')})", param=field)
    return v


def normalize_gpu_layers(value) -> int | str | None:
    """--gpu-layers (llama.cpp's -ngl): None, -1 or 'all' = every block on the main device; 'auto' = the most
    that fit (the planner picks at engine start); N >= 0 = the last N blocks on the device, the others on the CPU.
    Anything else is an InvalidRequestError (the block-count upper bound is checked against the model)."""
    if value is None:
        return None
    text = str(value).strip().lower()
    if text in ("auto", "all"):
        return None if text == "all" else "auto"
    if isinstance(value, bool) or not text.removeprefix("-").isdigit():
        raise InvalidRequestError(f"--gpu-layers must be a block count such as 20, or 'auto', got {value!r}",
                                  param="gpu_layers")
    n = int(text)
    if n < -1:
        raise InvalidRequestError(f"--gpu-layers must be >= 0 (or -1 for all blocks), got {value!r}",
                                  param="gpu_layers")
    return None if n == -1 else n


@dataclass
class ModelConfig:
    """Architecture of a decoder-only transformer, in HF config terms."""

    architecture: str  # "llama" | "mistral" | "qwen2" | "qwen3" | "gemma2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    hidden_act: str = "silu"
    # sliding window per layer (None = full attention); len == num_layers
    layer_windows: list[int | None] = field(default_factory=list)
    # Gemma 2
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    query_pre_attn_scalar: float | None = None
    embedding_scale: float | None = None
    post_norms: bool = False
    # mixture of experts (Qwen3-MoE, Mixtral): 0 experts = a dense model
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True  # renormalize the top-k routing weights to sum to 1
    dense_layers: list[int] = field(default_factory=list)  # MoE models' layers with a dense MLP
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    name: str = ""

    def __post_init__(self) -> None:
        if not self.layer_windows:
            self.layer_windows = [None] * self.num_layers

    @property
    def attn_scale(self) -> float:
        base = self.query_pre_attn_scalar if self.query_pre_attn_scalar else self.head_dim
        return float(base) ** -0.5

    @property
    def num_params(self) -> int:
        """Parameter count from shapes alone (used by the planner and `hearth show`)."""
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h
        if self.attention_bias:
            attn += q + 2 * kv
        norms = (4 if self.post_norms else 2) * h + (2 * self.head_dim if self.qk_norm else 0)
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * (attn + norms) + self._mlp_params(self.num_experts) + emb + h

    @property
    def active_params(self) -> int:
        """Parameters a token computes with: num_params with only num_experts_per_tok experts per MoE layer."""
        return self.num_params - self._mlp_params(self.num_experts) + self._mlp_params(self.num_experts_per_tok)

    def _mlp_params(self, experts: int) -> int:
        """All layers' MLP parameters, with `experts` experts (and the router) in each MoE layer."""
        h = self.hidden_size
        if not self.num_experts:
            return self.num_layers * 3 * h * self.intermediate_size
        sparse = self.num_layers - len(self.dense_layers)
        return len(self.dense_layers) * 3 * h * self.intermediate_size + \
            sparse * (experts * 3 * h * self.moe_intermediate_size + self.num_experts * h)


@dataclass
class CacheConfig:
    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes; None = fraction of free memory; --gpu-layers: per device
    memory_fraction: float = 0.9  # of free memory (GPU) / available RAM share (CPU)
    num_blocks: int | None = None  # explicit override (tests)
    enable_prefix_caching: bool = True
    cache_dtype: str = "auto"  # KV_CACHE_DTYPES
    cuda_graphs: bool = True  # decode steps replay captured graphs on CUDA
    # --compile: CPU decode steps run a torch.compile'd layer stack (models/cpu_compile.py)
    cpu_compile: bool = False

    def __post_init__(self) -> None:
        self.cache_dtype = normalize_cache_dtype(self.cache_dtype)
        self.cpu_compile = bool(self.cpu_compile)


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 4096
    enable_chunked_prefill: bool = True
    # launch step N+1 before reading step N's tokens (hides host work behind the device); None = on for CUDA
    async_scheduling: bool | None = None


@dataclass
class EngineConfig:
    model: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    seed: int = 0
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    quantization: str = "none"  # none | int8 | int4 | fp8: weight-only, HF safetensors models (loader/load.py)
    # --gpu-layers: None = every block on `device`; N = the last N blocks there, the others on the CPU (CUDA only);
    # "auto" = the largest N the memory plan fits (normalize_gpu_layers)
    gpu_layers: int | str | None = None
    # --batch-invariant (CUDA): every kernel's per-row arithmetic independent of the batch (dense weights through
    # one fixed-tiling matmul, attention splits fixed per sequence length); the CPU default path is invariant always
    batch_invariant: bool = False
    # -t/--threads: CPU threads for torch and the native kernel; None = the physical cores this process may use
    threads: int | None = None
    # --cpu-kernel: auto | avx512vnni | avx2 | torch (CPU_KERNELS); an ISA this CPU lacks fails at engine start
    cpu_kernel: str = "auto"
    weights: str = "auto"  # --weights: WEIGHTS
    kernels: str = "auto"  # --kernels: KERNELS
    gemv: str = "auto"  # --gemv: GEMVS
    # --cpu-dense-memory: bytes of 16-bit weight copies kept for multi-row CPU matmuls of int4 weights (0 = none)
    cpu_dense_memory: int = 1 << 30
    # --cpu-moe N (llama.cpp's --n-cpu-moe): the experts of the first N mixture-of-experts blocks stay on the CPU
    # while the rest of the model is on the GPU (models/llama.py Placement); 0 = none
    cpu_moe: int = 0

    def __post_init__(self) -> None:
        self.gpu_layers = normalize_gpu_layers(self.gpu_layers)
        if isinstance(self.cpu_moe, bool) or int(self.cpu_moe) < 0:
            raise InvalidRequestError(f"cpu_moe must be a block count >= 0, got {self.cpu_moe!r}", param="cpu_moe")
        self.cpu_moe = int(self.cpu_moe)
        self.cpu_kernel = normalize_cpu_kernel(self.cpu_kernel)
        self.weights = normalize_choice(self.weights, WEIGHTS, "weights")
        self.kernels = normalize_choice(self.kernels, KERNELS, "kernels")
        self.gemv = normalize_choice(self.gemv, GEMVS, "gemv")
        if isinstance(self.cpu_dense_memory, bool) or int(self.cpu_dense_memory) < 0:
            raise InvalidRequestError(f"cpu_dense_memory must be a byte count >= 0, got {self.cpu_dense_memory!r}",
                                      param="cpu_dense_memory")
        self.cpu_dense_memory = int(self.cpu_dense_memory)
        if self.threads is not None and (isinstance(self.threads, bool) or int(self.threads) < 1):
            raise InvalidRequestError(f"threads must be a positive count, got {self.threads!r}", param="threads")

    def copy(self) -> EngineConfig:
        """A copy whose cache and scheduler configs are copies too: the engine resolves limits in its own."""
        return replace(self, cache=replace(self.cache), scheduler=replace(self.scheduler))
