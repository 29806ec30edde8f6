"""K-quant quantizers round-trip through gguf's dequantizer; the per-tensor type mix; perplexity windows."""
from __future__ import annotations

import numpy as np
import pytest

from hearthlm.quant import TARGETS, plan_windows, quantize_k, tensor_type

# relative RMS error on Gaussian weights (measured 0.0717, 0.0362, 0.0178; gguf's Q4_1 / Q5_1 give 0.078 / 0.038)
MAX_REL_RMSE = {"Q4_K": 0.075, "Q5_K": 0.038, "Q6_K": 0.019}
SAME_BITS_LEGACY = {"Q4_K": "Q4_1", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def _rel_rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(((a - b) ** 2).mean() / (b ** 2).mean()))


@pytest.mark.parametrize("name", ["Q4_K", "Q5_K", "Q6_K"])
def test_k_quant_round_trips_through_gguf_dequantize(name):
    import gguf

    qtype = gguf.GGMLQuantizationType[name]
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((64, 512)) * 0.02).astype(np.float32)
    x[0, :256] = 0.0  # all-zero super-block
    x[1, :256] = 0.5  # constant positive
    x[2, :256] = -0.25  # constant negative
    x[3, 7] = 1.5  # one outlier
    q = quantize_k(x, name)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    assert q.dtype == np.uint8 and q.shape == (64, 512 // block * size)
    y = gguf.quants.dequantize(q, qtype).reshape(x.shape)
    assert np.all(np.isfinite(y))
    np.testing.assert_array_equal(y[0, :256], 0.0)
    np.testing.assert_allclose(y[1:3, :256], x[1:3, :256], atol=2e-3)
    assert abs(y[3, 7] - 1.5) < 0.02
    err = _rel_rmse(y[4:], x[4:])
    assert err < MAX_REL_RMSE[name], err
    legacy = gguf.GGMLQuantizationType[SAME_BITS_LEGACY[name]]
    legacy_err = _rel_rmse(gguf.quants.dequantize(gguf.quants.quantize(x[4:], legacy), legacy), x[4:])
    if name != "Q6_K":  # same bits per weight as the legacy type, smaller error
        assert err < legacy_err


def test_k_quant_rejects_rows_that_do_not_split_into_super_blocks():
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_k(np.zeros((2, 128), np.float32), "Q4_K")


def test_q4_k_m_mix_follows_llama_cpp():
    t = TARGETS["q4_k_m"]
    n = 32  # use_more_bits: layers 0-3, 28-31 and every third in between (6, 9, ...)
    more = [i for i in range(n) if tensor_type(f"blk.{i}.ffn_down.weight", (4096, 11008), t, n, False) == "Q6_K"]
    assert more == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    assert tensor_type("blk.0.attn_v.weight", (1024, 4096), t, n, False) == "Q6_K"
    assert tensor_type("blk.6.ffn_down.weight", (4096, 11040), t, n, False) == "Q8_0"  # Q6_K needs 256 | cols
    assert tensor_type("blk.7.ffn_down.weight", (4096, 11008), t, n, False) == "Q4_K"
    assert tensor_type("blk.5.attn_v.weight", (1024, 4096), t, n, False) == "Q4_K"
    assert tensor_type("blk.5.attn_q.weight", (4096, 4096), t, n, False) == "Q4_K"
    assert tensor_type("output.weight", (32000, 4096), t, n, False) == "Q6_K"
    assert tensor_type("token_embd.weight", (32000, 4096), t, n, False) == "Q4_K"
    assert tensor_type("token_embd.weight", (32000, 4096), t, n, True) == "Q6_K"  # tied: it is the output
    assert tensor_type("blk.0.attn_norm.weight", (4096,), t, n, False) == "F32"
    assert tensor_type("blk.0.attn_q.weight", (576, 576), t, n, False) == "Q5_0"  # llama.cpp's fallback
    assert tensor_type("blk.0.attn_q.weight", (64, 48), t, n, False) == "F16"
    assert tensor_type("output.weight", (32000, 4096), TARGETS["q8_0"], n, False) == "Q8_0"
    assert tensor_type("output.weight", (32000, 4096), TARGETS["q4_0"], n, False) == "Q6_K"


def test_plan_windows_scores_every_token_once():
    for n, ctx, stride in [(1000, 128, 64), (1000, 128, 100), (100, 128, 64), (129, 128, 64), (2, 16, 8)]:
        wins = plan_windows(n, ctx, stride)
        scored = [t for _, e, first in wins for t in range(first, e)]
        assert scored == list(range(1, n)), (n, ctx, stride)
        assert all(e - b <= ctx for b, e, _ in wins)
    disjoint = plan_windows(1000, 100, 100)  # stride = ctx: a window's first token has no context to score it
    assert [t for _, e, first in disjoint for t in range(first, e)] == [t for t in range(1, 1000) if t % 100]
    assert plan_windows(1000, 128, 64)[1] == (64, 192, 128)  # later windows score their second half
    assert plan_windows(1000, 100, 100, llama_compat=True)[2] == (200, 300, 251)
