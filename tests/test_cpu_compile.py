"""Compiled CPU decode step (--compile, models/cpu_compile.py): the same greedy tokens and the same logprobs, bit for
bit, as the eager path (a last-bit difference would let long greedy runs drift), on a one-block model with int4
weights. One graph: a cold inductor cache compiles it in ~10 s on 2 cores, a warm one loads it in ~3 s."""
from __future__ import annotations

import pytest
import torch

from .conftest import prompts_of


def _compile_available() -> bool:
    try:
        from hearthlm.models.cpu_compile import check_available

        check_available()
        return True
    except Exception:
        return False


pytestmark = pytest.mark.skipif(not _compile_available(), reason="torch.compile needs inductor and a C++ compiler")


@pytest.fixture(scope="module")
def one_layer_llama(tiny, tmp_path_factory) -> str:
    """The tiny llama with one block: compiling takes seconds per layer on a 2-core machine with a cold cache."""
    import transformers

    from .conftest import COMMON

    torch.manual_seed(5)
    cfg = transformers.LlamaConfig(**{**COMMON, "num_hidden_layers": 1, "tie_word_embeddings": True})
    path = str(tmp_path_factory.mktemp("one_layer_llama"))
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(path)
    tiny.tokenizer.save(path)
    return path


def test_compiled_decode_matches_eager(one_layer_llama, torch_int4):
    from hearthlm import LLM, SamplingParams

    llm = LLM(model=one_layer_llama, dtype="float32", device="cpu", quantization="int4", max_model_len=128,
              max_num_seqs=8, cpu_compile=True)
    model = llm.engine.runner.model
    graph = model.cpu_graph
    layer = model.layers[0]
    # 3 rows with different context lengths (masked attention, symbolic sizes): the int4 kernel for q/k/v and o,
    # and, where the CPU has native bf16, the dense op (the custom op torch.compile keeps opaque) for the MLP
    for lin in (layer.gate_up, layer.down):
        if lin.packed.dense is not None:
            lin.packed.dense_min_rows = 1
    prompts = prompts_of(3, [5, 9, 3], seed=11)
    sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=3)
    got = llm.generate(prompts, sp, use_tqdm=False)
    assert graph.error is None
    assert graph.steps == sp.max_tokens - 1  # every decode step ran compiled
    model.cpu_graph = None
    want = llm.generate(prompts, sp, use_tqdm=False)
    for g, w in zip(got, want):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        assert g.outputs[0].logprobs == w.outputs[0].logprobs  # top-3 ids and values at every step


def test_native_kernels_leave_nothing_to_compile(one_layer_llama, caplog):
    from hearthlm import LLM, SamplingParams
    from hearthlm.layers.quant_linear import NativeWeight, quantize_int4

    if not NativeWeight.supports(quantize_int4(torch.randn(16, 64))):
        pytest.skip("the native CPU kernel is not built here")
    with caplog.at_level("INFO", logger="hearthlm"):
        llm = LLM(model=one_layer_llama, dtype="float32", device="cpu", quantization="int4", max_model_len=128,
                  max_num_seqs=8, cpu_compile=True)
    assert llm.engine.runner.model.cpu_graph is None and "nothing to compile" in caplog.text
    out = llm.generate(prompts_of(2, [5, 9], seed=1), SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                       use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 4 for o in out)


def test_compile_flag_plumbing(monkeypatch):
    from hearthlm.config import CacheConfig

    monkeypatch.setenv("HEARTH_CPU_COMPILE", "1")  # no environment variable: a config field (issue 17)
    assert CacheConfig().cpu_compile is False
    assert CacheConfig(cpu_compile=True).cpu_compile is True
    # hearth serve --compile reaches the engines' CacheConfig through ServeConfig, not the environment
    import argparse

    from hearthlm.cli import serve_cmd

    parser = argparse.ArgumentParser(prog="hearth")
    serve_cmd.add_parser(parser.add_subparsers())
    assert serve_cmd.config_from_args(parser.parse_args(["serve", "m", "--compile"])).cpu_compile is True
    assert serve_cmd.config_from_args(parser.parse_args(["serve", "m"])).cpu_compile is False
    # the dtype default is auto on every device (on CPU: GGUF weights stay quantized, the native kernel)
    assert serve_cmd.config_from_args(parser.parse_args(["serve", "m", "--device", "cpu"])).dtype == "auto"
    assert serve_cmd.config_from_args(parser.parse_args(["serve", "m", "--dtype", "float32"])).dtype == "float32"
