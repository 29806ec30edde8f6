"""The runner's attention backends and the blocks' forwards (runtime/backends/, models/llama.py, models/gemma2.py):
which backend and which block class each side gets, the step inputs every backend builds from, and the fused GPU
blocks on CPU tensors (their kernels' torch references) against HF transformers, Gemma 2 included."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hearthlm import LLM
from hearthlm.loader import load_model
from hearthlm.models.gemma2 import FusedGemma2Layer, Gemma2Layer
from hearthlm.models.llama import FusedLlamaLayer, LlamaLayer, NativeLlamaLayer
from hearthlm.runtime.backends import NativeBackend, TorchBackend, TritonBackend, TritonMetadata
from hearthlm.runtime.runner import Batch
from hearthlm.runtime.step_inputs import BlockTables, step_inputs

from .conftest import prompts_of

CPU = torch.device("cpu")


def _kernel_engine(tiny, family: str, **kw) -> LLM:
    """A float32 CPU engine switched to the device path a CUDA engine takes: the Triton backend (its kernels run
    their torch references on CPU tensors) and the fused blocks."""
    from hearthlm import kernels as K

    llm = LLM(loaded=load_model(tiny.path(family), "float32", "cpu", gpu_layers=kw.pop("gpu_layers", None)),
              device="cpu", max_model_len=256, max_num_seqs=4, **kw)
    net, cfg = llm.engine.runner.model, llm.engine.model_config
    net.cos_sin = K.build_cos_sin_cache(cfg.head_dim, 256, cfg.rope_theta, cfg.rope_scaling)
    llm.engine.runner.use_kernels = True
    return llm


@pytest.mark.parametrize("family,fused", [("llama31", FusedLlamaLayer), ("gemma2", FusedGemma2Layer)])
def test_fused_blocks_match_hf_on_cpu(tiny, family, fused):
    """Gemma 2 has fused GPU blocks too: (1 + w) norm kernels around its post-norms, GeGLU in one kernel."""
    llm = _kernel_engine(tiny, family)
    runner = llm.engine.runner
    assert isinstance(runner.backend, TritonBackend) and runner.backend.supports_graphs
    assert all(type(layer) is fused for layer in runner.model.layers)
    prompt = prompts_of(1, [37], seed=30)[0]  # past Gemma 2's sliding window
    # a prompt chunk, then a mixed step: one decode row beside a 5-token chunk of another sequence
    logits = runner.logits_for(Batch([prompt], [0], [[[1, 2, 3]] * len(runner.windows)], [None]))
    torch.testing.assert_close(logits, tiny.logits(family, prompt), atol=1e-4, rtol=1e-4)
    other = prompts_of(1, [5], seed=31)[0]
    tables = [[[1, 2, 3]] * len(runner.windows), [[4]] * len(runner.windows)]
    mixed = runner.logits_for(Batch([[7], other], [37, 0], tables, [None, None]))
    torch.testing.assert_close(mixed[0], tiny.logits(family, prompt + [7])[-1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(mixed[1:], tiny.logits(family, other), atol=1e-4, rtol=1e-4)


def test_fused_device_blocks_after_offloaded_ones(tiny):
    """--gpu-layers on one CPU: the host blocks run the reference forward on their backend's metadata, the device
    blocks the fused forward on the Triton metadata; logits match the plain run."""
    ref = LLM(model=tiny.path("llama31"), dtype="float32", device="cpu", max_model_len=256, num_kv_blocks=16)
    llm = _kernel_engine(tiny, "llama31", gpu_layers=2, num_kv_blocks=16)
    net, runner = llm.engine.runner.model, llm.engine.runner
    assert isinstance(runner.host_backend, TorchBackend) and not runner.host_backend.supports_graphs
    assert [type(layer) for layer in net.layers] == [LlamaLayer] * 2 + [FusedLlamaLayer] * 2
    prompt = prompts_of(1, [21], seed=3)[0]
    batches = (Batch([prompt], [0], [[[1, 2]]], [None]), Batch([[7]], [21], [[[1, 2]]], [None]))  # prefill, decode
    want = [ref.engine.runner.logits_for(b) for b in batches]
    _, _, meta, _ = runner.prepare(batches[0])
    assert isinstance(meta, TritonMetadata) and not meta.host.use_kernels
    for batch, logits in zip(batches, want):
        torch.testing.assert_close(runner.logits_for(batch), logits, rtol=1e-4, atol=1e-4)


def test_backend_and_block_choice_per_side(tiny, engine_for):
    plain = engine_for("llama", max_model_len=256, max_num_seqs=8).engine.runner  # dense float32 weights
    assert isinstance(plain.backend, (TorchBackend, NativeBackend)) and plain.host_backend is None
    native = LLM(model=tiny.path("llama"), dtype="float32", device="cpu", quantization="int8", max_model_len=128,
                 max_num_seqs=4).engine.runner
    if native.model.layers[0].native:  # the native kernel builds here
        assert isinstance(native.backend, NativeBackend)
        assert all(type(layer) is NativeLlamaLayer for layer in native.model.layers)
        _, _, meta, _ = native.prepare(Batch([[5, 6, 7], [9]], [0, 4], [[[1]], [[2]]], [None, None]))
        # the native call is prepared with the step; no layer reads the reference plans, so none are built
        assert all(g.row_attention is not None for g in meta.groups)
        assert all(sb.plan is None for g in meta.groups for sb in g.sub_batches)
        # an int8 pool: the native blocks attend through the torch reference, whose plans are built
        quant = LLM(model=tiny.path("llama"), dtype="float32", device="cpu", quantization="int8", max_model_len=128,
                    max_num_seqs=4, kv_cache_dtype="int8").engine.runner
        assert type(quant.backend) is TorchBackend
        assert all(type(layer) is NativeLlamaLayer for layer in quant.model.layers)
    gemma = engine_for("gemma2", max_model_len=256, max_num_seqs=8).engine.runner
    assert all(type(layer) is Gemma2Layer for layer in gemma.model.layers)


def test_step_inputs_count_the_leading_decodes_and_share_the_tables():
    tables = BlockTables(num_groups=2, block_size=4, max_blocks=8)
    bt = [[[3, 4], [3, 4]], [[5], [0]], [[6, 7, 9], [6, 7, 9]]]
    step = step_inputs(tables, [[1], [2], [3, 4, 5]], [5, 2, 7], bt)
    assert step.num_decodes == 2 and step.max_query_len == 3
    assert step.positions.tolist() == [5, 2, 7, 8, 9]
    assert step.slots[0].tolist() == [4 * 4 + 1, 5 * 4 + 2, 7 * 4 + 3, 9 * 4, 9 * 4 + 1]
    assert step.tables[1].tolist() == [[3, 4, 0], [0, 0, 0], [6, 7, 9]]
    assert step_inputs(tables, [[1], [2]], [5, 2], bt[:2]).num_decodes == 2  # decode only: every row
    assert step_inputs(tables, [[1, 2], [2]], [5, 2], bt[:2]).num_decodes == 0  # a chunk first: none lead
    # rows cached per sequence key (the CUDA graphs' decode steps and the runner's steps alike) equal fresh ones
    keys = ["a", "b", "c"]
    cached = step_inputs(tables, [[1], [2], [3, 4, 5]], [5, 2, 7], bt, keys)
    for a, b in zip(cached.tables + cached.slots, step.tables + step.slots):
        assert torch.equal(a, b)
    bt[0][0].append(11)  # a new block: appended to the cached row
    grown = tables.tables(bt, keys, width=8)
    assert grown[0].shape == (3, 8) and grown[0][0, :3].tolist() == [3, 4, 11]
    assert np.array_equal(grown[0], tables.tables(bt, None, width=8)[0])
