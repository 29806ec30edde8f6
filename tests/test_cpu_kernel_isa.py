"""The native CPU kernel per ISA (issues 15, 19): EngineConfig.cpu_kernel = auto | avx512vnni | avx2 | torch, each
ISA its own build of csrc/cpu_quant.c. The AVX2 build (what CPUs without AVX-512 run; -march=x86-64-v3, so an
AVX-512 machine runs it too) gives the AVX-512 VNNI build's bits, matmuls and attention alike, so the engine on it
gives the same tokens and is batch-invariant as well (tests/test_batch_invariance.py's avx2 parameter). Against
the float64 emulations: tests/kernels/test_cpu_quant.py's avx2 parameter."""
from __future__ import annotations

import argparse
import os
import shutil

import pytest
import torch

from hearthlm.errors import InvalidRequestError
from hearthlm.kernels import cpu_quant as cq
from hearthlm.layers.quant_linear import GroupQuant
from hearthlm.layers.rotary import Rotary

from .kernels.test_cpu_quant import emulate, group_quant, rel_err

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None, reason="no C compiler")
AVX2_ONLY = frozenset({"avx", "avx2", "fma", "f16c", "sse4_2"})


def has(isa: str) -> bool:
    try:
        return cq.cpu_kernel_for(isa) == isa
    except InvalidRequestError:
        return False


needs_both = pytest.mark.skipif(not (has("avx2") and has("avx512vnni")),
                                reason="needs a CPU with AVX-512 VNNI (it runs both builds)")


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> dict:
    """The AVX-512 VNNI build, the AVX2 build (vpmaddubsw), and the AVX2 source path with 256-bit vpdpbusd (AVX-VNNI's
    instruction, here in AVX-512 VNNI + VL's encoding: the same sums)."""
    out = {"avx512vnni": cq.library("avx512vnni"), "avx2": cq.library("avx2")}
    flags = cq.isa_flags("avx2", AVX2_ONLY) + ["-mavx512vnni", "-mavx512vl"]
    out["avx2-dpbusd"] = cq.load(cq.build(flags, tmp_path_factory.mktemp("dpbusd"), isa="avx2"))
    assert all(lib is not None for lib in out.values())
    return out


@needs_both
def test_each_isa_is_its_own_build(builds, tmp_path):
    assert "-march=native" not in cq.isa_flags("avx2") and "-march=x86-64-v3" in cq.isa_flags("avx2", AVX2_ONLY)
    assert "-mavxvnni" in cq.isa_flags("avx2", AVX2_ONLY | {"avx_vnni"}) and cq.isa_flags("avx512vnni") == cq.FLAGS
    assert builds["avx512vnni"].hl_simd() == 1 and builds["avx2-dpbusd"].hl_simd() == 3
    assert builds["avx2"].hl_simd() == (3 if "avx_vnni" in cq.cpu_flags() else 2)
    assert cq.library() is builds["avx512vnni"] and cq.library("torch") is None  # auto: the best one
    # the AVX-VNNI build compiles and takes its path (its dot products are not run here: the CPU may lack AVX-VNNI)
    try:
        path = cq.build(cq.isa_flags("avx2", AVX2_ONLY | {"avx_vnni"}), tmp_path, isa="avx2")
    except Exception as e:  # a compiler without -mavxvnni (gcc < 11)
        pytest.skip(f"the compiler lacks -mavxvnni: {e}")
    assert path.name.startswith("cpu_quant-avx2-") and cq.load(path).hl_simd() == 3


def q8_extremes(n: int, k: int, seed: int) -> GroupQuant:
    """Signed 8-bit codes with -128 and 127 in them (stored 0 and 255: the widest u8 x s8 products)."""
    g = group_quant("q8", n, k, seed)
    codes = g.codes.clone()
    codes[0, :16], codes[1, :16], codes[2, ::3] = -128, 127, -128
    return GroupQuant(codes, g.scale, g.min, 32, 8)


@needs_both
@pytest.mark.parametrize("kind", ["q4", "q5", "q8"])
def test_avx2_matmul_is_the_avx512_bits(builds, kind):
    """Every input function, both passes, accumulate, 1..16 rows (passes of 2-6 rows), x at +-127 after scaling and
    all-zero groups: the same bits from the three builds, and the emulation's sums."""
    gen = torch.Generator().manual_seed(7)
    for k in (32, 96, 576):
        g = q8_extremes(64, k, k) if kind == "q8" else group_quant(kind, 64, k, seed=k)
        w = cq.pack(g.codes, g.scale, g.min, g.bits)
        norm = (torch.rand(k, generator=gen) + 0.5, 1e-5)
        for m in (1, 2, 3, 5, 7, 16):
            x = torch.randn(m, 2 * k, generator=gen) * 3
            x[0, :32] = 0
            x[-1, 3], x[-1, 20] = 1e3, -1e3  # one input dominates its half: codes +-127, the others near 0
            for pre in ("none", "norm", "silu"):
                for residual in (False, True):
                    outs = []
                    for lib in builds.values():
                        out = torch.full((m, 64), 0.25)
                        cq.qmatmul(x if pre == "silu" else x[:, :k], *w, out, accumulate=True, residual=residual,
                                   silu_mul=pre == "silu", norm=norm if pre == "norm" else None, lib=lib)
                        outs.append(out)
                    assert all(torch.equal(o, outs[0]) for o in outs[1:]), (k, m, pre, residual)
                    if pre == "none":
                        assert rel_err(outs[0] - 0.25, emulate(x[:, :k], g, residual)) < 1e-5


@needs_both
@pytest.mark.parametrize("heads", [(9, 3, 64), (8, 2, 128), (14, 2, 64), (16, 1, 48), (4, 4, 32)])
def test_avx2_attention_is_the_avx512_bits(builds, heads):
    """Prefill rows (1..70 keys: every softmax tail length), a sliding window, softcap or not; head shapes on the fast
    paths (SmolLM2's 9/3 x 64, 128-wide heads) and on the generic loops (14/2: 7 query heads a KV head; 16/1 x 48)."""
    h, kvh, d = heads
    n = 70
    gen = torch.Generator().manual_seed(h * d)
    qkv = torch.randn(n, (h + 2 * kvh) * d, generator=gen) * 2
    cos, sin = Rotary(d, 10000.0, None, torch.device("cpu")).cos_sin(torch.arange(n), torch.float32)
    slots = torch.randperm(4 * n, generator=gen)[:n]
    count = torch.minimum(torch.arange(1, n + 1), torch.tensor(40))  # a window of 40 keys
    start = torch.arange(1, n + 1) - count
    for softcap in (None, 30.0):
        outs, pools = [], []
        for lib in builds.values():
            kp, vp = torch.zeros(4 * n, 1, kvh, d), torch.zeros(4 * n, 1, kvh, d)
            outs.append(cq.RowAttention(cos, sin, slots, slots, start, count, h, kvh, d, d ** -0.5, softcap,
                                        lib=lib)(qkv, kp, vp))
            pools.append(kp)
        assert all(torch.equal(o, outs[0]) for o in outs[1:]) and all(torch.equal(p, pools[0]) for p in pools)


def test_cpu_kernel_setting(monkeypatch):
    from hearthlm.cli import flags
    from hearthlm.config import CPU_KERNELS, EngineConfig

    with pytest.raises(InvalidRequestError, match="cpu_kernel") as e:
        EngineConfig(cpu_kernel="avx9000")
    assert e.value.param == "cpu_kernel"
    assert EngineConfig(cpu_kernel="AVX512-VNNI").cpu_kernel == "avx512vnni"
    assert tuple(flags.CPU_KERNELS) == CPU_KERNELS == cq.KERNELS
    # what a CPU supports
    assert cq.cpu_kernel_for("auto", AVX2_ONLY) == "avx2" and cq.cpu_kernel_for("auto", frozenset()) == "torch"
    assert cq.cpu_kernel_for("torch", frozenset()) == "torch"
    with pytest.raises(InvalidRequestError, match="lacks avx512f, avx512bw, avx512vl, avx512_vnni") as e:
        cq.cpu_kernel_for("avx512vnni", AVX2_ONLY)
    assert e.value.param == "cpu_kernel"
    with pytest.raises(InvalidRequestError, match="lacks avx2, fma, f16c"):
        cq.cpu_kernel_for("avx2", frozenset({"sse4_2"}))
    # the flag
    p = argparse.ArgumentParser()
    flags.add_engine_args(p)
    assert flags.engine_kwargs(p.parse_args([]))["cpu_kernel"] == "auto"
    assert flags.engine_kwargs(p.parse_args(["--cpu-kernel", "AVX2"]))["cpu_kernel"] == "avx2"
    assert flags.engine_kwargs(p.parse_args(["--cpu-kernel", "avx512-vnni"]))["cpu_kernel"] == "avx512vnni"
    with pytest.raises(SystemExit):
        p.parse_args(["--cpu-kernel", "neon"])


def test_engine_on_each_cpu_kernel(tiny, monkeypatch):
    """The kernel each setting loads: the native ISAs with their own build under every layer (attention included),
    the same tokens and logprobs; torch: PyTorch's int4 kernel. A bad value, or an ISA the CPU lacks, fails at start."""
    from hearthlm import LLM, SamplingParams
    from hearthlm.layers.quant_linear import Int4Weight, NativeWeight

    from .conftest import prompts_of

    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=2)
    prompts = prompts_of(3, [5, 9, 14], seed=4)
    got, attention_libs = {}, []

    class Recorded(cq.RowAttention):
        def __init__(self, *args, lib=None, **kw):
            attention_libs.append(lib)
            super().__init__(*args, lib=lib, **kw)

    monkeypatch.setattr(cq, "RowAttention", Recorded)
    for kernel in [k for k in ("avx512vnni", "avx2") if has(k)] + ["torch"]:
        attention_libs.clear()
        llm = LLM(model=tiny.path("llama"), dtype="float32", device="cpu", quantization="int8", max_model_len=128,
                  max_num_seqs=4, cpu_kernel=kernel)
        model = llm.engine.runner.model
        outs = [o.outputs[0] for o in llm.generate(prompts, sp, use_tqdm=False)]
        got[kernel] = [(o.token_ids, o.logprobs) for o in outs]
        qkv = model.layers[0].qkv.packed
        if kernel == "torch":
            assert isinstance(qkv, Int4Weight) and not model.layers[0].native
            continue
        assert isinstance(qkv, NativeWeight) and qkv.lib is cq.library(kernel) and model.layers[0].native
        assert qkv.lib.hl_simd() in cq.ISA_SIMD[kernel] and model.layers[-1].down.packed.lib is qkv.lib
        assert attention_libs and all(lib is qkv.lib for lib in attention_libs)
    if has("avx512vnni") and has("avx2"):
        assert got["avx2"] == got["avx512vnni"]
    with pytest.raises(InvalidRequestError, match="cpu_kernel"):
        LLM(model=tiny.path("llama"), device="cpu", cpu_kernel="sse")
    monkeypatch.setattr(cq, "cpu_flags", lambda: AVX2_ONLY)  # a laptop without AVX-512
    with pytest.raises(InvalidRequestError, match="lacks avx512f"):
        LLM(model=tiny.path("llama"), dtype="float32", device="cpu", quantization="int8", cpu_kernel="avx512vnni")
