"""A mixture-of-experts MLP: a top-k router and stacked experts (Qwen3-MoE, Mixtral).

Rules (as HF transformers computes them):
- routing: the router's logits in x's dtype, a float32 softmax over the experts, the top k (ties: the lower expert
  id), renormalized to sum to 1 where the config says (Mixtral always, Qwen3-MoE with norm_topk_prob); Qwen3-MoE
  rounds the weights to x's dtype (`round_weights`), Mixtral keeps them float32;
- expert e computes down_e(SiLU(gate_e(x)) * up_e(x)), weighted by the token's routing weight for e.
Weights: w13 [E, 2I, H] (gate rows, then up rows), w2 [E, H, I], router [E, H].
Batch invariance (a token's sum never depends on the other tokens): on CPU a token's experts are added in
increasing expert id (index_add_ per expert, as HF; an expert's rows in HF's order: by rank, then token); on CUDA
kernels/fused_moe.py sums them in rank order with its own fixed per-row arithmetic. Quantized CPU experts run the
native kernel (one kernel for every row count); dense float CPU experts and the router take torch's GEMM, whose
rounding may follow the row count, as the dense torch layers' does.
--cpu-moe: experts on the CPU while x is on the GPU: routing on x's device, the experts on the CPU (one hop each way).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ModelLoadError
from ..quant.group_quant import GroupQuant
from .activation import gated_act
from .linear import Linear

# checkpoint layouts of one MoE block: (prefix under the block, router, per-expert gate/up/down names)
_PER_EXPERT = (("mlp.", "gate.weight", ("gate_proj", "up_proj", "down_proj")),  # Qwen3-MoE, transformers 5 Mixtral
               ("block_sparse_moe.", "gate.weight", ("w1", "w3", "w2")))  # Mixtral on the Hub


def _dense(w: object, dtype: torch.dtype) -> torch.Tensor:
    """A weight as a plain tensor: quantized containers (GroupQuant, ...) dequantized.
    TODO(issue 19): quantized experts on CUDA through fused_moe_quant instead of this dense copy."""
    if w is None or isinstance(w, torch.Tensor):
        return w
    return w.dequantize(dtype)


class MoE:
    """The router and the experts of one block, stacked [E, ...]; __call__(x [T, H]) -> [T, H].
    Experts kept quantized on the CPU (GGUF blocks, --quantization: GroupQuant) are per-expert Linear layers
    instead (`linears`: gate_up, down each; the native CPU kernel, one kernel for every row count); w13/w2 None."""

    def __init__(self, router: torch.Tensor, w13: torch.Tensor | None, w2: torch.Tensor | None, top_k: int,
                 norm_topk_prob: bool, act: str = "silu", round_weights: bool = False,
                 linears: list[tuple[Linear, Linear]] | None = None):
        self.router, self.w13, self.w2, self.linears = router, w13, w2, linears
        self.top_k, self.norm_topk_prob, self.act, self.round_weights = top_k, norm_topk_prob, act, round_weights
        self.num_experts = w13.shape[0] if w13 is not None else len(linears)
        self.device = w13.device if w13 is not None else torch.device("cpu")  # where the experts run
        self.fused = None  # CUDA: kernels/fused_moe.fused_moe (imported where the experts are on a GPU)
        if w13 is not None and w13.is_cuda and act == "silu":
            from ..kernels.fused_moe import fused_moe

            self.fused = fused_moe

    @classmethod
    def load(cls, get, p: str, num_experts: int, top_k: int, norm_topk_prob: bool, act: str = "silu",
             round_weights: bool = False) -> MoE | None:
        """The block at name prefix p (`model.layers.{i}.`) from any of its layouts: fused 3-D
        `mlp.experts.gate_up_proj` / `mlp.experts.down_proj` (transformers 5 in memory), per-expert
        `mlp.experts.{e}.{gate,up,down}_proj.weight` (Qwen3-MoE, transformers 5's save_pretrained, GGUF through the
        loader's name map) or `block_sparse_moe.experts.{e}.w{1,3,2}.weight` (Mixtral on the Hub). None: the
        block has no router (a dense block)."""
        for base, router_name, names in _PER_EXPERT:
            router = get(p + base + router_name)
            if router is None:
                continue
            router = _dense(router, torch.float32 if not isinstance(router, torch.Tensor) else router.dtype)
            dtype = router.dtype
            w13 = get(p + base + "experts.gate_up_proj")
            if w13 is not None:  # fused 3-D tensors
                w2 = get(p + base + "experts.down_proj")
                if w2 is None:
                    raise ModelLoadError(f"weight {p + base}experts.down_proj is missing beside gate_up_proj: the "
                                         "checkpoint is incomplete; re-download the model")
                return cls(router, w13, w2, top_k, norm_topk_prob, act, round_weights)
            ex = []
            for e in range(num_experts):
                ws = [get(f"{p}{base}experts.{e}.{n}.weight") for n in names]
                if any(w is None for w in ws):
                    raise ModelLoadError(f"expert {e} of {p + base} is missing from the checkpoint (expected "
                                         f"{num_experts} experts): the file is incomplete; re-download the model")
                ex.append(ws)
            # any expert matrix kept quantized on the CPU: per-expert Linears (a Q4_K_M file's Q6_K down experts
            # come dense, each behind its own kernel), never a float copy of the whole block
            if any(isinstance(w, GroupQuant) and w.device.type == "cpu" for ws in ex for w in ws):
                linears = [(Linear.fused([g, u]), Linear(d)) for g, u, d in ex]
                return cls(router, None, None, top_k, norm_topk_prob, act, round_weights, linears)
            ex = [[_dense(w, dtype) for w in ws] for ws in ex]
            w13 = torch.stack([torch.cat([g, u]) for g, u, _ in ex])  # [E, 2I, H]: gate rows, then up rows
            w2 = torch.stack([d for _, _, d in ex])  # [E, H, I]
            return cls(router, w13, w2, top_k, norm_topk_prob, act, round_weights)
        return None

    def tensors(self) -> list[torch.Tensor]:
        if self.linears is not None:
            return [self.router] + [t for pair in self.linears for lin in pair for t in lin.tensors()]
        return [self.router, self.w13, self.w2]

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, H] -> (weights [T, k] float32, expert ids [T, k] int64), the module's routing rules."""
        probs = torch.softmax(F.linear(x, self.router).float(), dim=-1)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.round_weights:
            weights = weights.to(x.dtype).float()
        return weights, ids

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, H] -> [T, H] in x's dtype
        weights, ids = self.route(x)
        if self.fused is not None and x.is_cuda:
            return self.fused(x, self.w13, self.w2, weights, ids.to(torch.int32))
        if x.device != self.device:  # --cpu-moe: experts on the CPU, the block on the GPU
            return self.experts(x.to(self.device), weights.cpu(), ids.cpu()).to(x.device)
        return self.experts(x, weights, ids)

    def experts(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The torch path: per active expert (increasing id), its tokens' matmuls, added into each token's row."""
        w = weights.to(x.dtype) if self.round_weights else weights
        out = torch.zeros_like(x)
        for e in torch.unique(ids).tolist():
            rank, tok = torch.where(ids.t() == e)  # HF's row order: by rank, then token
            if self.linears is not None:
                gate_up, down = self.linears[e]
                y = down(gated_act(gate_up(x[tok]), self.act)).to(x.dtype)
            else:
                y = F.linear(gated_act(F.linear(x[tok], self.w13[e]), self.act), self.w2[e])
            out.index_add_(0, tok, (y * w[tok, rank, None]).to(out.dtype))
        return out
