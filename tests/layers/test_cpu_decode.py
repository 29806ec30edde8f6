"""CPU decode path: its shortcuts (fused RMSNorm call, one RoPE over q and k, bf16 results added to the float32
stream, the vectorized greedy argmax) give the same bits as the plain formulas (attention: test_attention.py); the
dense bf16 GEMM that multi-row int4 calls take stays within bf16 rounding of dequantize-then-matmul (batch
invariance of the default path: tests/test_batch_invariance.py)."""
from __future__ import annotations


import pytest
import torch

from hearthlm.layers import quant_linear
from hearthlm.layers.norm import rms_norm
from hearthlm.layers.quant_linear import Int4Weight, unpack_gguf
from hearthlm.layers.rotary import Rotary, apply_rotary
from hearthlm.runtime.sampler import greedy_tokens

from .test_quant_linear import close, dequant_ref, random_blocks


def test_rms_norm_is_the_hf_formula_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    for shape in [(1, 576), (16, 576), (300, 960), (5, 9, 64), (37, 4096)]:
        for scale in (1e-3, 1.0, 1e3):
            x = torch.randn(*shape, generator=g) * scale
            w = torch.randn(shape[-1], generator=g)
            h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
            assert torch.equal(rms_norm(x, w, 1e-5), w * h)
    xb, wb = torch.randn(4, 64).bfloat16(), torch.randn(64).bfloat16()  # other dtypes keep the formula
    h = xb.float() * torch.rsqrt(xb.float().pow(2).mean(-1, keepdim=True) + 1e-6)
    assert torch.equal(rms_norm(xb, wb, 1e-6), wb * h.bfloat16())


@pytest.mark.parametrize("scaling", [None, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64}])
def test_rope_over_q_and_k_together_is_hf_rotate_half_bit_for_bit(scaling):
    heads, kv_heads, d = 9, 3, 64
    rot = Rotary(d, 10000.0, scaling, torch.device("cpu"))
    pos = torch.tensor([0, 5, 17, 300, 1023])
    cos, sin = rot.cos_sin(pos, torch.float32)
    freqs = pos.float()[:, None] * rot.inv_freq[None, :]
    emb = torch.cat((freqs, freqs), -1)
    hf_cos, hf_sin = emb.cos()[:, None], emb.sin()[:, None]

    def hf(x):  # transformers' apply_rotary_pos_emb
        return x * hf_cos + torch.cat((-x[..., d // 2:], x[..., :d // 2]), -1) * hf_sin

    qkv = torch.randn(len(pos), (heads + 2 * kv_heads) * d)  # q and k: a strided view of the fused projection
    qk = qkv[:, :(heads + kv_heads) * d].view(len(pos), -1, d)
    out = apply_rotary(qk, cos, sin)
    assert torch.equal(out[:, :heads], hf(qk[:, :heads])) and torch.equal(out[:, heads:], hf(qk[:, heads:]))
    qb = qk.bfloat16()  # a bf16 projection (CPU int4 weights) is upcast exactly by the float32 products
    assert out.dtype == torch.float32 and torch.equal(apply_rotary(qb, cos, sin), hf(qb.float()))


@pytest.mark.parametrize("type_name,k", [("Q4_1", 576), ("Q4_K", 768), ("Q8_0", 576), ("Q5_0", 160)])
def test_dense_copy_for_many_rows_is_within_bf16_of_dequantized(type_name, k):
    n = 64
    raw = random_blocks(type_name, n, k, seed=7)
    gq = unpack_gguf(raw, type_name, (n, k))
    w = dequant_ref(raw, type_name, (n, k))
    both, int4 = Int4Weight(gq, dense=True), Int4Weight(gq, dense=False)
    if both.dense is None:
        pytest.skip("no oneDNN bf16 on this CPU")
    assert both.dense_min_rows == (quant_linear.DENSE_MIN_ROWS_SPLIT if gq.bits > 4 else quant_linear.DENSE_MIN_ROWS)
    g = torch.Generator().manual_seed(1)
    for rows in (1, both.dense_min_rows - 1, both.dense_min_rows, 16, 64):
        x = torch.randn(rows, k, generator=g)
        y = both(x)
        close(y, x @ w.T)
        if rows < both.dense_min_rows:  # below the threshold: the int4 kernel, bit for bit
            assert torch.equal(y, int4(x))
        else:  # the bf16 GEMM on bf16(dequantized) weights, agreeing with the int4 kernel to bf16 rounding
            close(y, torch.nn.functional.linear(x.bfloat16(), w.bfloat16()).float(), rel=2e-3)
            close(y, int4(x))
        assert both(x, cast=False).dtype == torch.bfloat16 and torch.equal(both(x, cast=False).float(), y)



def test_greedy_tokens_equal_argmax():
    g = torch.Generator().manual_seed(0)
    for vocab in (49152, 32000, 151936, 50257, 97):
        for rows in (1, 3, 16):
            for trial in range(12):
                x = torch.randn(rows, vocab, generator=g)
                if trial % 3 == 0:
                    x = x.round()  # ties: the first index wins
                if trial % 4 == 1:
                    x[0, torch.randint(0, vocab, (3,), generator=g)] = float("nan")
                if trial % 4 == 2:
                    x[:] = float("-inf")
                if trial % 4 == 3:
                    x[:, -1] = x[:, 5] = 1e9
                assert torch.equal(greedy_tokens(x), x.argmax(-1)), (vocab, rows, trial)
    x = torch.randn(4, 256)[:, ::2]  # not contiguous: plain argmax
    assert torch.equal(greedy_tokens(x), x.argmax(-1))
