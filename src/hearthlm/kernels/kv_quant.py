"""Quantized KV pools (--kv-cache-dtype fp8 | int8): 8-bit codes plus one float32 scale per slot and kv head.

A pool is either a plain tensor [num_blocks, block_size, kv_heads, head_dim] in the model dtype ("auto")
or a `QuantizedKVCache` holding codes of that shape (float8_e4m3fn or int8) and scales
[num_blocks, block_size, kv_heads] float32, with x ~= codes * scale and scale = absmax(x over head_dim) / QMAX
(448 for e4m3, 127 for int8; an all-zero row stores scale 0 and codes 0). Writers quantize
(`quantize_kv` here, `_cache_write_kernel`); readers dequantize (`gather_dequant` and the CPU attention's
`gather_rows` here, the attention kernels in registers). Block ids and slots mean the same as for plain pools, so
block tables, prefix caching and CUDA graphs (which only hold on to the tensors) need no change.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

CODE_DTYPES: dict[str, torch.dtype] = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}
QMAX: dict[str, float] = {"fp8": 448.0, "int8": 127.0}
SCALE_DTYPE = torch.float32
SCALE_BYTES = 4  # per (slot, kv head)


@dataclass(frozen=True, eq=False)
class QuantizedKVCache:
    codes: torch.Tensor  # [num_blocks, block_size, kv_heads, head_dim] float8_e4m3fn | int8
    scales: torch.Tensor  # [num_blocks, block_size, kv_heads] float32

    @property
    def kind(self) -> str:
        return "fp8" if self.codes.dtype == torch.float8_e4m3fn else "int8"

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def nbytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + self.scales.numel() * self.scales.element_size()


KVPool = torch.Tensor | QuantizedKVCache


def split_pool(pool: KVPool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(data tensor, scales or None): what a kernel launcher passes on."""
    if isinstance(pool, QuantizedKVCache):
        return pool.codes, pool.scales
    return pool, None


def attention_pools(k_pool: KVPool, v_pool: KVPool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                             torch.Tensor, bool, bool]:
    """What the attention kernels take: (k data, k scales, v data, v scales, codes, scaled). codes: 8-bit pools
    (converted in registers); scaled: codes with per-token scales (fp8/int8), not plain e4m3 (fp8_e4m3). Without
    scales the data tensors stand in for the unused scale pointers."""
    k, ks = split_pool(k_pool)
    v, vs = split_pool(v_pool)
    scaled = ks is not None
    assert scaled == (vs is not None) and v.dtype == k.dtype and k.stride(-1) == 1 and v.stride(-1) == 1
    assert not scaled or ks.stride(-1) == vs.stride(-1) == 1
    return k, ks if scaled else k, v, vs if scaled else k, k.dtype in (torch.float8_e4m3fn, torch.int8), scaled


def pool_nbytes(pool: KVPool) -> int:
    return pool.nbytes if isinstance(pool, QuantizedKVCache) else pool.numel() * pool.element_size()


PLAIN_DTYPES: dict[str, torch.dtype] = {"fp8_e4m3": torch.float8_e4m3fn}  # codes without scales
FP8_MAX = 448.0


def bytes_per_slot_head(head_dim: int, cache_dtype: str, model_dtype: torch.dtype) -> int:
    """Bytes of one kv head of one cached token in one pool (K or V): codes + scale, or head_dim x model dtype."""
    if cache_dtype in PLAIN_DTYPES:
        return head_dim
    if cache_dtype in CODE_DTYPES:
        return head_dim * torch.empty((), dtype=CODE_DTYPES[cache_dtype]).element_size() + SCALE_BYTES
    return head_dim * torch.empty((), dtype=model_dtype).element_size()


def new_pool(shape: tuple[int, int, int, int], cache_dtype: str, model_dtype: torch.dtype, device: torch.device,
             zero: bool) -> KVPool:
    """An empty pool; zero=False leaves it uninitialized except the null block 0."""
    device = torch.device(device)
    if cache_dtype in PLAIN_DTYPES and device.type != "cuda":
        from ..errors import InvalidRequestError

        raise InvalidRequestError(f"--kv-cache-dtype {cache_dtype} (e4m3 without scales) runs on CUDA GPUs only; on "
                                  "the CPU use fp8 or int8 (codes with a scale per token and head)",
                                  param="kv_cache_dtype")
    if cache_dtype.startswith("fp8") and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        from ..errors import InvalidRequestError

        raise InvalidRequestError(f"--kv-cache-dtype fp8 needs an Ada or Hopper GPU (compute capability 8.9+); "
                                  f"{torch.cuda.get_device_name(device)} has no fp8 conversions: use int8",
                                  param="kv_cache_dtype")
    make = torch.zeros if zero else torch.empty
    if cache_dtype not in CODE_DTYPES:
        pool = make(shape, dtype=PLAIN_DTYPES.get(cache_dtype, model_dtype), device=device)
        parts = [pool]
    else:
        pool = QuantizedKVCache(make(shape, dtype=CODE_DTYPES[cache_dtype], device=device),
                                make(shape[:3], dtype=SCALE_DTYPE, device=device))
        parts = [pool.codes, pool.scales]
    if not zero:
        for t in parts:
            t[0].zero_()  # (fp8 zero_ works on CPU and CUDA)
    return pool


def quantize_kv(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [..., head_dim] -> (codes [..., head_dim] fp8/int8, scales [...] float32).

    The Triton writer computes the same fp32 ops in the same order (absmax / QMAX, x / scale, clamp to
    +-QMAX, then fp8: round to nearest even; int8: floor(y + 0.5)), so both produce the same codes.
    """
    qmax = QMAX[kind]
    xf = x.float()
    amax = xf.abs().amax(-1)
    scale = amax / torch.full_like(amax, qmax)  # a tensor divisor: CUDA divides by a Python scalar via its reciprocal
    y = xf / torch.where(scale > 0, scale, torch.ones_like(scale))[..., None]
    if kind == "fp8":
        codes = y.clamp(-qmax, qmax).to(torch.float8_e4m3fn)
    else:
        codes = torch.floor(y.clamp(-qmax, qmax) + 0.5).to(torch.int8)  # halves round up, as the Triton writer
    return codes, scale


def dequantize_kv(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    # codes: [..., head_dim], scales: [...] -> [..., head_dim] in dtype
    return (codes.float() * scales[..., None]).to(dtype)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """fp8 tensors viewed as uint8 (CPU index_copy_/index_put_ lack fp8 kernels); other dtypes unchanged."""
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def gather_dequant(pool: KVPool, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """pool[index] (indexing dim 0: slots of a `flat_view`, or block ids of a 4-d pool), dequantized to dtype."""
    if not isinstance(pool, QuantizedKVCache):
        return as_bytes(pool)[index].view(pool.dtype).to(dtype)
    codes = as_bytes(pool.codes)[index]
    if pool.codes.dtype == torch.float8_e4m3fn:
        codes = codes.view(torch.float8_e4m3fn)
    return dequantize_kv(codes, pool.scales[index], dtype)


def gather_rows(pool: KVPool, rows: torch.Tensor, dtype: torch.dtype, per_head: bool = True) -> torch.Tensor:
    """Rows of a pool [num_blocks, block_size, kv_heads, head_dim], dequantized to dtype. per_head: the pool seen as
    [slots * kv_heads, head_dim] (row = slot * kv_heads + kv head) -> [len(rows), head_dim]; else as
    [slots, kv_heads, head_dim] -> [len(rows), kv_heads, head_dim]. rows: 1-d int64. index_select copies whole rows
    (several times faster on CPU than advanced indexing); rows ordered (sequence, kv head, position) give the per-head
    key/value batch [B * kv_heads, L, head_dim] that batched matmuls take without a transpose."""
    shape = (-1, pool.shape[-1]) if per_head else (-1, *pool.shape[-2:])
    if not isinstance(pool, QuantizedKVCache):
        x = as_bytes(pool).view(shape).index_select(0, rows).view(pool.dtype)
        return x if x.dtype == dtype else x.to(dtype)
    codes = as_bytes(pool.codes).view(shape).index_select(0, rows)
    scales = pool.scales.view(shape[:-1]).index_select(0, rows)
    if pool.codes.dtype == torch.float8_e4m3fn and codes.device.type == "cpu":
        return (e4m3_to_float(codes) * scales[..., None]).to(dtype)
    if pool.codes.dtype == torch.float8_e4m3fn:
        codes = codes.view(torch.float8_e4m3fn)
    return dequantize_kv(codes, scales, dtype)


_E4M3_SHIFT = 2.0 ** 120  # float exponent bias 127 - e4m3's 7


def e4m3_to_float(codes: torch.Tensor) -> torch.Tensor:
    """e4m3fn bytes (uint8) -> float32, equal to codes.view(float8_e4m3fn).float() for every finite code (writers
    never store NaN) and ~3x faster on CPU, whose fp8 conversion is scalar. The sign, exponent and mantissa bits
    moved into a bfloat16's places give the value times 2^-120, and multiplying by 2^120 is exact: e4m3 subnormals
    land on bfloat16 subnormals (flushed to 0 only under torch.set_flush_denormal(True): values under 2^-6 of a
    scale, far below the fp8 rounding of the others)."""
    i = codes.to(torch.int16)
    sign = (i & 0x80).bitwise_left_shift_(8)
    i.bitwise_and_(0x7F).bitwise_left_shift_(4).bitwise_or_(sign)
    return i.view(torch.bfloat16).float().mul_(_E4M3_SHIFT)


def write_pool(pool: KVPool, x: torch.Tensor, slots: torch.Tensor) -> None:
    """pool.view(-1, kv_heads, head_dim)[slots] = x (quantized when the pool is); x: [n, kv_heads, head_dim]."""
    kv_heads, head_dim = pool.shape[2:]
    if not isinstance(pool, QuantizedKVCache):  # (fp8 viewed as bytes: no fp8 index_copy_ on CPU or CUDA)
        as_bytes(pool).view(-1, kv_heads, head_dim).index_copy_(0, slots, as_bytes(to_pool_dtype(x, pool.dtype)))
        return
    codes, scales = quantize_kv(x, pool.kind)
    as_bytes(pool.codes).view(-1, kv_heads, head_dim).index_copy_(0, slots, as_bytes(codes))
    pool.scales.view(-1, kv_heads).index_copy_(0, slots, scales)


def to_pool_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x cast for a plain pool; e4m3 saturates at +-448 (a plain cast would give NaN)."""
    if dtype == torch.float8_e4m3fn:
        return x.float().clamp(-FP8_MAX, FP8_MAX).to(dtype)
    return x.to(dtype)


def flat_view(pool: KVPool) -> KVPool:
    """[num_blocks, block_size, ...] -> [slots, ...] for either kind of pool."""
    if isinstance(pool, QuantizedKVCache):
        return QuantizedKVCache(pool.codes.flatten(0, 1), pool.scales.flatten(0, 1))
    return pool.flatten(0, 1)


def quantize_pool(pool: torch.Tensor, kind: str) -> QuantizedKVCache:
    """A whole plain pool [num_blocks, block_size, kv_heads, head_dim] as a quantized one (tests, benchmarks)."""
    codes, scales = quantize_kv(pool, kind)
    return QuantizedKVCache(codes.contiguous(), scales.contiguous())
