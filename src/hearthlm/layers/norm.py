"""RMSNorm in the two flavours HF uses (Llama: w * x_norm.to(dtype); Gemma: (1 + w) * x_norm in fp32)."""
from __future__ import annotations

import torch

# Row sums of squares by ATen's reduction, as an op torch.compile keeps opaque (models/cpu_compile.py): inductor's
# own reduction adds in another order, and a last-bit difference in a norm flips bf16 roundings downstream, so greedy
# tokens would drift from the eager path's. The rest of the formula fuses, in torch.rms_norm's order, bit for bit.
_lib = torch.library.Library("hearthlm", "FRAGMENT")
_lib.define("sum_squares(Tensor x) -> Tensor")
_lib.impl("sum_squares", lambda x: x.pow(2).sum(-1, keepdim=True), "CompositeExplicitAutograd")
torch.library.register_fake("hearthlm::sum_squares", lambda x: x.new_empty(*x.shape[:-1], 1), lib=_lib)


def _mean_square(h: torch.Tensor) -> torch.Tensor:
    # h: [..., hidden] float32 -> [..., 1]; ATen's mean is its sum, then a division
    if torch.compiler.is_compiling():
        return torch.ops.hearthlm.sum_squares(h) / h.shape[-1]
    return h.pow(2).mean(-1, keepdim=True)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool = False) -> torch.Tensor:
    # x: [..., hidden]
    if not gemma and x.dtype == torch.float32 and weight.dtype == torch.float32:
        # F.rms_norm's op (one call instead of six): the same ops in the same order, bit for bit
        # (tests/layers/test_cpu_decode.py); compiled, its formula around ATen's sums
        if torch.compiler.is_compiling():
            return x * torch.rsqrt(_mean_square(x) + eps) * weight
        return torch.rms_norm(x, weight.shape, weight, eps)
    h = x.float()
    h = h * torch.rsqrt(_mean_square(h) + eps)
    if gemma:
        return (h * (1.0 + weight.float())).to(x.dtype)
    return weight * h.to(x.dtype)
