"""Weights kept quantized on CPU: GGUF blocks unpacked to one affine group form, then repacked for the native
kernel (kernels/cpu_quant.py) or, where it is not built, for the CPU kernels PyTorch ships.

  GroupQuant    w = code * scale + min per group of `group` inputs: the common form of Q4_0/1, Q5_0/1, Q4_K, Q5_K,
                Q8_0, Q6_K (groups of 16, signed codes; unpacked for the GPU kernels only, layers/gpu_quant.py),
                and of the int8/int4 weights `quantize_int8` / `quantize_int4` make (--quantization)
                (Q2_K, Q3_K stay dequantized)
  NativeWeight  the native kernel's tiles (groups of 32, 4/5/8-bit codes, N % 16 == 0): int8 activations with a
                residual pass for every row count (a row's result never depends on its batch), fused norm /
                activation / residual entry points (LlamaLayer.native_call)
  Int4Weight    aten._weight_int4pack_mm_for_cpu (bf16 activations, groups of 32): exact for 4-bit codes up to
                bf16 rounding of scale and zero (torch's w = (code - 8) * scale + zero, zero = min + 8 * scale)
                5- and 8-bit codes run as two 4-bit halves along K (2x the work), also exact up to bf16 scales.
                The int4 kernel re-dequantizes its weights for every 4 rows, so from DENSE_MIN_ROWS rows on
                (batched decode, prefill) a bf16 copy prepacked for oneDNN runs instead, on CPUs with native
                bf16 (2 Zen 4 cores, SmolLM2-135M at 16 rows: blocks 1.45x, the split Q8_0 head 3.6x; 5x at 64
                rows); the copies, 2 bytes a weight, are held within HEARTH_CPU_DENSE_MB (default 1024) per process.
"""
from __future__ import annotations

import functools
import os
import weakref
from collections.abc import Callable

import numpy as np
import torch

from ..kernels import cpu_quant

QUANT_TYPES = ("Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q8_0")  # unpacked to GroupQuant; others dequantized
GPU_QUANT_TYPES = QUANT_TYPES + ("Q6_K",)  # groups of 16: no CPU int4 layout, but the GPU kernels take them


class GroupQuant:
    """w = code * scale + min per group of `group` inputs. codes: [N, K] uint8 (4/5-bit types) or int8 (Q8_0);
    scale, min: [N, K // group] float32; dtype: activation dtype of the model using it.

    A GGUF tensor's codes are decoded on first use (`decode`): the native kernel's layout is made from the file's
    blocks directly (`native_codes`, kernels/cpu_quant.py), so a CPU load never materializes a byte per weight
    for the matrices it packs."""

    def __init__(self, codes: torch.Tensor | None, scale: torch.Tensor | None, min: torch.Tensor | None, group: int,
                 bits: int, dtype: torch.dtype = torch.float32, *, shape: tuple[int, int] | None = None,
                 code_dtype: torch.dtype | None = None, decode: Callable[[], torch.Tensor] | None = None,
                 native: Callable[[], np.ndarray | None] | None = None,
                 scales: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None):
        """codes None: `decode()` makes them when first read (shape and code_dtype then given); native: makes
        the native kernel's code layout without them (None where it cannot); scale and min None: `scales()`
        makes both when first read. name / packed_cache: set by the GGUF loader (loader/pack_cache.py: the native
        layout saved once per model file)."""
        assert codes is not None or (decode is not None and shape is not None and code_dtype is not None)
        assert scale is not None or scales is not None
        self._codes, self._decode, self._native = codes, decode, native
        self._scale, self._min, self._scales = scale, min, scales
        self.shape = torch.Size(codes.shape if codes is not None else shape)
        self.code_dtype = codes.dtype if codes is not None else code_dtype
        self.group, self.bits, self.dtype = group, bits, dtype
        self.name: str | None = None
        self.packed_cache = None  # loader/pack_cache.PackCache

    @property
    def scale(self) -> torch.Tensor:
        if self._scale is None:
            (self._scale, self._min), self._scales = self._scales(), None
        return self._scale

    @property
    def min(self) -> torch.Tensor:
        if self._min is None:
            _ = self.scale  # makes both
        return self._min

    @property
    def codes(self) -> torch.Tensor:
        if self._codes is None:
            self._codes, self._decode = self._decode(), None
        return self._codes

    @codes.setter
    def codes(self, value: torch.Tensor) -> None:
        self._codes, self._decode, self._native = value, None, None
        self.shape, self.code_dtype = value.shape, value.dtype

    @property
    def device(self) -> torch.device:
        return torch.device("cpu") if self._codes is None else self._codes.device  # undecoded: a CPU file

    def __repr__(self) -> str:
        return f"GroupQuant({tuple(self.shape)}, bits={self.bits}, group={self.group}, codes={self.code_dtype})"

    def __getitem__(self, rows: torch.Tensor) -> GroupQuant:
        """Select/permute output rows (e.g. llama q/k head permutation)."""
        return GroupQuant(self.codes[rows], self.scale[rows], self.min[rows], self.group, self.bits, self.dtype)

    @staticmethod
    def cat(parts: list[GroupQuant]) -> GroupQuant:
        """Concatenate along the output dim (fused q/k/v, gate/up). The codes stay undecoded: the native layout
        of whole tiles concatenates as bytes (each part's N % 16 == 0), else it is made from the joined codes."""
        p = parts[0]
        assert all(q.group == p.group and q.bits == p.bits and q.code_dtype == p.code_dtype for q in parts)

        def native() -> np.ndarray | None:
            if any(q.shape[0] % cpu_quant.TILE for q in parts):
                return None
            return np.concatenate([q.native_codes() for q in parts])

        g = GroupQuant(None, None, None, p.group, p.bits, p.dtype, shape=(sum(q.shape[0] for q in parts), p.shape[1]),
                       code_dtype=p.code_dtype, decode=lambda: torch.cat([q.codes for q in parts]), native=native,
                       scales=lambda: (torch.cat([q.scale for q in parts]), torch.cat([q.min for q in parts])))
        if all(q.name for q in parts):
            g.name, g.packed_cache = "+".join(q.name for q in parts), p.packed_cache
        return g

    def native_codes(self) -> np.ndarray:
        """The codes in the native kernel's layout (cpu_quant.interleave: unsigned, 4-bit two a byte), flat
        uint8; straight from the file's blocks where the format allows, else from the decoded codes."""
        packed = self._native() if self._codes is None and self._native is not None else None
        if packed is None:
            packed = cpu_quant.interleave_np(self.codes.numpy(), 4 if self.bits == 4 else 8)
        return packed

    @functools.cached_property
    def fp16_scales(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(scale, min) in fp16 as the native kernel takes them (signed codes: the + 128 offset folded into the
        min), and the float32 values they stand for: [N, K // group] each (NativeWeight.supports, pack)."""
        scale = self.scale.numpy()
        mins = self.min.numpy()
        if self.code_dtype == torch.int8:
            mins = mins - np.float32(128) * scale
        with np.errstate(over="ignore"):  # overflow to inf: supports() says no
            return scale.astype(np.float16), mins.astype(np.float16), scale, mins

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        n, k = self.codes.shape
        w = self.codes.float().view(n, k // self.group, self.group) * self.scale[..., None] + self.min[..., None]
        return w.view(n, k).to(dtype or self.dtype)

    def nibble_split(self) -> GroupQuant:
        """5/8-bit codes as two 4-bit halves side by side along K: [N, 2K] with w = hi half + lo half exactly
        (q = 16 * (q >> 4) + (q & 15)); the matmul then takes cat([x, x], -1)."""
        q = self.codes.to(torch.int16)
        off = -8 if self.codes.dtype == torch.int8 else 0  # signed codes: hi = (q >> 4) + 8 in [0, 15]
        codes = torch.cat([(q >> 4) - off, q & 15], 1).to(torch.uint8)
        scale = torch.cat([16 * self.scale, self.scale], 1)
        # min goes with the lo half: both kernel zeros (min + 8 * scale) then stay exact multiples of the
        # bf16-rounded scale for the _0 types (hi: 0 or 128 d, lo: 8 d - 16 d or 8 d)
        mins = torch.cat([16 * off * self.scale, self.min], 1)
        return GroupQuant(codes, scale, mins, self.group, 4, self.dtype)

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` dequantized: F.embedding on the codes. ids: [T] -> [T, K]."""
        return self[ids].dequantize()

    def to(self, device: torch.device | str) -> GroupQuant:
        return GroupQuant(self.codes.to(device), self.scale.to(device), self.min.to(device), self.group, self.bits,
                          self.dtype)

    def tensors(self) -> list[torch.Tensor]:
        return [self.codes, self.scale, self.min]


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)[..., 0]


def _nibbles(qs: np.ndarray, run: int) -> np.ndarray:
    """[..., B] packed bytes -> [..., 2B] codes: per run of `run` bytes, its low nibbles then its high nibbles."""
    qs = qs.reshape(*qs.shape[:-1], -1, 1, run)
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-2).reshape(*qs.shape[:-3], -1)


def unpack_gguf(raw: np.ndarray, type_name: str, shape: tuple[int, int]) -> GroupQuant | None:
    """GGUF blocks -> GroupQuant. raw: [N, bytes per row] uint8 as GGUFFile.raw gives it; shape: (N, K).
    Codes, scales and mins are decoded when first read (a packed-weight cache hit reads none of them); Q4_0, Q4_1
    and Q8_0 blocks give the native kernel's layout directly (their nibble pairs are the kernel's: no decode)."""
    import gguf

    if type_name not in GPU_QUANT_TYPES:
        return None
    n, k = shape
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    b = np.asarray(raw, dtype=np.uint8).reshape(n, k // block, size)
    if type_name == "Q6_K":  # [ql: 128, qh: 64, scales: 16 int8, d], w = d * scale[16 groups] * (q - 32)
        def scales_q6k() -> tuple[torch.Tensor, torch.Tensor]:
            sc = b[..., 192:208].copy().view(np.int8).astype(np.float32)  # [N, blocks, 16]
            scale = _f16(b[..., 208:210])[..., None] * sc
            return torch.from_numpy(scale.reshape(n, -1)), torch.zeros(n, k // 16)

        return GroupQuant(None, None, None, 16, 6, shape=shape, code_dtype=torch.int8,
                          decode=lambda: _q6k_codes(b, n, k), scales=scales_q6k)
    if type_name == "Q8_0":
        return GroupQuant(None, None, None, 32, 8, shape=shape, code_dtype=torch.int8,
                          scales=lambda: (torch.from_numpy(_f16(b[..., 0:2])), torch.zeros(n, k // 32)),
                          decode=lambda: torch.from_numpy(b[..., 2:].copy().view(np.int8).reshape(n, k)),
                          native=lambda: _native_q8_0(b, n, k))
    bits = 5 if type_name.startswith("Q5") else 4
    if not type_name.endswith("_K"):  # Q4_0 Q4_1 Q5_0 Q5_1: [d, (m), (qh: 32 fifth bits), qs: 16 bytes]
        off = 4 if type_name.endswith("_1") else 2

        def scales() -> tuple[torch.Tensor, torch.Tensor]:
            d = _f16(b[..., 0:2])
            m = _f16(b[..., 2:4]) if off == 4 else -(1 << (bits - 1)) * d  # _0 types: w = d * (q - 8 or 16)
            return torch.from_numpy(d), torch.from_numpy(m)

        def decode() -> torch.Tensor:
            codes = _nibbles(b[..., off + 4 * (bits == 5):], 16)
            if bits == 5:
                qh = np.ascontiguousarray(b[..., off:off + 4]).view(np.uint32)  # [N, blocks, 1]
                codes |= ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8) << 4
            return torch.from_numpy(codes.reshape(n, k))

        return GroupQuant(None, None, None, 32, bits, shape=shape, code_dtype=torch.uint8, decode=decode,
                          scales=scales,
                          native=(lambda: _native_q4(b[..., off:], n, k)) if bits == 4 else None)
    # Q4_K / Q5_K: 256-weight super-blocks of 8 groups of 32, w = d * sc * q - dmin * m
    def scales_k() -> tuple[torch.Tensor, torch.Tensor]:
        d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
        sc, mn = gguf.quants.Q4_K.get_scale_min(b[..., 4:16].reshape(-1, 12))
        sc, mn = sc.reshape(n, -1, 8).astype(np.float32), mn.reshape(n, -1, 8).astype(np.float32)
        return (torch.from_numpy((d[..., None] * sc).reshape(n, -1)),
                torch.from_numpy((-dmin[..., None] * mn).reshape(n, -1)))

    def decode_k() -> torch.Tensor:
        codes = _nibbles(b[..., 16 + 32 * (bits == 5):], 32)  # runs of 32 bytes: groups 2j, 2j+1 in low/high nibbles
        if bits == 5:  # qh[32]: bit j of byte l is the fifth bit of element l of group j
            qh = b[..., 16:48, None] >> np.arange(8, dtype=np.uint8)  # [N, blocks, 32, 8]
            codes |= ((qh & 1).swapaxes(-1, -2).reshape(n, -1, 256)) << 4
        return torch.from_numpy(codes.reshape(n, k))

    return GroupQuant(None, None, None, 32, bits, shape=shape, code_dtype=torch.uint8, decode=decode_k,
                      scales=scales_k)


def _q6k_codes(b: np.ndarray, n: int, k: int) -> torch.Tensor:
    # per 128-weight half: 4 runs of 32 = (ql[0:32] lo, ql[32:64] lo, ql[0:32] hi, ql[32:64] hi) | qh bits 2j..
    ql = (b[..., :128].reshape(n, -1, 2, 1, 64) >> np.array([0, 4], np.uint8)[:, None]) & 15
    qh = (b[..., 128:192].reshape(n, -1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3
    q = ql.reshape(n, -1, 8, 32) | (qh.reshape(n, -1, 8, 32) << 4)
    return torch.from_numpy((q.astype(np.int16) - 32).astype(np.int8).reshape(n, k))


def _native_q4(qs: np.ndarray, n: int, k: int) -> np.ndarray | None:
    """Q4_0/Q4_1 blocks' 16 code bytes [N, K / 32, >= 16] -> cpu_quant.interleave's 4-bit layout: byte j of a
    block holds codes j and j + 16 (low, high nibble), the kernel's pairing of vector i and i + 4, so the bytes
    only move, 4 at a time. None: N is not whole tiles (the caller checks supports first)."""
    if n % cpu_quant.TILE:
        return None
    v = np.ascontiguousarray(qs[..., :16]).view(np.uint32).reshape(n // cpu_quant.TILE, cpu_quant.TILE, k // 32, 4)
    return np.ascontiguousarray(v.transpose(0, 2, 3, 1)).view(np.uint8).reshape(-1)


def _native_q8_0(b: np.ndarray, n: int, k: int) -> np.ndarray | None:
    """Q8_0 blocks [N, K / 32, 34] -> cpu_quant.interleave's 8-bit layout of the codes + 128."""
    if n % cpu_quant.TILE:
        return None
    v = (b[..., 2:] ^ np.uint8(0x80)).view(np.uint32).reshape(n // cpu_quant.TILE, cpu_quant.TILE, k // 32, 8)
    return np.ascontiguousarray(v.transpose(0, 2, 3, 1)).view(np.uint8).reshape(-1)


def quantize_int8(w: torch.Tensor, group: int = 32) -> GroupQuant:
    """Symmetric int8 per group of `group` inputs: code = round(w / scale) in [-127, 127], scale = absmax / 127.
    w: [N, K] float (K % group == 0) -> GroupQuant on w's device, dtype w.dtype."""
    n, k = w.shape
    wf = w.float().view(n, k // group, group)
    scale = (wf.abs().amax(-1) / 127).clamp(min=1e-12)
    codes = torch.round(wf / scale[..., None]).clamp(-127, 127).to(torch.int8).view(n, k)
    return GroupQuant(codes, scale, torch.zeros_like(scale), group, 8, w.dtype)


def quantize_int4(w: torch.Tensor, group: int = 32) -> GroupQuant:
    """Asymmetric int4 per group: w ~= code * scale + min, code in 0..15, min = group min, scale = range / 15.
    w: [N, K] float (K % group == 0) -> GroupQuant on w's device, dtype w.dtype."""
    n, k = w.shape
    wf = w.float().view(n, k // group, group)
    lo, hi = wf.amin(-1), wf.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    codes = torch.round((wf - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8).view(n, k)
    return GroupQuant(codes, scale, lo, group, 4, w.dtype)


# From this many rows on, an Int4Weight with a dense copy runs the bf16 oneDNN GEMM instead of the int4 kernel,
# whose cost steps up every 4 rows while the dense GEMM reads 2 bytes a weight for any small row count (2 Zen 4
# cores, SmolLM2-135M: int4 wins to 4 rows, dense from 5; a split 5/8-bit weight does twice the int4 work and
# changes over from 3 rows)
DENSE_MIN_ROWS = 5
DENSE_MIN_ROWS_SPLIT = 3
_dense_bytes = [0]  # bytes of live dense copies in this process


def _dense_budget() -> int:
    """HEARTH_CPU_DENSE_MB: MiB of bf16 weight copies kept for multi-row CPU matmuls (0 turns them off)."""
    return int(float(os.environ.get("HEARTH_CPU_DENSE_MB", "1024")) * 2**20)


def dense_budget_bytes() -> int:
    """Bytes of bf16 copies a fresh process would keep: HEARTH_CPU_DENSE_MB, or 0 without native bf16 GEMMs."""
    return _dense_budget() if dense_supported() else 0


def _release(nbytes: int) -> None:
    _dense_bytes[0] -= nbytes


@functools.cache
def dense_supported() -> bool:
    """oneDNN with native bf16 (AVX-512 BF16 / AMX; without them the bf16 GEMM is emulated and the thresholds
    above, measured on Zen 4, do not hold)."""
    try:
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        return torch.backends.mkldnn.is_available() and bool(native)
    except (AttributeError, RuntimeError):  # torch builds without these probes
        return False


def dense_copy(owner: object, g: GroupQuant, dense: bool | None = None) -> torch.Tensor | None:
    """g as bf16 prepacked for oneDNN (an opaque MkldnnCPU tensor), counted against the process's copies budget
    until `owner` is collected; None on CPUs without native bf16 GEMMs, or when `dense` is False, or (None) when the
    budget has no room."""
    nbytes = 2 * g.shape[0] * g.shape[1]
    if dense is None:
        dense = _dense_bytes[0] + nbytes <= _dense_budget()
    if not (dense and dense_supported()):
        return None
    _dense_bytes[0] += nbytes
    weakref.finalize(owner, _release, nbytes)
    return torch.ops.mkldnn._reorder_linear_weight(g.dequantize(torch.float32).bfloat16(), None)


def dense_linear(x: torch.Tensor, dense: torch.Tensor, out_features: int) -> torch.Tensor:
    """x [M, K] bf16 @ a dense_copy -> [M, N] bf16."""
    if torch.compiler.is_compiling():
        return torch.ops.hearthlm.cpu_dense_linear(x, dense, out_features)
    return torch.ops.mkldnn._linear_pointwise(x, dense, None, "none", [], "")


# The dense GEMM as an op torch.compile keeps opaque (models/cpu_compile.py): inductor's own lowering of
# mkldnn._linear_pointwise only takes weights it prepacked itself (freezing), not ours passed in as graph inputs.
# Registered for every backend: its weight is a oneDNN (MkldnnCPU) tensor.
_lib = torch.library.Library("hearthlm", "FRAGMENT")
_lib.define("cpu_dense_linear(Tensor x, Tensor w, int out_features) -> Tensor")
_lib.impl("cpu_dense_linear", lambda x, w, n: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""),
          "CompositeExplicitAutograd")
torch.library.register_fake("hearthlm::cpu_dense_linear", lambda x, w, n: x.new_empty(x.shape[0], n), lib=_lib)


class Int4Weight:
    """4-bit codes, groups of 32, for aten._weight_int4pack_mm_for_cpu (needs N % 16 == 0, bf16 x).
    5/8-bit codes run as two 4-bit halves (GroupQuant.nibble_split): twice the K, x fed twice.
    dense: also keep the weights as bf16 prepacked for oneDNN, used from `dense_min_rows` rows on (None: if the
    process's HEARTH_CPU_DENSE_MB budget has room). A row's result then depends on the row count of its call
    (int4 below the threshold, bf16 weights above), both within bf16 rounding of the dequantized weights."""

    def __init__(self, g: GroupQuant, dense: bool | None = None):
        self.split = g.bits > 4
        self.out_features, self.in_features = g.shape[0], g.shape[1]
        self.dense = dense_copy(self, g, dense)
        self.dense_min_rows = DENSE_MIN_ROWS_SPLIT if self.split else DENSE_MIN_ROWS
        if self.split:
            g = g.nibble_split()
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(g.codes.to(torch.int32), 2)
        # [K/32, N, 2]: scale, zero with w = (code - 8) * scale + zero
        self.scale_zeros = torch.stack([g.scale, g.min + 8 * g.scale], -1).transpose(0, 1).contiguous().bfloat16()

    @staticmethod
    def supports(g: GroupQuant) -> bool:
        return g.bits <= 8 and g.group == 32 and g.shape[0] % 16 == 0

    def __call__(self, x: torch.Tensor, cast: bool = True) -> torch.Tensor:
        # x: [M, K] -> [M, N] in x.dtype (cast=False: in the kernels' bf16)
        xb = x.to(torch.bfloat16)
        if self.dense is not None and x.shape[0] >= self.dense_min_rows:
            y = dense_linear(xb, self.dense, self.out_features)
        else:
            if self.split:
                xb = torch.cat([xb, xb], 1)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, self.packed, 32, self.scale_zeros)
        return y.to(x.dtype) if cast else y

    def tensors(self) -> list[torch.Tensor]:
        """The int4 layout (the dense copy is an opaque oneDNN tensor without storage: see dense_nbytes)."""
        return [self.packed, self.scale_zeros]

    @property
    def dense_nbytes(self) -> int:
        return 0 if self.dense is None else 2 * self.out_features * self.in_features


class NativeWeight:
    """A GroupQuant (groups of 32, 4/5/8-bit codes) for the native CPU kernel (kernels/cpu_quant.py: int8
    activations, u8 x s8 dot products), 4-bit codes two a byte, else a byte each, fp16 scale and min. Every call
    takes the kernel's residual pass (x to within 1/256 of a step): one scheme for every row count, so that a
    row's result depends on that row alone (no row-count switch to another kernel either)."""

    def __init__(self, g: GroupQuant):
        self.out_features, self.in_features = g.shape
        self.bits = 4 if g.bits == 4 else 8  # cpu_quant.pack's layout, made without decoding GGUF codes
        cache = g.packed_cache if g.name else None
        saved = cache.get(g.name, g.shape, self.bits) if cache is not None else None
        if saved is not None:
            self.codes, self.scale, self.mins = saved
        else:
            s16, m16, _, _ = g.fp16_scales
            self.codes = torch.from_numpy(g.native_codes())
            self.scale, self.mins = cpu_quant.tile_scales(s16), cpu_quant.tile_scales(m16)
            if cache is not None:
                cache.put(g.name, self.codes, self.scale, self.mins)
        self.dense = None  # no bf16 copy: its GEMM's rounding would differ from the kernel's
        self.lib = cpu_quant.library()  # the ISA's build the engine picked (cpu_kernel); attention takes it too
        self._call = self.lib.hl_qmatmul
        self._args = (self.in_features, self.codes.data_ptr(), self.scale.data_ptr(), self.mins.data_ptr(),
                      self.out_features, self.bits)

    @staticmethod
    def supports(g: GroupQuant) -> bool:
        if g.group != cpu_quant.GROUP or g.bits not in (4, 5, 8) or g.shape[1] % cpu_quant.GROUP or \
                g.shape[0] % cpu_quant.TILE:
            return False
        if g.name and g.packed_cache is not None and g.packed_cache.has(g.name):  # checked when it was saved
            return cpu_quant.library() is not None
        # scale and min as fp16 (GGUF's own scales are fp16 already): no overflow, and no precision lost beyond
        # fp16's rounding (float32 scales below its normal range would lose bits). numpy: one thread, a scale per
        # 32 weights (torch's OpenMP loops wait on busy cores)
        if g.device.type != "cpu":
            return False
        h16, hm16, scale, mins = g.fp16_scales
        s16, m16 = h16.astype(np.float32), hm16.astype(np.float32)
        tol = np.float32(2.0 ** -10)
        with np.errstate(over="ignore", invalid="ignore"):
            if not (np.isfinite(s16).all() and np.isfinite(m16).all() and
                    (np.abs(s16 - scale) <= tol * np.abs(scale)).all() and
                    (np.abs(m16 - mins) <= tol * (np.abs(mins) + np.abs(scale))).all()):
                return False
        return cpu_quant.library() is not None

    def __call__(self, x: torch.Tensor, cast: bool = True) -> torch.Tensor:
        # x: [M, K] -> [M, N] in x.dtype (cast=False: float32)
        y = self.run(x if x.dtype == torch.float32 and x.stride(-1) == 1 else x.float().contiguous())
        return y.to(x.dtype) if cast and x.dtype != torch.float32 else y

    def run(self, x: torch.Tensor, out: torch.Tensor | None = None, accumulate: bool = False,
            norm: tuple[torch.Tensor, float] | None = None, silu_mul: bool = False,
            residual: bool = True) -> torch.Tensor:
        """out (+)= f(x) @ W^T, float32 (kernels/cpu_quant.qmatmul: f = RMSNorm with norm = (weight, eps), or
        SiLU(x[:, :K]) * x[:, K:] with silu_mul, else x). x: float32, unit column stride. residual: x's int8
        rounding residuals in a second pass (near float32 results); False only for tests and benchmarks."""
        m = x.shape[0]
        if out is None:
            out = torch.empty(m, self.out_features, dtype=torch.float32)
        if m:
            pre, w, eps = cpu_quant.input_function(norm, silu_mul)
            if self._call(x.data_ptr(), m, x.stride(0), *self._args, out.data_ptr(), out.stride(0), pre, w, eps,
                          accumulate, residual):
                raise MemoryError("native CPU matmul: out of memory for the quantized activations")
        return out

    def tensors(self) -> list[torch.Tensor]:
        return [self.codes, self.scale, self.mins]

    @property
    def dense_nbytes(self) -> int:
        return 0


def pack(g: GroupQuant) -> NativeWeight | Int4Weight | None:
    """The CPU kernel layout for g: the native kernel's (kernels/cpu_quant.py) where it is built, else PyTorch's int4
    kernel's; None: the caller dequantizes."""
    if NativeWeight.supports(g):
        return NativeWeight(g)
    return Int4Weight(g) if Int4Weight.supports(g) else None
