"""Layer offload (--gpu-layers N, llama.cpp's -ngl): placement, per-device KV pools and metadata, the memory plan,
and outputs equal to the all-device run.

Without a GPU the offload path runs with both sides on the CPU (`load_model(..., device="cpu", gpu_layers=N)`):
the same segments, boundary moves, host metadata and per-device pools, compared with the plain CPU engine. The
`gpu` tests compare a CUDA + CPU split with the all-CUDA run."""
from __future__ import annotations

import argparse
import json

import pytest
import torch

from hearthlm import LLM, SamplingParams
from hearthlm.config import normalize_gpu_layers
from hearthlm.errors import InvalidRequestError, OutOfMemoryError
from hearthlm.loader.load import load_model
from hearthlm.models.llama import Placement
from hearthlm.runtime.runner import Batch

from .conftest import needs_default_model, prompts_of

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a torch.device needs no GPU to exist
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def offloaded_llm(tiny, family: str, gpu_layers: int, **kw) -> LLM:
    """An engine whose first L - gpu_layers blocks take the offload path, both sides on the CPU."""
    return LLM(loaded=load_model(tiny.path(family), "float32", "cpu", gpu_layers=gpu_layers), device="cpu",
               max_model_len=256, max_num_seqs=8, **kw)


def tokens(llm: LLM, prompts, sp=GREEDY) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]


def blocks_for(llm: LLM, n_tokens: int) -> list[list[int]]:
    """One sequence's block tables (per KV group) for `n_tokens`, blocks 1.. (for runner.logits_for)."""
    blocks = list(range(1, -(-n_tokens // llm.engine.config.cache.block_size) + 1))
    return [blocks] * len(llm.engine.runner.windows)


# ------------------------------------------------------------------------------------------- placement
def test_placement_puts_the_last_n_blocks_and_the_head_on_the_device():
    p = Placement(CUDA, 6, 2, tied_embedding=False)
    assert p.offloaded and p.num_host_layers == 4
    assert p.layer_devices == [CPU] * 4 + [CUDA] * 2
    assert p.segments() == [(0, 4, True), (4, 6, False)]
    assert p.weight_device("model.layers.3.mlp.down_proj.weight") == CPU
    assert p.weight_device("model.layers.4.self_attn.q_proj.weight") == CUDA
    assert p.weight_device("model.layers.10.input_layernorm.weight") == CUDA  # "1" is not block 1
    assert p.weight_device("model.embed_tokens.weight") == CPU == p.embed_device  # untied: input layer on the CPU
    assert p.weight_device("lm_head.weight") == p.weight_device("model.norm.weight") == CUDA
    tied = Placement(CUDA, 6, 2, tied_embedding=True)  # the embedding is the head: it stays on the device
    assert tied.embed_device == CUDA and tied.weight_device("model.embed_tokens.weight") == CUDA
    zero = Placement(CUDA, 6, 0, tied_embedding=False)  # every block on the CPU, the head still on the device
    assert zero.layer_devices == [CPU] * 6 and zero.segments() == [(0, 6, True)]
    assert zero.weight_device("lm_head.weight") == CUDA
    for n in (None, 6):  # all blocks on the device: nothing offloaded, one segment
        full = Placement(CUDA, 6, n, tied_embedding=False)
        assert not full.offloaded and full.segments() == [(0, 6, False)] and full.embed_device == CUDA
    with pytest.raises(InvalidRequestError, match="between 0 and 6"):
        Placement(CUDA, 6, 7)


def test_gpu_layers_values():
    assert normalize_gpu_layers(None) is None and normalize_gpu_layers("-1") is None
    assert normalize_gpu_layers("all") is None and normalize_gpu_layers(" AUTO ") == "auto"
    assert normalize_gpu_layers("12") == 12 and normalize_gpu_layers(0) == 0
    for bad in ("-2", "half", "1.5", True):
        with pytest.raises(InvalidRequestError, match="--gpu-layers"):
            normalize_gpu_layers(bad)


@pytest.mark.parametrize("family, tied", [("llama", True), ("llama31", False)])
def test_loader_places_each_weight_on_its_blocks_device(tiny, family, tied):
    """The `meta` device stands in for the GPU: offloaded blocks load on the CPU, the rest on `meta`."""
    net = load_model(tiny.path(family), "float32", "meta", gpu_layers=1).model
    assert [layer.qkv.weight.device.type for layer in net.layers] == ["cpu"] * 3 + ["meta"]
    assert [layer.input_norm.device.type for layer in net.layers] == ["cpu"] * 3 + ["meta"]
    assert net.lm_head.weight.device.type == net.final_norm.device.type == "meta"
    assert net.embed.device.type == ("meta" if tied else "cpu")
    assert net.host_rotary.inv_freq.device == CPU and net.rotary.inv_freq.device.type == "meta"


@needs_default_model
def test_gguf_loader_places_blocks_too():
    from hearthlm.loader import default_model_path

    net = load_model(default_model_path(), "float32", "meta", gpu_layers=20).model
    assert [layer.down.weight.device.type for layer in net.layers] == ["cpu"] * 10 + ["meta"] * 20
    assert net.embed.device.type == "meta"  # SmolLM2 ties its head to the embedding


def test_fp8_weights_cannot_run_on_offloaded_blocks(tiny):
    with pytest.raises(InvalidRequestError, match="fp8 runs on CUDA only"):
        load_model(tiny.path("llama"), "bfloat16", "meta", quantization="fp8", gpu_layers=2)


# ---------------------------------------------------------------------------------- runner: pools, metadata
def test_kv_pools_and_metadata_per_device(tiny):
    llm = offloaded_llm(tiny, "llama31", 1, async_scheduling=True, num_kv_blocks=40)
    runner = llm.engine.runner
    assert runner.host == CPU and runner.layer_devices == [CPU] * 4  # both sides are the CPU here
    assert not runner.can_overlap and runner.graphs is None  # offloaded steps are eager and not overlapped
    pools = [k for k, _ in runner.kv_caches] + [v for _, v in runner.kv_caches]
    assert len({id(p) for p in pools}) == 8 and all(p.shape[0] == 40 for p in pools)
    assert runner.host_kv_cache_bytes == 3 * runner.kv_cache_bytes // 4
    _, _, meta, _ = runner.prepare(Batch([[5, 6, 7], [9]], [0, 4], [[[1]], [[2]]], [None, None]))
    host = meta.host
    assert host is not None and not host.use_kernels and host.host is None
    assert [len(g.sub_batches) for g in host.groups] == [2]  # one decode and one prefill sub-batch
    assert host.groups[0].slot_mapping.tolist() == [16, 17, 18, 36]


def test_block_count_fits_each_devices_budget(tiny):
    """Block ids are shared by every layer, so a group gets the smaller count either device's budget allows."""
    from hearthlm.runtime.runner import kv_bytes_per_block

    budget = 1 << 20
    llm = offloaded_llm(tiny, "llama31", 1, kv_cache_memory=budget)
    per_block = kv_bytes_per_block(llm.engine.model_config, 16, torch.float32)  # 2 x 16 x 2 heads x 16 x 4 B
    assert per_block == 4096
    # device: 1 layer -> 256 blocks; host: 3 layers -> 85 blocks; 8 x (256 / 16 + 1) + 1 = 137 are useful
    assert llm.engine.runner.num_blocks == [budget // (3 * per_block)] == [85]
    plain = LLM(model=tiny.path("llama31"), dtype="float32", device="cpu", max_model_len=256, max_num_seqs=8,
                kv_cache_memory=budget)
    assert plain.engine.runner.num_blocks == [budget // (4 * per_block)] == [64]


def test_offloaded_blocks_read_the_host_metadata_and_their_own_pools(tiny, monkeypatch):
    import hearthlm.models.llama as llama_mod

    llm = offloaded_llm(tiny, "llama", 2, num_kv_blocks=32)
    runner = llm.engine.runner
    seen = []
    real = llama_mod.paged_attention

    def spy(q, k, v, kv_cache, meta, layer, *args, **kwargs):
        seen.append((layer, meta, kv_cache))
        return real(q, k, v, kv_cache, meta, layer, *args, **kwargs)

    monkeypatch.setattr(llama_mod, "paged_attention", spy)
    ids, pos, meta, _ = runner.prepare(Batch([[5, 6, 7, 8]], [0], [[[1]]], [None]))
    with torch.inference_mode():
        runner.model.forward(ids, pos, meta, runner.kv_caches)
    assert [s[0] for s in seen] == [0, 1, 2, 3]
    assert [s[1] is meta.host for s in seen] == [True, True, False, False]
    assert [s[1] is meta for s in seen] == [False, False, True, True]
    assert all(s[2] is runner.kv_caches[i] for i, s in enumerate(seen))


# ------------------------------------------------------------------------------- outputs equal the plain run
@pytest.mark.parametrize("family", ["llama", "llama31", "mistral", "gemma2"])
def test_offloaded_greedy_and_logits_equal_the_plain_run(tiny, engine_for, family):
    plain = engine_for(family, max_model_len=256, max_num_seqs=8)
    prompts = prompts_of(3, [30, 5, 41], seed=7)  # mistral/gemma2: past their 24-token sliding window
    want = tokens(plain, prompts)
    ref = LLM(model=tiny.path(family), dtype="float32", device="cpu", max_model_len=256, num_kv_blocks=16)
    batch = Batch([prompts[2]], [0], [blocks_for(ref, len(prompts[2]))], [None])
    ref_logits = ref.engine.runner.logits_for(batch)  # a fresh engine: this overwrites KV blocks 1-3
    for n in (2, 0):  # half the blocks offloaded; all of them (the head alone stays on the device)
        llm = offloaded_llm(tiny, family, n)
        assert tokens(llm, prompts) == want, n
        torch.testing.assert_close(llm.engine.runner.logits_for(batch), ref_logits, rtol=1e-5, atol=1e-5)


@needs_default_model
def test_offloaded_gguf_equals_the_plain_run():
    """SmolLM2 Q4_1 with its blocks kept quantized on the CPU (the int4 kernel) on both sides."""
    from hearthlm.loader import default_model_path

    path = default_model_path()
    kw = dict(device="cpu", max_model_len=256, max_num_seqs=2, num_kv_blocks=16)
    plain = LLM(loaded=load_model(path, "auto", "cpu"), **kw)
    off = LLM(loaded=load_model(path, "auto", "cpu", gpu_layers=12), **kw)
    assert off.engine.runner.host == CPU and off.engine.loaded.model.placement.num_host_layers == 18
    prompt = plain.tokenizer.encode("The capital of France is")
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    assert tokens(off, [prompt], sp) == tokens(plain, [prompt], sp)


def _interpreted() -> bool:
    import importlib.util

    if importlib.util.find_spec("triton") is None or torch.cuda.is_available():
        return False
    import triton

    return bool(triton.knobs.runtime.interpret)


interp = pytest.mark.skipif(not _interpreted(), reason="needs TRITON_INTERPRET=1 on a CPU machine "
                                                       "(test_fused_device_blocks_under_interpreter starts one)")


def test_fused_device_blocks_under_interpreter():
    from pathlib import Path

    from .kernels.conftest import run_interpreted

    run_interpreted(Path(__file__), "interp")


@interp
def test_interp_fused_device_blocks_after_offloaded_ones(tiny, monkeypatch):
    """The GPU's side of the boundary on CPU: the device blocks run FusedLlamaLayer.forward with the Triton kernels
    (interpreted) on the Triton backend's metadata, after the offloaded blocks' reference forward; logits match the
    plain run."""
    from hearthlm import kernels as K
    from hearthlm.models.llama import FusedLlamaLayer

    ref = LLM(model=tiny.path("llama31"), dtype="float32", device="cpu", max_model_len=256, num_kv_blocks=16)
    llm = offloaded_llm(tiny, "llama31", 2, num_kv_blocks=16)
    net, runner = llm.engine.loaded.model, llm.engine.runner
    cfg = net.cfg
    net.cos_sin = K.build_cos_sin_cache(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
    runner.use_kernels = True  # what a CUDA device gets (binds the device blocks to FusedLlamaLayer)
    fused = []
    real = FusedLlamaLayer.forward
    monkeypatch.setattr(FusedLlamaLayer, "forward", lambda self, *a: fused.append(self.idx) or real(self, *a))
    prompt = prompts_of(1, [21], seed=3)[0]
    batches = (Batch([prompt], [0], [[[1, 2]]], [None]), Batch([[7]], [21], [[[1, 2]]], [None]))  # prefill, decode
    want = [ref.engine.runner.logits_for(b) for b in batches]
    for batch, logits in zip(batches, want):
        fused.clear()
        got = runner.logits_for(batch)
        assert fused == [2, 3]
        torch.testing.assert_close(got, logits, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------ CPU only
def test_cpu_engine_refuses_gpu_layers_and_says_why(tiny):
    with pytest.raises(InvalidRequestError, match="all layers run on the CPU") as e:
        LLM(model=tiny.path("llama"), dtype="float32", device="cpu", max_model_len=256, gpu_layers=2)
    assert e.value.param == "gpu_layers"


def test_cpu_engine_accepts_auto_and_zero(engine_for):
    for value in ("auto", 0):
        llm = engine_for("llama", max_model_len=256, gpu_layers=value)
        assert not llm.engine.loaded.model.placement.offloaded and llm.engine.runner.host is None


def test_serve_and_run_parse_gpu_layers():
    from hearthlm.cli import run_cmd, serve_cmd

    parser = argparse.ArgumentParser(prog="hearth")
    sub = parser.add_subparsers()
    serve_cmd.add_parser(sub)
    run_cmd.add_parser(sub)
    assert parser.parse_args(["serve", "--gpu-layers", "auto"]).gpu_layers == "auto"
    args = parser.parse_args(["serve", "m", "--gpu-layers", "20"])
    assert args.gpu_layers == 20 and serve_cmd.config_from_args(args).gpu_layers == 20
    assert parser.parse_args(["run", "--gpu-layers", "-1"]).gpu_layers is None
    assert parser.parse_args(["run"]).gpu_layers is None
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "--gpu-layers", "lots"])


# -------------------------------------------------------------------------------------------------- planner
def test_plan_auto_picks_the_largest_n_and_its_slowdown_for_a_tied_model():
    """Hand calculation: a tied head is the embedding, on the device; the offloaded blocks and their KV in RAM."""
    from hearthlm.plan import memory as m
    from hearthlm.plan.presets import preset_config

    cfg = preset_config("llama-3.2-1b")  # 16 blocks, tied embeddings
    gpu = m.DeviceSpec("3g", "gpu", 3 * m.GiB, 2e12)
    plan = m.make_plan(cfg, "bf16", 8192, 1, "auto", gpu, 0.9, gpu_layers="auto", host_bytes=64 * m.GiB)
    w = m.weights_bytes(cfg, "bf16")
    layer, head = w.layer_bytes[0], w.head_bytes
    assert head == w.embedding_bytes == 128256 * 2048 * 2 and w.lm_head_bytes == 0
    kv_layer = (8192 + 16) * 2 * 8 * 64 * 2  # (tokens + the null block) x K,V x kv heads x head_dim x bf16
    fixed = head + w.other_bytes + plan.activation_bytes + plan.overhead_bytes
    n = (int(3 * m.GiB * 0.9) - fixed) // (layer + kv_layer)
    assert 0 < n < 16 and plan.verdict == "partial_offload" and plan.ok and plan.gpu_layers == n
    assert plan.device_weights_bytes == n * layer + head + w.other_bytes
    assert plan.host_bytes == (16 - n) * (layer + kv_layer)  # no embedding in RAM: it is the head
    # decode reads every block and the head once per token: device blocks + head at 2 TB/s, the rest at 50 GB/s
    w_cpu, w_all = (16 - n) * layer, 16 * layer + head
    assert plan.host_bandwidth_bytes_per_s == 50e9
    assert plan.slowdown == pytest.approx(((w_all - w_cpu) / 2e12 + w_cpu / 50e9) / (w_all / 2e12))
    assert plan.cpu_weight_read_fraction == pytest.approx(w_cpu / w_all)


def _plan_cli(capsys, *argv):
    from hearthlm.cli import plan_cmd

    parser = argparse.ArgumentParser(prog="hearth")
    plan_cmd.add_parser(parser.add_subparsers())
    args = parser.parse_args(["plan", *argv])
    rc = args.func(args)
    return rc, capsys.readouterr().out


def test_plan_names_its_bandwidths_and_the_cpu_only_case(capsys):
    rc, out = _plan_cli(capsys, "qwen3-0.6b", "--device", "1.5", "--ctx", "4096", "--gpu-layers", "auto", "--json")
    plan = json.loads(out)
    assert rc == 0 and plan["verdict"] == "partial_offload" and 0 < plan["gpu_layers"] < 28
    assert plan["host_bandwidth_bytes_per_s"] == 50e9 and plan["device"]["bandwidth_bytes_per_s"] == 1e12
    rc, out = _plan_cli(capsys, "qwen3-0.6b", "--device", "1.5", "--ctx", "4096", "--gpu-layers", "auto")
    assert rc == 0 and f"--gpu-layers {plan['gpu_layers']} of 28" in out
    assert f"~{plan['slowdown']:.1f}x slower decode" in out and "1.00 TB/s on the device" in out
    assert "50 GB/s from RAM" in out
    rc, out = _plan_cli(capsys, "qwen3-0.6b", "--device", "cpu", "--gpu-layers", "10")
    assert rc == 0 and "no CUDA device: all layers run on the CPU" in out


def _gpu_with_room_for_2_of_4_blocks(tiny, monkeypatch, dtype: str, batch_tokens: int) -> str:
    """Make the planner see a GPU whose memory holds the llama31 tiny model's fixed parts and 2.5 blocks
    (weights + KV of 512 tokens each); returns the model path."""
    from hearthlm.plan import memory as m
    from hearthlm.plan import preflight as pf
    from hearthlm.plan.sources import resolve_model

    path = tiny.path("llama31")
    cfg = resolve_model(path).cfg
    w = m.weights_bytes(cfg, dtype)
    unit = w.layer_bytes[0] + m.kv_bytes_for_context(cfg, 512, 1, "auto", 16, [0])
    fixed = w.lm_head_bytes + w.other_bytes + m.activation_bytes(cfg, batch_tokens, dtype, 1) + m.GPU_OVERHEAD_BYTES
    gpu = m.DeviceSpec("fake", "gpu", int((fixed + 2.5 * unit) / 0.9), 1e12)
    monkeypatch.setattr(pf, "device_spec", lambda name: gpu)
    return path


def test_preflight_resolves_auto_to_the_plans_n(tiny, monkeypatch):
    """The engine's start-up plan on a (simulated) GPU with room for exactly 2 of 4 blocks."""
    from hearthlm.plan import memory as m
    from hearthlm.plan import preflight as pf

    path = _gpu_with_room_for_2_of_4_blocks(tiny, monkeypatch, "bf16", 256)

    def run(n):
        return pf.preflight(pf.Path(path), "cuda", "bfloat16", 512, 256, 0.9, gpu_layers=n)

    plan = run("auto")
    assert plan.ok and plan.gpu_layers == 2 and pf.offloaded_layers(plan) == 2
    assert pf.offloaded_layers(run(1)) == 1
    with pytest.raises(OutOfMemoryError, match="with --gpu-layers 3, at most 2 blocks fit"):
        run(3)
    with pytest.raises(OutOfMemoryError, match="--gpu-layers 2"):  # all blocks: does not fit, offload advised
        run(None)
    monkeypatch.setattr(pf, "device_spec", lambda name: m.DeviceSpec("big", "gpu", 80 * m.GiB, 1e12))
    assert pf.offloaded_layers(run("auto")) is None  # everything fits: nothing offloaded


# ------------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "llama31", "mistral", "gemma2"])
def test_gpu_offloaded_greedy_equals_all_gpu(tiny, family):
    """float32 (IEEE dots in the kernels): the CPU reference blocks + CUDA blocks give the all-CUDA greedy tokens."""
    kw = dict(model=tiny.path(family), dtype="float32", device="cuda", max_model_len=512, max_num_seqs=8)
    ref, off = LLM(**kw), LLM(**kw, gpu_layers=2)
    runner, net = off.engine.runner, off.engine.loaded.model
    assert runner.host == CPU and runner.graphs is None and not runner.can_overlap
    assert [k.device.type for k, _ in runner.kv_caches] == ["cpu", "cpu", "cuda", "cuda"]
    assert [layer.qkv.weight.device.type for layer in net.layers] == ["cpu", "cpu", "cuda", "cuda"]
    assert net.lm_head.weight.is_cuda
    prompts = prompts_of(4, [40, 7, 25, 60], seed=31)
    sp = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    assert tokens(off, prompts, sp) == tokens(ref, prompts, sp)
    batch = Batch([prompts[3]], [0], [blocks_for(off, 60)], [None])
    torch.testing.assert_close(off.engine.runner.logits_for(batch), ref.engine.runner.logits_for(batch),
                               rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
def test_gpu_offloaded_bf16_matches_or_diverges_at_a_near_tie(tiny):
    kw = dict(model=tiny.path("llama31"), dtype="bfloat16", device="cuda", max_model_len=512, max_num_seqs=8)
    ref, off = LLM(**kw), LLM(**kw, gpu_layers=2)
    prompts = prompts_of(4, [40, 7, 25, 60], seed=32)
    sp = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    for prompt, ours, want in zip(prompts, tokens(off, prompts, sp), tokens(ref, prompts, sp)):
        if ours == want:
            continue
        k = next(i for i, (a, b) in enumerate(zip(ours, want)) if a != b)
        seq = prompt + want[:k]
        logits = ref.engine.runner.logits_for(Batch([seq], [0], [blocks_for(ref, len(seq))], [None]))[-1]
        gap, scale = float(logits[want[k]] - logits[ours[k]]), float(logits.abs().max())
        assert gap <= 0.02 * scale + 0.05, f"diverged at {k} with logit gap {gap:.3f} (max |logit| {scale:.1f})"
        break  # the all-GPU blocks were overwritten by logits_for: compare no further


@pytest.mark.gpu
def test_gpu_layers_auto_offloads_when_the_device_is_small(tiny, monkeypatch):
    """auto at engine start: the plan's N for a (pretend) GPU with room for 2 of 4 blocks, then equal outputs."""
    path = _gpu_with_room_for_2_of_4_blocks(tiny, monkeypatch, "f32", 2048)
    kw = dict(model=path, dtype="float32", device="cuda", max_model_len=512, max_num_seqs=4)
    off = LLM(**kw, gpu_layers="auto")
    assert off.engine.loaded.model.placement.gpu_layers == 2 and off.engine.runner.host == CPU
    monkeypatch.undo()
    prompts = prompts_of(2, [20, 9], seed=33)
    assert tokens(off, prompts) == tokens(LLM(**kw), prompts)
