"""Pre-quantized HF checkpoints (loader/quantized_checkpoint.py): tiny random AWQ, GPTQ (asymmetric, symmetric,
desc_act) and FP8 checkpoints packed here from a tiny random llama, against HF transformers on the dequantized float32
weights: greedy tokens equal and logprobs close, through the native CPU kernel (weights kept quantized) and the
dequantized path; unsupported methods and bit widths are typed errors naming what is supported."""
from __future__ import annotations

import json

import pytest
import torch

from hearthlm import LLM
from hearthlm.errors import UnsupportedModelError

from .conftest import assert_greedy_like_hf, prompts_of

GROUP = 128
_PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
         "mlp.up_proj", "mlp.down_proj")
_AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def _i32(words: torch.Tensor) -> torch.Tensor:
    """int64 values 0..2^32-1 -> the int32 words of the same bits."""
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def _pack_rows(codes: torch.Tensor, order=range(8)) -> torch.Tensor:
    """[..., 8] codes 0..15 -> [...] int32 words, code order[i] in nibble i."""
    return _i32(sum(codes[..., o].long() << (4 * i) for i, o in enumerate(order)))


def _quantize_layer(kind: str, n: int, k: int, g: torch.Generator) -> tuple[dict, torch.Tensor]:
    """Random int4 codes, zeros and fp16 scales for one [n, k] weight in `kind`'s layout -> (tensors, W float32)."""
    groups = k // GROUP
    q = torch.randint(0, 16, (k, n), generator=g)  # [K, N] as the checkpoints store them
    z = torch.randint(0, 16, (groups, n), generator=g) if kind != "gptq_sym" else torch.full((groups, n), 8)
    s = (0.002 + 0.004 * torch.rand(groups, n, generator=g)).half()
    g_idx = torch.arange(k) // GROUP
    if kind == "gptq_act":  # act order: input perm[i] is the i-th quantized, group i // 128
        perm = torch.randperm(k, generator=g)
        g_idx = torch.empty(k, dtype=torch.long)
        g_idx[perm] = torch.arange(k) // GROUP
    w = ((q - z[g_idx]).float() * s.float()[g_idx]).t().contiguous()  # [N, K]
    if kind == "awq":
        return {"qweight": _pack_rows(q.view(k, n // 8, 8), _AWQ_ORDER),
                "qzeros": _pack_rows(z.view(groups, n // 8, 8), _AWQ_ORDER), "scales": s}, w
    qweight = _pack_rows(q.view(k // 8, 8, n).transpose(1, 2))  # inputs 8 r .. 8 r + 7 in word r
    qzeros = _pack_rows(((z - 1) & 15).view(groups, n // 8, 8))  # GPTQ v1 stores zero - 1
    return {"qweight": qweight, "qzeros": qzeros, "scales": s, "g_idx": g_idx.to(torch.int32)}, w


def _fp8_layer(n: int, k: int, per_channel: bool, g: torch.Generator) -> tuple[dict, torch.Tensor]:
    w8 = (torch.randn(n, k, generator=g) * 8).to(torch.float8_e4m3fn)
    scale = (0.002 + 0.002 * torch.rand(n if per_channel else 1, generator=g))
    scale = scale.view(n, 1) if per_channel else scale.view(())
    return {"weight": w8, "weight_scale": scale, "input_scale": torch.tensor(1.0)}, \
        w8.float() * scale.reshape(-1, 1)


_CONFIGS = {
    "awq": {"quant_method": "awq", "bits": 4, "group_size": GROUP, "version": "gemm", "zero_point": True},
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": False, "sym": False},
    "gptq_sym": {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": False, "sym": True},
    "gptq_act": {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": True, "sym": False},
    "fp8": {"quant_method": "fp8", "activation_scheme": "dynamic"},
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, default_tokenizer):
    """{kind: (quantized checkpoint dir, HF model on its dequantized weights)}, one tiny random llama each."""
    import transformers
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("quantized")
    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-5, tie_word_embeddings=True)
    out = {}
    for i, kind in enumerate(_CONFIGS):
        torch.manual_seed(i)
        hf = transformers.LlamaForCausalLM(cfg).eval()
        sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
        g = torch.Generator().manual_seed(100 + i)
        tensors = {}
        for name in list(sd):
            if name == "lm_head.weight":  # tied to the embeddings
                continue
            base = name.removesuffix(".weight")
            if not base.endswith(_PROJ):
                tensors[name] = sd[name]
                continue
            n, k = sd[name].shape
            if kind == "fp8":
                parts, w = _fp8_layer(n, k, "self_attn" in base, g)
            else:
                parts, w = _quantize_layer(kind, n, k, g)
            sd[name] = w
            tensors.update({f"{base}.{p}": t.contiguous() for p, t in parts.items()})
        hf.load_state_dict(sd)
        path = root / kind
        hf.save_pretrained(path)
        (path / "model.safetensors").unlink()
        save_file(tensors, str(path / "model.safetensors"))
        c = json.loads((path / "config.json").read_text())
        c["quantization_config"] = _CONFIGS[kind]
        (path / "config.json").write_text(json.dumps(c))
        default_tokenizer.save(path)
        out[kind] = (path, hf)
    return out


def _check(llm: LLM, hf, atol: float) -> None:
    prompts = prompts_of(2, [23, 9], seed=5)
    assert_greedy_like_hf(llm, hf, prompts, 6, atol)


@pytest.mark.parametrize("kind", list(_CONFIGS))
def test_quantized_checkpoint_matches_hf(kind, checkpoints):
    from hearthlm.layers.quant_linear import NativeWeight

    path, hf = checkpoints[kind]
    # the kernels' path (weights kept quantized where a kernel takes them exactly)
    llm = LLM(model=str(path), dtype="float32", device="cpu", max_model_len=128, weights="quantized")
    assert llm.engine.loaded.quantization == ("fp8" if kind == "fp8" else "int4-awq-g128")
    layer = llm.engine.loaded.model.layers[0]
    native = isinstance(layer.qkv.kernel, NativeWeight)
    if kind in ("awq", "gptq", "gptq_sym"):
        from hearthlm.kernels import cpu_quant

        assert native == (cpu_quant.library() is not None)
        # symmetric (min = -8 s, exact in fp16): 4-bit codes; asymmetric: the lossless 8-bit re-pack
        assert not native or layer.qkv.kernel.bits == (4 if kind == "gptq_sym" else 8)
    if kind == "gptq_act":  # act order: the inputs sorted by group at load, gathered on each call
        from hearthlm.loader.quantized_checkpoint import InputPermuted

        assert all(isinstance(p, InputPermuted) for p in layer.qkv.parts) and isinstance(layer.o.kernel,
                                                                                          InputPermuted)
        native = isinstance(layer.o.kernel.inner, NativeWeight)
    _check(llm, hf, 2e-3 if native else 1e-4)
    if kind == "awq":  # explicit float32 and weights auto: dequantized, the HF-exact path
        _check(LLM(model=str(path), dtype="float32", device="cpu", max_model_len=128), hf, 1e-4)


def test_unsupported_quantization_is_typed(checkpoints, tmp_path):
    import shutil

    from hearthlm.loader.load import load_model

    path, _ = checkpoints["gptq"]
    for qc, words in [({"quant_method": "gptq", "bits": 3, "group_size": 128}, "GPTQ at 3 bits"),
                      ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "'bitsandbytes'"),
                      ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "'gemv'")]:
        bad = tmp_path / "bad"
        shutil.rmtree(bad, ignore_errors=True)
        shutil.copytree(path, bad)
        c = json.loads((bad / "config.json").read_text())
        c["quantization_config"] = qc
        (bad / "config.json").write_text(json.dumps(c))
        with pytest.raises(UnsupportedModelError, match="supported: awq") as e:
            load_model(str(bad), dtype="float32")
        assert words in str(e.value)


def test_gpu_layout_is_exact():
    """The CUDA form (QuantWeight, here on CPU tensors with the torch reference) holds the file's weights exactly:
    float16 scales and mins for symmetric zeros, float32 where -z * s is not a float16."""
    from hearthlm.layers.weight_kernel import WeightOptions, bound
    from hearthlm.loader.quantized_checkpoint import _gpu_weight, dequantize

    g = torch.Generator().manual_seed(3)
    q = torch.randint(0, 16, (32, 384), generator=g)
    s = (0.002 + 0.004 * torch.rand(32, 3, generator=g)).half().float()
    x = torch.randn(5, 384, generator=g)
    for z, sdt in [(torch.randint(0, 16, (32, 3), generator=g), torch.float32), (torch.full((32, 3), 8),
                                                                                   torch.float16)]:
        with bound(WeightOptions(kernels="torch")):
            w = _gpu_weight(q, z, s, 128, torch.device("cpu"), torch.float32)
        assert w.scale.dtype == sdt and w.group == 128
        ref = dequantize(q, z, s, 128)
        assert torch.equal(w.dequantize(), ref)
        torch.testing.assert_close(w(x), x @ ref.t(), atol=1e-5, rtol=1e-5)


class _Tensors:
    """A SafetensorsWeights stand-in: name -> tensor."""

    def __init__(self, tensors: dict):
        self.where = tensors

    def get(self, name: str):
        return self.where.get(name)


def test_gptq_8bit_v2_and_compressed_tensors_fp8():
    """8-bit GPTQ (4 codes a word) in the v2 format (zeros stored as they are) dequantizes to (q - z) * s exactly;
    a compressed-tensors config with 8-bit float weights reads as FP8."""
    from hearthlm.loader.quantized_checkpoint import QuantizedCheckpoint

    g = torch.Generator().manual_seed(4)
    k, n = 256, 32
    q = torch.randint(0, 256, (k, n), generator=g)
    z = torch.randint(0, 256, (k // GROUP, n), generator=g)
    s = (0.001 + 0.001 * torch.rand(k // GROUP, n, generator=g)).half()
    words = lambda c: _i32(sum(c[..., i].long() << (8 * i) for i in range(4)))  # noqa: E731
    st = _Tensors({"l.qweight": words(q.view(k // 4, 4, n).transpose(1, 2)), "l.qzeros": words(z.view(-1, n // 4, 4)),
                   "l.scales": s, "l.g_idx": (torch.arange(k) // GROUP).to(torch.int32)})
    ck = QuantizedCheckpoint({"quant_method": "gptq", "bits": 8, "group_size": GROUP,
                              "checkpoint_format": "gptq_v2"}, st)
    assert ck.name == "int8-gptq-g128"
    w = ck.get("l.weight", torch.device("cpu"), torch.float32, quantized=True)  # no exact int8 kernel: dense
    want = ((q - z.repeat_interleave(GROUP, 0)).float() * s.float().repeat_interleave(GROUP, 0)).t()
    assert torch.equal(w, want)
    ct = {"quant_method": "compressed-tensors",
          "config_groups": {"group_0": {"weights": {"num_bits": 8, "type": "float", "strategy": "channel"}}}}
    assert QuantizedCheckpoint(ct, _Tensors({})).method == "fp8"
