"""The GPU side's layer path on a CPU machine: the Triton backend and the fused blocks with their Triton kernels run
by the interpreter (TRITON_INTERPRET=1, in a child process) on CPU tensors, against the torch backend's greedy
tokens and logits. The weights' matmuls stay torch's (dense float32 on the CPU)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hearthlm import SamplingParams

from .conftest import prompts_of
from .kernels.conftest import interpreting, run_interpreted

interp = pytest.mark.skipif(not interpreting(), reason="needs TRITON_INTERPRET=1 on a CPU machine "
                                                       "(test_triton_backend_under_interpreter starts one)")


def test_triton_backend_under_interpreter():
    run_interpreted(Path(__file__), "interp")


@interp
@pytest.mark.parametrize("family", ["llama31", "gemma2"])
def test_interp_triton_backend_matches_torch(tiny, family, monkeypatch):
    from hearthlm import LLM
    from hearthlm import kernels as K
    from hearthlm.kernels import activation, cache_write, paged_attention, prefill_attention, rmsnorm, rope
    from hearthlm.loader import load_model
    from hearthlm.runtime.backends import TritonBackend
    from hearthlm.runtime.runner import Batch

    def engine():
        return LLM(loaded=load_model(tiny.path(family), "float32", "cpu"), device="cpu", max_model_len=128,
                   max_num_seqs=4, max_num_batched_tokens=32, num_kv_blocks=24)

    prompts = prompts_of(3, [29, 6, 13], seed=11)  # 29 + 6 > 32: a chunked prompt beside decodes (mixed steps)
    sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    ref = engine()
    want = [o.outputs[0].token_ids for o in ref.generate(prompts, sp, use_tqdm=False)]
    want_logits = ref.engine.runner.logits_for(Batch([prompts[0]], [0], [[[1, 2]] * len(ref.engine.runner.windows)],
                                                     [None]))
    for mod in (activation, cache_write, paged_attention, prefill_attention, rmsnorm, rope):  # CPU tensors too
        monkeypatch.setattr(mod, "use_triton", lambda t: True)
    launched = set()
    for mod, name in ((paged_attention, "paged_decode_attention_triton"),
                      (prefill_attention, "paged_prefill_attention_triton"), (rope, "apply_rope_triton_"),
                      (rmsnorm, "rms_norm_triton")):
        def spy(*a, _real=getattr(mod, name), _name=name, **kw):
            launched.add(_name)
            return _real(*a, **kw)

        monkeypatch.setattr(mod, name, spy)
    llm = engine()
    runner, cfg = llm.engine.runner, llm.engine.model_config
    runner.model.cos_sin = K.build_cos_sin_cache(cfg.head_dim, 128, cfg.rope_theta, cfg.rope_scaling)
    runner.use_kernels = True  # what a CUDA device gets: the Triton backend, fused blocks
    assert isinstance(runner.backend, TritonBackend)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
    logits = runner.logits_for(Batch([prompts[0]], [0], [[[1, 2]] * len(runner.windows)], [None]))
    torch.testing.assert_close(logits, want_logits, atol=2e-4, rtol=2e-4)
    assert got == want
    assert launched == {"paged_decode_attention_triton", "paged_prefill_attention_triton", "apply_rope_triton_",
                        "rms_norm_triton"}
