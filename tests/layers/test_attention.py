"""The CPU reference attention (layers/attention.py, on the torch backend's metadata) against a plain
per-sequence float64 attention over each sequence's keys in order: ragged contexts, shuffled block tables, GQA, sliding windows, softcap, quantized pools,
decode / prefill / mixed steps; and the decode path's two value reads (in place, gathered) against each other."""
from __future__ import annotations

import pytest
import torch

from hearthlm.kernels.kv_quant import dequantize_kv, e4m3_to_float, quantize_pool
from hearthlm.layers import attention
from hearthlm.layers.attention import paged_attention_ref, uses_bags
from hearthlm.runtime.backends import TorchBackend
from hearthlm.runtime.step_inputs import step_inputs

CASES = {  # (context before the step, new tokens) per sequence
    "decode": ([40, 7, 70, 0, 23, 16], [1] * 6),
    "single": ([33], [1]),
    "mixed": ([40, 0, 70, 12], [1, 9, 1, 5]),
    "prefill": ([0, 30], [17, 4]),
}


def _plain(q, k_pool, v_pool, tables, starts, q_lens, block_size, window, scale, softcap):
    """Each sequence alone, in float64, from its block table: [num_tokens, heads, head_dim]."""
    def dense(pool):
        return (dequantize_kv(pool.codes, pool.scales) if not isinstance(pool, torch.Tensor) else pool).double()

    k_all, v_all = dense(k_pool).flatten(0, 1), dense(v_pool).flatten(0, 1)  # [slots, kv_heads, head_dim]
    groups = q.shape[1] // k_all.shape[1]
    out, t = torch.empty_like(q, dtype=torch.float64), 0
    for table, start, n in zip(tables, starts, q_lens):
        pos = torch.arange(start + n)
        slots = torch.tensor(table)[pos // block_size] * block_size + pos % block_size
        k = k_all[slots].repeat_interleave(groups, 1).transpose(0, 1)  # [heads, L, head_dim]
        v = v_all[slots].repeat_interleave(groups, 1).transpose(0, 1)
        qs = q[t:t + n].double().transpose(0, 1)  # [heads, n, head_dim]
        scores = qs @ k.transpose(1, 2) * scale
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        q_pos = (start + torch.arange(n))[:, None]
        allowed = pos[None, :] <= q_pos
        if window is not None:
            allowed &= pos[None, :] > q_pos - window
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[t:t + n] = (torch.softmax(scores, -1) @ v).transpose(0, 1)
        t += n
    return out


def _step(runner, case, seed, heads, kv_heads, head_dim, kv, bags=None):
    """Metadata of one step with scattered blocks (never the null block 0), random pools and queries; its plans
    are built for these heads and pools (bags: read values in place, default: when the pools allow it)."""
    bs = runner.block_size
    g = torch.Generator().manual_seed(seed)
    starts, q_lens = CASES[case]
    blocks = torch.randperm(60, generator=g)[:50].add(1).tolist()
    tables, used = [], 0
    for s, n in zip(starts, q_lens):
        need = -(-(s + n) // bs)
        tables.append(blocks[used:used + need])
        used += need
    shape = (64, bs, kv_heads, head_dim)
    k_pool, v_pool = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    if kv != "auto":
        k_pool, v_pool = quantize_pool(k_pool, kv), quantize_pool(v_pool, kv)
    backend = TorchBackend(torch.device("cpu"), runner.windows, runner.layer_group, heads, kv_heads, torch.float32,
                           runner.model.rotary, uses_bags(torch.float32, v_pool) if bags is None else bags)
    step = step_inputs(runner.tables, [[5] * n for n in q_lens], starts,
                       [[t] * len(runner.windows) for t in tables])
    meta = backend.build(step)
    q = torch.randn(sum(q_lens), heads, head_dim, generator=g) * 2
    return meta, tables, k_pool, v_pool, q


@pytest.mark.parametrize("family", ["llama", "mistral"])  # mistral: sliding window 24
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kv", ["auto", "int8", "fp8"])
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (9, 3), (4, 4)])  # SmolLM2-135M: 9 / 3
def test_reference_attention_matches_plain_attention(engine_for, family, case, kv, heads, kv_heads):
    runner = engine_for(family, max_model_len=256, max_num_seqs=8).engine.runner
    meta, tables, k_pool, v_pool, q = _step(runner, case, 3, heads, kv_heads, 64, kv)
    starts, q_lens = CASES[case]
    for gm in meta.groups:
        for softcap in (None, 5.0):
            want = _plain(q, k_pool, v_pool, tables, starts, q_lens, runner.block_size, gm.window, 0.125, softcap)
            # the per-step plans are built with the metadata, and every layer reads them as they are
            assert all(sb.plan is not None for sb in gm.sub_batches)
            got = paged_attention_ref(q, k_pool, v_pool, gm.sub_batches, 0.125, softcap)
            torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=2e-6)
            assert torch.equal(paged_attention_ref(q, k_pool, v_pool, gm.sub_batches, 0.125, softcap), got)


def test_decode_reads_values_in_place_or_gathered_alike(engine_for):
    """Float32 pools: embedding_bag over the pool's value rows; the gathered batched matmul gives the same."""
    runner = engine_for("llama", max_model_len=256, max_num_seqs=8).engine.runner
    meta, _, k_pool, v_pool, q = _step(runner, "decode", 5, 9, 3, 64, "auto")
    gm = meta.groups[0]
    assert gm.sub_batches[0].plan.bag_rows is not None
    bags = paged_attention_ref(q, k_pool, v_pool, gm.sub_batches, 0.125, None)
    meta, _, k_pool, v_pool, q = _step(runner, "decode", 5, 9, 3, 64, "auto", bags=False)
    gm = meta.groups[0]
    assert gm.sub_batches[0].plan.bag_rows is None
    gathered = paged_attention_ref(q, k_pool, v_pool, gm.sub_batches, 0.125, None)
    torch.testing.assert_close(bags, gathered, atol=1e-6, rtol=1e-6)


def test_decode_attention_op_is_the_eager_function(engine_for):
    """The op torch.compile keeps opaque (models/cpu_compile.py) computes the eager path's bits."""
    runner = engine_for("llama", max_model_len=256, max_num_seqs=8).engine.runner
    for kv in ("auto", "int8"):
        meta, _, k_pool, v_pool, q = _step(runner, "decode", 7, 9, 3, 64, kv)
        gm = meta.groups[0]
        eager = paged_attention_ref(q, k_pool, v_pool, gm.sub_batches, 0.125, None)
        p = gm.sub_batches[0].plan
        op = attention._decode_attention_op(q, k_pool, v_pool, p.key_rows, p.mask, p.bag_rows, p.bag_offsets,
                                            0.125, None)
        assert torch.equal(op, eager)


def test_e4m3_bytes_to_float_equal_the_fp8_cast():
    """The CPU gather's fp8 decode (kv_quant.e4m3_to_float) against torch's fp8 -> float32 cast, all 254 finite codes
    (subnormals included)."""
    codes = torch.arange(256, dtype=torch.uint8).view(16, 16)
    want = codes.view(torch.float8_e4m3fn).float()
    finite = torch.isfinite(want)
    got = e4m3_to_float(codes)
    assert finite.sum() == 254 and got.dtype == torch.float32
    assert torch.equal(got[finite].view(torch.int32), want[finite].view(torch.int32))  # -0.0 too
