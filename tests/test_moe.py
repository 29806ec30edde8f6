"""Mixture-of-experts families (Qwen3-MoE, Mixtral) against HF transformers on tiny random float32 models: greedy
tokens equal and logprobs close, through chunked prefill, batching and a prefix-cache hit; the config's counts."""
from __future__ import annotations

import pytest
import torch

from hearthlm import LLM, SamplingParams

from .conftest import assert_greedy_like_hf, prompts_of

VOCAB = 49152


def _tiny(kind: str, root, tokenizer):
    import transformers

    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                  rms_norm_eps=1e-5, tie_word_embeddings=False)
    if kind == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(**common, head_dim=16, intermediate_size=96, moe_intermediate_size=32,
                                          num_experts=6, num_experts_per_tok=2, decoder_sparse_step=1,
                                          mlp_only_layers=[1], norm_topk_prob=True)
        cls = transformers.Qwen3MoeForCausalLM
    else:
        cfg = transformers.MixtralConfig(**common, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2)
        cls = transformers.MixtralForCausalLM
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():  # larger weights than the init's: routing and tokens vary
        for p in model.parameters():
            p.mul_(4.0 if p.dim() > 1 else 1.0)
    path = root / kind
    model.save_pretrained(path)
    tokenizer.save(path)
    return model, path


@pytest.fixture(scope="session")
def tiny_moe(tmp_path_factory, default_tokenizer):
    """kind -> (HF model, its directory), each built once a session (tests copy the directory to change it)."""
    built: dict = {}

    def get(kind: str):
        if kind not in built:
            built[kind] = _tiny(kind, tmp_path_factory.mktemp("moe"), default_tokenizer)
        return built[kind]
    return get


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral"])
def test_moe_matches_hf(kind, tiny_moe):
    hf, path = tiny_moe(kind)
    llm = LLM(model=str(path), dtype="float32", device="cpu", max_model_len=256, max_num_batched_tokens=32)
    cfg = llm.engine.model_config
    assert cfg.num_experts == (6 if kind == "qwen3_moe" else 4) and cfg.num_experts_per_tok == 2
    assert cfg.dense_layers == ([1] if kind == "qwen3_moe" else [])
    assert cfg.active_params < cfg.num_params
    prompts = prompts_of(4, [40, 7, 19, 3], seed=11)
    prompts.append(prompts[0][:35] + [5, 6])  # a prefix-cache hit on the first
    outs = assert_greedy_like_hf(llm, hf, prompts, 10)
    assert outs[-1].num_cached_tokens >= 32
    assert len(set(tuple(o.outputs[0].token_ids) for o in outs)) > 2  # the routing varied the answers


def test_moe_param_counts():
    from hearthlm.loader.hf_config import config_from_hf_dict

    d = {"architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 151936, "hidden_size": 2048,
         "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48,
         "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
         "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
         "tie_word_embeddings": False}
    cfg = config_from_hf_dict(d)  # Qwen3-30B-A3B: 30.5B in all, 3.3B active
    assert 30.0e9 < cfg.num_params < 31.0e9 and 3.2e9 < cfg.active_params < 3.4e9
    with pytest.raises(Exception, match="num_experts_per_tok"):
        config_from_hf_dict({**d, "num_experts_per_tok": 200})


def _write_gguf(kind: str, model_dir, out, q8_experts=("down_proj",)):
    """The tiny model as llama.cpp's converter lays it out: `qwen3moe`, or `llama` with experts (Mixtral); the
    router as ffn_gate_inp, each expert matrix stacked in one 3-D ffn_*_exps tensor (down's as Q8_0), llama's
    q/k rows permuted for its interleaved RoPE."""
    import gguf
    from safetensors.torch import load_file

    from hearthlm.loader.gguf import _LAYER_NAMES, _TOP_NAMES
    from hearthlm.loader.safetensors import read_hf_config
    from hearthlm.quant.sources import write_shape_metadata
    from hearthlm.quant.vocab import write_hf_tokenizer

    cfg = read_hf_config(model_dir)
    arch = "qwen3moe" if kind == "qwen3_moe" else "llama"
    w = gguf.GGUFWriter(str(out), arch)
    write_shape_metadata(w, cfg)
    w.add_expert_count(cfg.num_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    if kind == "qwen3_moe":
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    write_hf_tokenizer(w, model_dir, cfg.vocab_size)
    layer = {hf: g for g, hf in _LAYER_NAMES.items()}
    top = {hf: g for g, hf in _TOP_NAMES.items()}
    experts: dict = {}
    for name, t in load_file(str(model_dir / "model.safetensors")).items():
        t = t.float()
        if not name.startswith("model.layers."):
            base, _, suffix = name.rpartition(".")
            w.add_tensor(f"{top[base]}.{suffix}", t.numpy())
            continue
        _, _, i, rest = name.split(".", 3)
        rest = rest.replace("block_sparse_moe.", "mlp.").replace(".w1.", ".gate_proj.").replace(
            ".w3.", ".up_proj.").replace(".w2.", ".down_proj.")
        if ".experts." in rest:
            _, _, e, proj, _ = rest.split(".")
            experts.setdefault((int(i), proj), {})[int(e)] = t
            continue
        base, _, suffix = rest.rpartition(".")
        if base == "mlp.gate":
            gname = f"blk.{i}.ffn_gate_inp.{suffix}"
        else:
            gname = f"blk.{i}.{layer[base]}.{suffix}"
        if arch == "llama" and base in ("self_attn.q_proj", "self_attn.k_proj"):  # llama.cpp's row order
            heads = cfg.num_heads if "q_proj" in base else cfg.num_kv_heads
            t = t.reshape(heads, 2, t.shape[0] // heads // 2, -1).transpose(1, 2).reshape(t.shape)
        w.add_tensor(gname, t.numpy())
    names = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}
    for (i, proj), per in sorted(experts.items()):
        stacked = torch.stack([per[e] for e in sorted(per)]).numpy()
        if proj in q8_experts:
            q = gguf.quants.quantize(stacked, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(f"blk.{i}.{names[proj]}.weight", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(f"blk.{i}.{names[proj]}.weight", stacked)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral"])
def test_moe_gguf_matches_its_weights(kind, tmp_path, tiny_moe):
    """The GGUF layout (3-D expert tensors, a Q8_0 one among them) gives the safetensors model's tokens and
    logits, that model's down_proj experts replaced by their Q8_0 values."""
    import gguf
    from safetensors.torch import load_file, save_file

    import shutil

    path = shutil.copytree(tiny_moe(kind)[1], tmp_path / kind)  # its safetensors are rewritten below
    gguf_path = _write_gguf(kind, path, tmp_path / f"{kind}.gguf")
    st = load_file(str(path / "model.safetensors"))
    for name, t in st.items():  # what the GGUF holds: down experts through Q8_0
        if ".experts." in name and (name.endswith("down_proj.weight") or name.endswith("w2.weight")):
            q = gguf.quants.quantize(t.float().numpy(), gguf.GGMLQuantizationType.Q8_0)
            st[name] = torch.from_numpy(gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)).reshape(t.shape)
    save_file(st, str(path / "model.safetensors"))
    a = LLM(model=str(gguf_path), dtype="float32", device="cpu", max_model_len=128)
    b = LLM(model=str(path), dtype="float32", device="cpu", max_model_len=128)
    assert a.engine.model_config.architecture == kind and a.engine.model_config.num_experts > 0
    prompts = prompts_of(2, [21, 9], seed=5)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=0)
    for x, y in zip(a.generate(prompts, params, use_tqdm=False), b.generate(prompts, params, use_tqdm=False)):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        lx = [next(iter(d.values())) for d in x.outputs[0].logprobs]
        ly = [next(iter(d.values())) for d in y.outputs[0].logprobs]
        torch.testing.assert_close(torch.tensor(lx), torch.tensor(ly), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind, norm", [("qwen3_moe", True), ("qwen3_moe", False), ("mixtral", True)])
def test_moe_block_matches_hf_in_every_layout(kind, norm):
    """layers/moe.MoE against HF's sparse block, bit for bit, loaded from the fused 3-D names (transformers 5 in
    memory), the per-expert names (its save_pretrained, Qwen3-MoE on the Hub) or Mixtral's block_sparse_moe w1/w3/w2;
    a token's result alone equals its row in a batch (up to the GEMM's rounding for another row count)."""
    import transformers

    from hearthlm.layers.moe import MoE

    torch.manual_seed(1)
    if kind == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(hidden_size=32, moe_intermediate_size=16, num_experts=5,
                                          num_experts_per_tok=2, norm_topk_prob=norm)
        block = transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock(cfg)
    else:
        cfg = transformers.MixtralConfig(hidden_size=32, intermediate_size=16, num_local_experts=5,
                                         num_experts_per_tok=2)
        block = transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock(cfg).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_()
        x = torch.randn(1, 24, 32)
        want = block(x)[0]
    sd = {f"model.layers.0.mlp.{k}": v.detach() for k, v in block.state_dict().items()}
    per_expert, mixtral = {"model.layers.0.mlp.gate.weight": sd["model.layers.0.mlp.gate.weight"]}, {}
    for e in range(5):
        g, u = sd["model.layers.0.mlp.experts.gate_up_proj"][e].chunk(2)
        d = sd["model.layers.0.mlp.experts.down_proj"][e]
        for n, t in (("gate_proj", g), ("up_proj", u), ("down_proj", d)):
            per_expert[f"model.layers.0.mlp.experts.{e}.{n}.weight"] = t
        for n, t in (("w1", g), ("w3", u), ("w2", d)):
            mixtral[f"model.layers.0.block_sparse_moe.experts.{e}.{n}.weight"] = t
    mixtral["model.layers.0.block_sparse_moe.gate.weight"] = sd["model.layers.0.mlp.gate.weight"]
    for names in (sd, per_expert, mixtral):
        moe = MoE.load(names.get, "model.layers.0.", 5, 2, norm, round_weights=kind == "qwen3_moe")
        assert moe.w13.shape == (5, 32, 32) and moe.w2.shape == (5, 32, 16)
        got = moe(x[0])
        assert torch.equal(got, want)
    torch.testing.assert_close(torch.cat([moe(x[0, i:i + 1]) for i in range(24)]), want, atol=1e-3, rtol=1e-5)
    assert MoE.load({}.get, "model.layers.0.", 5, 2, norm) is None  # no router: a dense block


def test_cpu_moe_placement_flag_and_plan(tmp_path, capsys):
    """--cpu-moe N: the experts of the first N blocks go to the CPU beside a GPU device (a placement decision,
    computed here without a GPU), the flag reaches LLM's keywords, and hearth plan reports the bytes it moves."""
    import argparse
    import json

    from hearthlm.cli import flags, plan_cmd
    from hearthlm.config import EngineConfig
    from hearthlm.errors import InvalidRequestError
    from hearthlm.loader.hf_config import config_from_hf_dict
    from hearthlm.loader.load import _placement

    d = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 1024,
         "hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 128, "num_hidden_layers": 4,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "num_experts": 8,
         "num_experts_per_tok": 2, "norm_topk_prob": True, "mlp_only_layers": [3]}
    place = _placement(config_from_hf_dict(d), torch.device("cuda"), None, True, "none", cpu_moe=2)
    dev = place.weight_device
    assert dev("model.layers.1.mlp.experts.7.down_proj.weight").type == "cpu"
    assert dev("model.layers.0.block_sparse_moe.experts.0.w1.weight").type == "cpu"
    assert dev("model.layers.1.mlp.experts.gate_up_proj").type == "cpu"
    for name in ("model.layers.2.mlp.experts.0.up_proj.weight", "model.layers.1.mlp.gate.weight",
                 "model.layers.0.self_attn.q_proj.weight", "lm_head.weight"):
        assert dev(name).type == "cuda", name
    dense = dict(d, architectures=["Qwen3ForCausalLM"], model_type="qwen3", num_experts=0)
    assert _placement(config_from_hf_dict(dense), torch.device("cuda"), None, True, "none", 2).cpu_moe == 0
    assert EngineConfig(cpu_moe=3).cpu_moe == 3
    with pytest.raises(InvalidRequestError, match="cpu_moe"):
        EngineConfig(cpu_moe=-1)
    p = argparse.ArgumentParser()
    flags.add_engine_args(p)
    assert flags.engine_kwargs(p.parse_args(["--n-cpu-moe", "5"]))["cpu_moe"] == 5
    assert "cpu_moe" not in flags.engine_kwargs(p.parse_args([]))

    (tmp_path / "config.json").write_text(json.dumps(d))
    parser = argparse.ArgumentParser()
    plan_cmd.add_parser(parser.add_subparsers())
    args = parser.parse_args(["plan", str(tmp_path), "--device", "h100", "--cpu-moe", "2", "--json"])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["num_experts"] == 8 and out["active_params"] < out["num_params"]
    assert 0 < out["cpu_moe_bytes"] < out["expert_bytes"] < out["weights_bytes"]
    assert out["cpu_moe_bytes"] * 3 == out["expert_bytes"] * 2  # 2 of the 3 MoE blocks (block 3 is dense)


def test_moe_gguf_experts_stay_quantized_on_cpu(tmp_path, tiny_moe):
    """Q8_0 expert tensors with dtype auto on the CPU: each expert kept quantized behind its own Linear (the native
    kernel where it builds), the first token's logprob near HF's on the float weights, and a prompt alone gives its
    batched tokens (logprobs within rounding: MoE blocks run the reference attention and a torch GEMM router, not
    the native blocks)."""
    from hearthlm.layers.linear import Linear

    hf, path = tiny_moe("qwen3_moe")
    g = _write_gguf("qwen3_moe", path, tmp_path / "q8.gguf", q8_experts=("gate_proj", "up_proj", "down_proj"))
    quant = LLM(model=str(g), device="cpu", max_model_len=128)
    assert quant.engine.model_config.dense_layers == [1]  # the block without ffn_gate_inp
    moes = [layer.moe for layer in quant.engine.loaded.model.layers if layer.moe is not None]
    assert moes and all(m.w13 is None and isinstance(m.linears[0][0], Linear) and m.linears[0][0].packed is not None
                        for m in moes)
    prompts = prompts_of(3, [17, 5, 30], seed=9)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=0)
    for p, b in zip(prompts, quant.generate(prompts, params, use_tqdm=False)):
        alone = quant.generate([p], params, use_tqdm=False)[0].outputs[0]
        assert alone.token_ids == b.outputs[0].token_ids
        torch.testing.assert_close(torch.tensor([d[t] for d, t in zip(alone.logprobs, alone.token_ids)]),
                                   torch.tensor([d[t] for d, t in zip(b.outputs[0].logprobs, alone.token_ids)]),
                                   atol=1e-4, rtol=1e-4)
        with torch.no_grad():
            want = hf(torch.tensor([p])).logits[0, -1].float().log_softmax(-1)[alone.token_ids[0]]
        assert abs(alone.logprobs[0][alone.token_ids[0]] - float(want)) < 0.1


def test_moe_fused_expert_checkpoint_loads(tmp_path, tiny_moe):
    """A checkpoint with transformers 5's in-memory names (3-D mlp.experts.gate_up_proj / down_proj) loads to the
    tokens and logprobs of its per-expert save_pretrained form."""
    import shutil

    from safetensors.torch import save_file

    hf, path = tiny_moe("qwen3_moe")
    fused = tmp_path / "fused"
    shutil.copytree(path, fused)
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in sd
    save_file(sd, str(fused / "model.safetensors"))
    prompts = prompts_of(2, [12, 7], seed=3)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=0)
    outs = [LLM(model=str(p), dtype="float32", device="cpu", max_model_len=64).generate(prompts, params,
                                                                                      use_tqdm=False)
            for p in (path, fused)]
    for a, b in zip(*outs):  # within an ulp: the GEMM may round by the weights' alignment (mmap'd or copied)
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        torch.testing.assert_close(torch.tensor([next(iter(d.values())) for d in a.outputs[0].logprobs]),
                                   torch.tensor([next(iter(d.values())) for d in b.outputs[0].logprobs]),
                                   atol=1e-5, rtol=1e-6)
