"""Pre-quantized HF checkpoints (config.json's `quantization_config`): AWQ, GPTQ and FP8 weights converted at load
into the engine's weight kernels.

  AWQ   quant_method "awq", version "gemm", 4-bit: qweight int32 [K, N / 8] (8 codes a word along the outputs in
        AWQ's interleaved order 0 2 4 6 1 3 5 7), qzeros int32 [K / group, N / 8] (same packing), scales
        [K / group, N]; w[n, k] = (q - z) * s.
  GPTQ  quant_method "gptq", 4- or 8-bit: qweight int32 [K * bits / 32, N] (codes along the inputs, low bits
        first), qzeros [G, N * bits / 32] (along the outputs), scales [G, N], g_idx [K] (input k's group);
        checkpoint_format "gptq" (the default) stores zero - 1, "gptq_v2" the zero itself.
  FP8   quant_method "fp8" (or compressed-tensors with 8-bit float weights): weight float8_e4m3fn [N, K] and
        weight_scale (per tensor, or per output channel [N] / [N, 1]); input_scale is not used (activations are
        scaled per token at run time).

Where each goes (`QuantizedCheckpoint.get`):
  4-bit AWQ/GPTQ with groups in input order (desc_act false, or a g_idx that is i // group):
    CUDA  QuantWeight (layers/gpu_quant.py): the codes as they are, one scale and min = -z * s per group of the
          file; float16 where the mins are exact in float16 (symmetric GPTQ: z = 8), else float32: exact.
    CPU   a GroupQuant in groups of 32 for the native kernel (layers/quant_linear.py): 4-bit codes with min = -z * s
          where every min is exact in fp16 (symmetric GPTQ), else the lossless re-pack as 8-bit signed codes
          q - z with scale s (the kernel's fp16 scale and min then stand for the file's values exactly; a byte a
          weight, as Q8_0). Explicit float32 on CPU (the HF-exact path) or weights='dequantize': dequantized.
  GPTQ desc_act (a g_idx not in input order): the input features sorted by group once at load (the codes' columns
    permuted), then as above behind InputPermuted, which gathers x to that order on each call.
  8-bit GPTQ, or groups that do not split into 32s: dequantized to the compute dtype (exact in float32).
  FP8: CUDA Fp8Weight (the per-tensor scale repeated per channel); CPU dequantized to the compute dtype.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import UnsupportedModelError
from ..layers.weight_kernel import WeightKernel

SUPPORTED = "awq (version gemm, 4-bit), gptq (4- or 8-bit), fp8 (per-tensor or per-channel weight_scale)"
_AWQ_REVERSE = [0, 4, 1, 5, 2, 6, 3, 7]  # output column c of an 8-column chunk sits in nibble _AWQ_REVERSE[c]


def read_quantization_config(model_dir: Path) -> dict | None:
    """config.json's quantization_config (None when absent or the file is unreadable: read_hf_config says why)."""
    try:
        d = json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    qc = d.get("quantization_config")
    return qc if isinstance(qc, dict) and qc else None


def _unpack(t: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 words [..., W] -> codes [..., W, 32 / bits] (int32), low bits first."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    return (t.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)


class QuantizedCheckpoint:
    """One checkpoint's quantization_config and its tensors (a SafetensorsWeights)."""

    def __init__(self, qc: dict, st, where: str = "") -> None:
        self.st = st
        method = str(qc.get("quant_method", "")).lower()
        self.bits = int(qc.get("bits", qc.get("w_bit", 0)) or 0)
        if method == "compressed-tensors" and _ct_fp8(qc):
            method = "fp8"
        if method == "awq":
            version = str(qc.get("version", "gemm")).lower()
            if version != "gemm" or self.bits != 4:
                raise UnsupportedModelError(f"{where}AWQ version {version!r} at {self.bits} bits is not supported "
                                            f"(supported: {SUPPORTED}): use an AWQ GEMM 4-bit checkpoint")
        elif method == "gptq":
            if self.bits not in (4, 8):
                raise UnsupportedModelError(f"{where}GPTQ at {self.bits} bits is not supported (supported: "
                                            f"{SUPPORTED}): use a 4-bit GPTQ checkpoint (the nearest choice)")
        elif method == "fp8":
            if qc.get("weight_block_size"):
                raise UnsupportedModelError(f"{where}block-wise FP8 (weight_block_size "
                                            f"{qc['weight_block_size']}) is not supported (supported: {SUPPORTED})")
        else:
            raise UnsupportedModelError(f"{where}quantization method {method or 'unnamed'!r} is not supported "
                                        f"(supported: {SUPPORTED}): use such a checkpoint, or the unquantized "
                                        "model with --quantization int4 / int8 / fp8")
        self.method = method
        self.group = int(qc.get("group_size", qc.get("q_group_size", 128)) or -1)
        self.v2 = str(qc.get("checkpoint_format", "gptq")).lower() == "gptq_v2"

    @property
    def name(self) -> str:
        """The format's name as `hearth plan` gives it (plan/memory.py: one name per storage format, so a 4-bit
        GPTQ checkpoint is int4-awq-g128 too)."""
        if self.method == "fp8":
            return "fp8"
        g = f"-g{self.group}" if self.group > 0 else "-per-channel"
        return f"int4-awq{g}" if self.bits == 4 else f"int8-gptq{g}"

    def owns(self, name: str) -> bool:
        """Whether `name` (an HF weight name) is stored quantized here."""
        base = name.removesuffix(".weight")
        if self.method == "fp8":
            return name.endswith(".weight") and base + ".weight_scale" in self.st.where
        return name.endswith(".weight") and base + ".qweight" in self.st.where

    def get(self, name: str, device: torch.device, dtype: torch.dtype, quantized: bool) -> object | None:
        """The weight `name` [N, K] for the model builder: a kernel, a GroupQuant or a dense tensor on `device`
        (see the module docstring); None when `name` is not stored quantized. quantized: keep it quantized where
        a kernel takes it exactly (else it is dequantized to `dtype`)."""
        if not self.owns(name):
            return None
        base = name.removesuffix(".weight")
        if self.method == "fp8":
            return self._fp8(base, device, dtype, quantized)
        q, z, s, g_idx = self.codes(base)
        k = q.shape[1]
        group = self.group if self.group > 0 else k
        perm = None
        if g_idx is not None and not bool((g_idx == torch.arange(k) // group).all()):
            # act order: inputs sorted by group make groups of consecutive inputs (each must have `group` inputs)
            perm = torch.argsort(g_idx, stable=True)
            if not bool((torch.bincount(g_idx, minlength=z.shape[1]) == group).all()):
                quantized = False
        if not (quantized and self.bits == 4 and device.type in ("cpu", "cuda")):
            return dequantize(q, z, s, group, g_idx).to(device=device, dtype=dtype)
        qp = q if perm is None else q[:, perm]
        if device.type == "cuda":
            w = _gpu_weight(qp, z, s, group, device, dtype)
        else:
            w = _cpu_weight(qp, z, s, group, dtype)
        return w if perm is None else InputPermuted.of(w, perm.to(device))

    def codes(self, base: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """AWQ/GPTQ tensors of one weight -> (codes [N, K], zeros [N, G], scales [N, G] float32, g_idx [K] or None),
        codes and zeros as int32 values of the file's convention (GPTQ v1's zero - 1 undone)."""
        get = self.st.get
        qweight, qzeros, scales = get(base + ".qweight"), get(base + ".qzeros"), get(base + ".scales")
        if qzeros is None or scales is None:
            raise UnsupportedModelError(f"{base}: qweight without qzeros / scales; the checkpoint is incomplete "
                                        "or symmetric without zeros (not supported): download it again")
        bits, mask = self.bits, (1 << self.bits) - 1
        if self.method == "awq":
            q = _unpack(qweight, 4)[..., _AWQ_REVERSE].reshape(qweight.shape[0], -1).t()
            z = _unpack(qzeros, 4)[..., _AWQ_REVERSE].reshape(qzeros.shape[0], -1).t()
            g_idx = None
        else:
            w = _unpack(qweight, bits)  # [K * bits / 32, N, 32 / bits]: input 32 / bits * r + i
            q = w.permute(0, 2, 1).reshape(-1, w.shape[1]).t()
            z = _unpack(qzeros, bits).reshape(qzeros.shape[0], -1).t()
            if not self.v2:
                z = (z + 1) & mask
            g_idx = get(base + ".g_idx")
            g_idx = None if g_idx is None else g_idx.to(torch.int64)
        n = scales.shape[1]
        return q[:n].contiguous(), z[:n].contiguous(), scales.t().float().contiguous(), g_idx

    def _fp8(self, base: str, device: torch.device, dtype: torch.dtype, quantized: bool = True):
        """FP8 weight [N, K] e4m3 and its weight_scale -> Fp8Weight on CUDA (SM 8.9+), else dequantized to dtype."""
        w8 = self.st.get(base + ".weight")
        scale = _fp8_scale(self.st.get(base + ".weight_scale"), w8.shape[0])
        if w8.dtype != torch.float8_e4m3fn:
            raise UnsupportedModelError(f"{base}.weight is {w8.dtype}, not float8_e4m3fn (supported: {SUPPORTED})")
        if quantized and device.type == "cuda":
            from ..layers.gpu_quant import Fp8Weight, fp8_supported

            if fp8_supported(device) is None:
                return Fp8Weight(w8.to(device).contiguous(), scale.to(device), dtype)
        return (w8.float() * scale[:, None]).to(device=device, dtype=dtype)


class InputPermuted(WeightKernel):
    """y = x[:, perm] @ W'^T: a GPTQ act-order weight whose input features were sorted by group at load (W' =
    W[:, perm], groups of consecutive inputs for the kernels), x gathered to that order on each call (as
    vLLM's GPTQ kernels do). The producer of x never pre-quantizes it for this kernel (a8_bits None)."""

    def __init__(self, inner: WeightKernel, perm: torch.Tensor):
        self.inner, self.perm = inner, perm  # perm: [K] int64 on the weight's device

    @staticmethod
    def of(weight: object, perm: torch.Tensor) -> InputPermuted:
        """The kernel for `weight` (a GroupQuant, tensor or kernel) behind the gather; Linear.fused keeps such
        kernels as separate parts (PartsKernel)."""
        from ..layers.linear import make_kernel

        return InputPermuted(make_kernel(weight), perm)

    def forward(self, x: torch.Tensor, xa: object = None, bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.inner.forward(x.index_select(-1, self.perm), None, bias)

    def forward_native(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.inner.forward_native(x.index_select(-1, self.perm), bias)

    def mm(self, x: torch.Tensor, xa: object = None) -> torch.Tensor:
        return self.inner.mm(x.index_select(1, self.perm))

    def set_invariant(self, on: bool) -> None:
        self.inner.set_invariant(on)

    def tensors(self) -> list[torch.Tensor]:
        return self.inner.tensors() + [self.perm]


def _ct_fp8(qc: dict) -> bool:
    """Whether a compressed-tensors config quantizes weights to 8-bit floats (its simple FP8 form)."""
    for group in (qc.get("config_groups") or {}).values():
        w = (group or {}).get("weights") or {}
        if w.get("num_bits") == 8 and w.get("type") == "float" and w.get("strategy") in ("tensor", "channel"):
            return True
    return False


def dequantize(q: torch.Tensor, z: torch.Tensor, s: torch.Tensor, group: int,
               g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """w = (q - z) * s, float32 [N, K] (exact: integer differences times the file's float16 scales)."""
    n, k = q.shape
    gi = torch.arange(k) // group if g_idx is None else g_idx
    return (q - z[:, gi]).float() * s[:, gi]


def _gpu_weight(q, z, s, group, device, dtype):
    """A QuantWeight: 4-bit codes, scale and min = -z * s per group of the file, float16 only where exact."""
    from ..kernels.quant_matmul import pack_codes
    from ..layers.gpu_quant import QuantWeight

    if group % 32 or q.shape[1] % group:
        return dequantize(q, z, s, group).to(device=device, dtype=dtype)
    if group & (group - 1):  # the kernels' groups are powers of two: the file's group as runs of 32
        z, s, group = z.repeat_interleave(group // 32, 1), s.repeat_interleave(group // 32, 1), 32
    mins = -z.float() * s
    exact16 = bool((s.half().float() == s).all() and (mins.half().float() == mins).all())
    sdt = torch.float16 if exact16 else torch.float32
    codes = pack_codes(q.to(device=device, dtype=torch.uint8), 4)
    scale, mins = s.to(device=device, dtype=sdt).contiguous(), mins.to(device=device, dtype=sdt).contiguous()
    return QuantWeight(codes, scale, mins, 4, group, dtype)


def _cpu_weight(q, z, s, group, dtype):
    """A GroupQuant in the native kernel's groups of 32: 4-bit codes where min = -z * s is exact in fp16, else
    8-bit codes q - z (lossless); dequantized (a tensor) where K does not split into 32s."""
    from ..quant.group_quant import GroupQuant

    n, k = q.shape
    if k % group or group % 32:
        return dequantize(q, z, s, group).to(dtype)
    reps = group // 32
    s32 = s.repeat_interleave(reps, 1)
    z32 = z.repeat_interleave(reps, 1)
    mins = -z32.float() * s32
    if bool((mins.half().float() == mins).all()):
        return GroupQuant(q.to(torch.uint8), s32, mins, 32, 4, dtype)
    return GroupQuant((q - z.repeat_interleave(group, 1)).to(torch.int8), s32, torch.zeros_like(s32), 32, 8, dtype)


def _fp8_scale(scale: torch.Tensor, n: int) -> torch.Tensor:
    s = scale.float().reshape(-1)
    if s.numel() not in (1, n):
        raise UnsupportedModelError(f"an FP8 weight_scale of {tuple(scale.shape)} for {n} outputs is neither "
                                    f"per-tensor nor per-channel (supported: {SUPPORTED})")
    return s.expand(n).contiguous()


def quantized_checkpoint(model_dir: Path, st) -> QuantizedCheckpoint | None:
    """The checkpoint's quantization (None for a float checkpoint); UnsupportedModelError names what is
    supported when its method or bit width is not."""
    qc = read_quantization_config(model_dir)
    return None if qc is None else QuantizedCheckpoint(qc, st, where=f"{model_dir.name}: ")


def keep_quantized_checkpoint(weights: str | None, dtype: str | torch.dtype, device: torch.device) -> bool:
    """Whether AWQ/GPTQ weights stay quantized: weights 'quantized' yes, 'dequantize' no; auto: on CUDA, and on
    CPU unless dtype is an explicit float32 (the HF-exact path), as for GGUF files."""
    weights = weights or "auto"
    if weights != "auto":
        return weights == "quantized"
    return device.type == "cuda" or dtype not in ("float32", "fp32", torch.float32)
