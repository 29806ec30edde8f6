"""The native CPU kernel (kernels/csrc/cpu_quant.c), its AVX-512 VNNI, AVX2 and portable C builds, against
float64 emulations: the quantized matmul (x quantized to int8 per group of 32, the same codes as the kernel's,
so the sums agree to float rounding), its fused input functions (RMSNorm, SiLU * mul) and accumulation, the
decode attention with RoPE and K/V writes, and the engine path built on them."""
from __future__ import annotations

import os
import shutil
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from hearthlm.kernels import cpu_quant as cq
from hearthlm.layers.quant_linear import GroupQuant, NativeWeight, quantize_int4, quantize_int8
from hearthlm.layers.rotary import Rotary, apply_rotary

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None, reason="no C compiler")
NOT_BUILT = "the native CPU kernel is not built here (it needs AVX2 or AVX-512 VNNI)"
needs_native = pytest.mark.skipif(cq.library() is None, reason=NOT_BUILT)


@pytest.fixture(scope="module", params=["native", "avx2", "portable"])
def lib(request, tmp_path_factory):
    """native: the best build for this CPU (cpu_kernel auto); avx2: the AVX2 build (also on AVX-512 CPUs)."""
    if request.param == "avx2":
        if not cq.cpu_flags().issuperset(cq.ISA_NEEDS["avx2"]):
            pytest.skip("this CPU lacks AVX2")
        if cq.library("avx2") is cq.library():
            pytest.skip("the native build is the AVX2 one here")
    if request.param != "portable":
        lib = cq.library("auto" if request.param == "native" else "avx2")
        if lib is None:
            pytest.skip(NOT_BUILT)
        return lib
    return cq.load(cq.build(cq.FLAGS + ["-DHEARTH_PORTABLE"], tmp_path_factory.mktemp("portable")))


@needs_native
def test_builds_differ_where_they_should(tmp_path):
    portable = cq.load(cq.build(cq.FLAGS + ["-DHEARTH_PORTABLE"], tmp_path))
    assert portable.hl_simd() == 0
    if torch.backends.cpu.get_cpu_capability() == "AVX512" and "avx512_vnni" in open("/proc/cpuinfo").read():
        assert cq.library().hl_simd() == 1
    if "avx2" in cq.cpu_flags():
        assert cq.library("avx2").hl_simd() in (2, 3)


def quantize_x(x: torch.Tensor, residual: bool = False):
    """The kernel's int8 quantization of x [M, K]: a scale per 16 inputs, in float32 as the kernel computes it;
    -> codes [M, G, 2, 16] (residual: 128 codes + the rounding residual in 128ths), scales [M, G, 2], float sums
    per group of 32 [M, G]."""
    m, k = x.shape
    h = x.reshape(m, k // 32, 2, 16)
    amax = h.abs().amax(-1)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros(()))
    v = h * inv[..., None]
    q = torch.round(v)
    dx = amax / 127
    if residual:
        q, dx = 128 * q + torch.round((v - q) * 128), dx / 128
    return q, dx, x.view(m, k // 32, 32).double().sum(-1)


def emulate(x: torch.Tensor, g: GroupQuant, residual: bool = False) -> torch.Tensor:
    """float64 sum of what the kernel multiplies: quantized x, codes, fp16 scale and min."""
    q, dx, xs = quantize_x(x, residual)
    codes = g.codes.double()
    mins = g.min
    if g.codes.dtype == torch.int8:
        codes, mins = codes + 128, g.min - 128 * g.scale
    n, k = g.codes.shape
    dots = torch.einsum("mghi,nghi->mngh", q.double(), codes.view(n, k // 32, 2, 16))  # [M, N, G, 2]
    s, mn = g.scale.half().double(), mins.half().double()
    return ((dots * dx.double()[:, None]).sum(-1) * s[None] + mn[None] * xs[:, None]).sum(-1)


def group_quant(kind: str, n: int, k: int, seed: int) -> GroupQuant:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.05
    if kind == "q4":
        return quantize_int4(w)
    if kind == "q8":  # signed codes (Q8_0, int8)
        return quantize_int8(w)
    g = quantize_int4(w)  # 5-bit unsigned codes (Q5_*), stored a byte each
    codes = torch.randint(0, 32, (n, k), generator=gen, dtype=torch.uint8)
    return GroupQuant(codes, g.scale / 2, g.min, 32, 5)


def native(g: GroupQuant) -> SimpleNamespace:
    """g in the kernel's layout (what NativeWeight holds), without needing the built library."""
    return SimpleNamespace(**dict(zip(("codes", "scale", "mins", "bits"), cq.pack(g.codes, g.scale, g.min, g.bits))))


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("kind", ["q4", "q5", "q8"])
@pytest.mark.parametrize("k", [32, 96, 576])
def test_qmatmul_matches_emulation(lib, kind, k, residual):
    g = group_quant(kind, 48, k, seed=k)
    w = native(g)
    for m in (1, 3, 6, 7, 16):  # passes of up to 6 rows
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 3
        if k > 32:
            x[0, :32] = 0  # an all-zero group: scale 0, no division by zero
        out = torch.empty(m, 48)
        cq.qmatmul(x, w.codes, w.scale, w.mins, w.bits, out, residual=residual, lib=lib)
        assert rel_err(out, emulate(x, g, residual)) < 1e-5, (kind, k, m)
        # and within int8 rounding of the dequantized weights' product (residual pass: within the fp16 rounding of
        # the scales and mins)
        assert rel_err(out, x.double() @ g.dequantize().double().T) < (3e-3 if residual else 3e-2)


def test_strided_rows_and_accumulate(lib):
    g = group_quant("q4", 48, 96, seed=1)
    w = native(g)
    big = torch.randn(5, 200)
    x = big[:, 10:106]  # row stride 200
    out = torch.randn(5, 64)
    before = out.clone()
    cq.qmatmul(x, w.codes, w.scale, w.mins, w.bits, out[:, 8:56], accumulate=True, lib=lib)
    assert rel_err(out[:, 8:56] - before[:, 8:56], emulate(x.contiguous(), g)) < 1e-5
    assert torch.equal(out[:, :8], before[:, :8]) and torch.equal(out[:, 56:], before[:, 56:])


def test_fused_input_functions(lib):
    k = 96
    x = torch.randn(6, 2 * k) * 4
    x[0, :k] = torch.linspace(-120, 120, k)  # SiLU far into both tails
    w, eps = torch.rand(k) + 0.5, 1e-5
    normed = cq.prepare_rows(x[:, :k].contiguous(), k, norm=(w, eps), lib=lib)
    ref = F.rms_norm(x[:, :k].double(), (k,), w.double(), eps)
    assert float((normed - ref).abs().max()) < 1e-5 * float(ref.abs().max())
    act = cq.prepare_rows(x, k, silu_mul=True, lib=lib)
    ref = F.silu(x[:, :k].double()) * x[:, k:].double()
    assert float(((act - ref).abs() / (ref.abs() + 1e-6)).max()) < 1e-5
    # the matmul quantizes what prepare_rows gives
    g = group_quant("q4", 32, k, seed=2)
    nw = native(g)
    out = torch.empty(6, 32)
    cq.qmatmul(x, nw.codes, nw.scale, nw.mins, nw.bits, out, silu_mul=True, lib=lib)
    assert rel_err(out, emulate(act, g)) < 1e-5
    cq.qmatmul(x[:, :k], nw.codes, nw.scale, nw.mins, nw.bits, out, norm=(w, eps), lib=lib)
    assert rel_err(out, emulate(normed, g)) < 1e-5


@needs_native
def test_native_weight_refuses_what_its_layout_cannot_hold():
    g = group_quant("q4", 48, 64, seed=5)
    assert NativeWeight.supports(g)
    assert not NativeWeight.supports(GroupQuant(g.codes[:40], g.scale[:40], g.min[:40], 32, 4))  # N % 16
    assert not NativeWeight.supports(GroupQuant(g.codes, g.scale * 1e-4, g.min, 32, 4))  # below fp16's range
    assert not NativeWeight.supports(GroupQuant(g.codes, g.scale * 1e7, g.min, 32, 4))  # beyond it
    half = g.scale.half().float() * 1e-4  # fp16 subnormals, as a GGUF file can hold them: exact, kept
    assert NativeWeight.supports(GroupQuant(g.codes, half.half().float(), g.min.half().float(), 32, 4))


@needs_native
def test_native_weight_takes_the_residual_pass_for_every_row_count():
    """One scheme for every row count: a row's result is the same bits alone or among 1..40 other rows."""
    g = group_quant("q8", 64, 576, seed=3)
    w = NativeWeight(g)
    assert w.dense is None and w.dense_nbytes == 0
    x = torch.randn(40, 576)
    y = w(x)
    assert rel_err(y, emulate(x, g, True)) < 1e-5
    for m in (1, 3, 4, 5, 6, 7, 17, 33):
        assert torch.equal(w(x[:m]), y[:m]), m
    assert torch.equal(w(x[7:8]), y[7:8])
    assert w(x[:3].double()).dtype == torch.float64  # cast back to x's dtype
    acc = torch.ones(40, 64)
    w.run(x, out=acc, accumulate=True)
    assert torch.allclose(acc - 1, y, atol=1e-5)


def reference_attention(qkv, cos, sin, kp, vp, slot_mapping, key_slots, mask, h, kvh, d, scale, softcap):
    b = qkv.shape[0]
    qk = apply_rotary(qkv[:, :(h + kvh) * d].view(b, -1, d), cos, sin)
    q, k = qk[:, :h], qk[:, h:]
    v = qkv[:, (h + kvh) * d:].view(b, kvh, d)
    kp.view(-1, kvh, d)[slot_mapping] = k
    vp.view(-1, kvh, d)[slot_mapping] = v
    keys = kp.view(-1, kvh, d)[key_slots].repeat_interleave(h // kvh, 2).double()  # [B, L, H, D]
    vals = vp.view(-1, kvh, d)[key_slots].repeat_interleave(h // kvh, 2).double()
    s = torch.einsum("bhd,blhd->bhl", (q * scale).double(), keys)
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    if mask is not None:
        s = s + mask[:, None].double()
    return torch.einsum("bhl,blhd->bhd", s.softmax(-1), vals).reshape(b, h * d)


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_decode_attention_matches_reference(lib, softcap):
    gen = torch.Generator().manual_seed(0)
    b, h, kvh, d, block, blocks = 5, 6, 2, 64, 16, 40
    kp, vp = torch.randn(blocks, block, kvh, d, generator=gen), torch.randn(blocks, block, kvh, d, generator=gen)
    lens = torch.tensor([1, 17, 40, 100, 33])
    length = int(lens.max())
    perm = torch.randperm(blocks * block, generator=gen)
    key_slots = torch.zeros(b, length, dtype=torch.int64)
    mask = torch.full((b, length), -float("inf"))
    used = 0
    for i, n in enumerate(lens.tolist()):
        key_slots[i, :n] = perm[used:used + n]
        mask[i, max(0, n - 32):n] = 0  # a window of 32 keys
        used += n
    slot_mapping = key_slots[torch.arange(b), lens - 1].clone()
    qkv = torch.randn(b, (h + 2 * kvh) * d, generator=gen) * 2
    cos, sin = Rotary(d, 10000.0, None, torch.device("cpu")).cos_sin(lens - 1, torch.float32)
    kp2, vp2 = kp.clone(), vp.clone()
    ref = reference_attention(qkv, cos, sin, kp2, vp2, slot_mapping, key_slots, mask, h, kvh, d, d ** -0.5, softcap)
    out = cq.decode_attention(qkv, cos, sin, kp, vp, slot_mapping, key_slots, mask, h, d ** -0.5, softcap, lib=lib)
    assert float((out - ref).abs().max()) < 1e-4
    assert torch.allclose(kp, kp2, atol=1e-6) and torch.equal(vp, vp2)  # this step's k (rotated) and v stored
    out = cq.decode_attention(qkv, cos, sin, kp, vp, slot_mapping, key_slots, None, h, d ** -0.5, softcap, lib=lib)
    ref = reference_attention(qkv, cos, sin, kp2, vp2, slot_mapping, key_slots, None, h, kvh, d, d ** -0.5, softcap)
    assert float((out - ref).abs().max()) < 1e-4


def test_row_attention_is_the_same_bits_for_prefill_rows_decode_rows_and_any_batch(lib):
    """A prompt's rows attended in one call (prefill), in chunks, or one by one (decode), alone or next to another
    sequence: the same output bits and the same K/V in the pools."""
    gen = torch.Generator().manual_seed(1)
    h, kvh, d, n = 6, 2, 64, 40
    qkv = torch.randn(n, (h + 2 * kvh) * d, generator=gen)
    other = torch.randn(n, (h + 2 * kvh) * d, generator=gen)
    cos, sin = Rotary(d, 10000.0, None, torch.device("cpu")).cos_sin(torch.arange(n), torch.float32)
    slots = torch.randperm(4 * n, generator=gen)[:n]  # the prompt's slots; the other sequence's: n + slots
    rope = (cos, sin)

    def run(chunks: list[int], with_other: bool) -> tuple[torch.Tensor, torch.Tensor]:
        kp, vp = torch.zeros(8 * n, 1, kvh, d), torch.zeros(8 * n, 1, kvh, d)
        outs, at = [], 0
        for c in chunks:
            rows = torch.arange(at, at + c)
            seq = [(qkv, slots)] + ([(other, slots + 4 * n)] if with_other else [])
            x = torch.cat([q[rows] for q, _ in seq])
            sm = torch.cat([s[rows] for _, s in seq])
            ks = torch.cat([s[:at + c] for _, s in seq])  # each sequence's keys, in position order
            start = torch.cat([i * (at + c) + torch.zeros(c, dtype=torch.long) for i in range(len(seq))])
            count = (rows + 1).repeat(len(seq))
            cs = [torch.cat([r[rows]] * len(seq)) for r in rope]
            att = cq.RowAttention(*cs, sm, ks, start, count, h, kvh, d, d ** -0.5, None, lib=lib)
            outs.append(att(x, kp, vp)[:c])
            at += c
        return torch.cat(outs), kp[slots]

    ref, kref = run([n], False)
    for chunks, with_other in (([n], True), ([17, 17, 6], False), ([31, 9], True), ([1] * n, False),
                               ([20] + [1] * 20, True)):
        out, k = run(chunks, with_other)
        assert torch.equal(out, ref) and torch.equal(k, kref), (chunks, with_other)


@needs_native
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_fused_layer_path_matches_the_generic_one(tiny, family, monkeypatch):
    """LlamaLayer.native_call (norms, SiLU, residual adds fused into the kernel's calls; RoPE, K/V writes and
    decode attention in C; biases and q/k norms between) against the generic path (torch norms and attention,
    the same weights through NativeWeight.__call__): the same greedy tokens up to a near-tie, logprobs within float
    rounding (as the tiny random models amplify it: ~1e-3)."""
    from hearthlm import LLM, SamplingParams
    from hearthlm.models.llama import LlamaLayer

    from ..conftest import prompts_of

    def run():
        llm = LLM(model=tiny.path(family), dtype="float32", device="cpu", quantization="int8", max_model_len=128,
                  max_num_seqs=4)
        sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)
        outs = llm.generate(prompts_of(3, [5, 9, 14], seed=3), sp, use_tqdm=False)
        return llm, [o.outputs[0] for o in outs]

    llm, fused = run()
    layer = llm.engine.runner.model.layers[0]
    assert layer.native and isinstance(layer.qkv.packed, NativeWeight)
    assert (layer.qkv.bias is not None) == (family == "qwen2") and (layer.q_norm is not None) == (family == "qwen3")
    monkeypatch.setattr(LlamaLayer, "native", False)
    _, generic = run()
    for a, b in zip(fused, generic):
        k = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), len(a.token_ids))
        if k < len(a.token_ids):  # only at a near-tie of the generic run's top two
            lb = b.logprobs[k]
            assert a.token_ids[k] in lb and abs(lb[a.token_ids[k]] - lb[b.token_ids[k]]) < 1e-2, (k, lb)
        for la, lb in zip(a.logprobs[:k], b.logprobs[:k]):  # (the runner-up may swap at a near-tie)
            assert all(abs(la[t] - lb[t]) < 5e-3 for t in la.keys() & lb.keys()), (la, lb)


@needs_native
def test_row_attention_with_sinks_matches_the_reference(lib):
    """Attention sinks (gpt-oss) in the native kernel: each head's sink logit joins every row's softmax."""
    from hearthlm.kernels.paged_attention import attend_ref

    gen = torch.Generator().manual_seed(2)
    h, kvh, d, n = 6, 2, 64, 20
    qkv = torch.randn(n, (h + 2 * kvh) * d, generator=gen)
    cos, sin = Rotary(d, 10000.0, None, torch.device("cpu")).cos_sin(torch.arange(n), torch.float32)
    slots = torch.arange(n)
    sinks = torch.randn(h, generator=gen) * 2
    att = cq.RowAttention(cos, sin, slots, slots, torch.zeros(n, dtype=torch.long), slots + 1, h, kvh, d,
                          d ** -0.5, None, lib=lib)
    kp, vp = torch.zeros(n, 1, kvh, d), torch.zeros(n, 1, kvh, d)
    got = att(qkv, kp, vp, sinks).view(n, h, d)
    q = apply_rotary(qkv[:, :h * d].reshape(n, h, d), cos, sin)
    want = attend_ref(q, kp[:, 0], vp[:, 0], torch.arange(n), d ** -0.5, None, None, sinks)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    plain = att(qkv, torch.zeros_like(kp), torch.zeros_like(vp)).view(n, h, d)
    assert not torch.allclose(plain, got, atol=1e-3)
