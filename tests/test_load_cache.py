"""Packed-weight cache (loader/pack_cache.py) and the packing straight from GGUF blocks: bit-identical to the
generic pack of decoded codes, a cache hit maps what the first load packed, a stale or corrupt entry is rebuilt."""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from hearthlm.kernels import cpu_quant
from hearthlm.layers.linear import Linear
from hearthlm.layers.quant_linear import NativeWeight

from .conftest import default_model_available

pytestmark = pytest.mark.skipif(not default_model_available() or cpu_quant.library() is None,
                                reason="needs the default GGUF model and the native CPU kernel")


def _load(path, **kw):
    from hearthlm.loader.load import load_model

    return load_model(str(path), progress=False, **kw)


def _natives(model) -> list[NativeWeight]:
    lins = [model.lm_head] + [v for layer in model.layers for v in vars(layer).values() if isinstance(v, Linear)]
    return [lin.packed for lin in lins if isinstance(lin.packed, NativeWeight)]


def _assert_same(a, b) -> None:
    na, nb = _natives(a.model), _natives(b.model)
    assert len(na) == len(nb) > 0
    for x, y in zip(na, nb):
        assert x.bits == y.bits
        for s, t in zip(x.tensors(), y.tensors()):
            assert s.dtype == t.dtype and torch.equal(s, t)
    h = torch.randn(3, a.config.hidden_size, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.model.compute_logits(h), b.model.compute_logits(h))  # bit-identical logits


@pytest.fixture
def model_copy(tmp_path, monkeypatch):
    from hearthlm.loader import default_model_path

    monkeypatch.setenv("HEARTH_HOME", str(tmp_path / "home"))
    dst = tmp_path / "model.gguf"
    shutil.copyfile(default_model_path(), dst)
    return dst


def test_direct_pack_matches_generic_pack():
    """Q4_1 / Q8_0 blocks go to the native layout without decoding codes: the same bytes as cpu_quant.pack of
    the decoded codes (the q/k row permutation and the fused q/k/v, gate/up included)."""
    from hearthlm.layers.quant_linear import GroupQuant
    from hearthlm.loader import default_model_path
    from hearthlm.loader.gguf import GGUFWeights

    gw = GGUFWeights(default_model_path())
    cfg = gw.config()
    p = "model.layers.3."
    for names in ([p + f"self_attn.{n}_proj.weight" for n in "qkv"],
                  [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"],
                  [p + "mlp.down_proj.weight"], ["model.embed_tokens.weight"]):
        parts = [gw.get_quantized(n, cfg, torch.float32) for n in names]
        g = GroupQuant.cat(parts) if len(parts) > 1 else parts[0]
        assert NativeWeight.supports(g)
        got = NativeWeight(g)
        ref_parts = [gw.get_quantized(n, cfg, torch.float32) for n in names]
        codes = torch.cat([r.codes for r in ref_parts])  # decoded, as before the direct path
        want = cpu_quant.pack(codes, torch.cat([r.scale for r in ref_parts]), torch.cat([r.min for r in ref_parts]),
                              parts[0].bits)
        assert got.bits == want[3]
        for s, t in zip(got.tensors(), want[:3]):
            assert torch.equal(s, t), names


def test_cache_round_trip_bit_identical(model_copy):
    from hearthlm.loader.pack_cache import entry_path

    fresh = _load(model_copy, pack_cache=False)
    assert not entry_path(model_copy).exists()
    first = _load(model_copy)  # packs and writes the entry
    assert entry_path(model_copy).exists()
    _assert_same(fresh, first)
    mtime = entry_path(model_copy).stat().st_mtime_ns
    hit = _load(model_copy)  # maps it: nothing packed, nothing written
    assert entry_path(model_copy).stat().st_mtime_ns == mtime
    _assert_same(fresh, hit)


def test_stale_and_corrupt_entries_are_rebuilt(model_copy, caplog):
    from hearthlm.loader.pack_cache import PackCache, entry_path

    fresh = _load(model_copy, pack_cache=False)
    _load(model_copy)
    entry = entry_path(model_copy)
    # stale: the model file changed (mtime)
    st = os.stat(model_copy)
    os.utime(model_copy, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert PackCache(model_copy).rejected
    _assert_same(fresh, _load(model_copy))
    assert not PackCache(model_copy).rejected  # rewritten with the new key
    # corrupt: a truncated file, then flipped scale bytes
    data = entry.read_bytes()
    entry.write_bytes(data[: len(data) // 2])
    assert PackCache(model_copy).rejected
    _assert_same(fresh, _load(model_copy))
    data = bytearray(entry.read_bytes())
    data[-64:] = bytes(b ^ 0xFF for b in data[-64:])  # damaged bytes at the end of the last tensor
    entry.write_bytes(bytes(data))
    cache = PackCache(model_copy)
    assert cache.rejected and not cache.saved
    _assert_same(fresh, _load(model_copy))
    assert not PackCache(model_copy).rejected


def test_entries_of_removed_models_are_pruned(model_copy, tmp_path):
    from hearthlm.loader.pack_cache import entry_path

    other = tmp_path / "other.gguf"
    shutil.copyfile(model_copy, other)
    _load(other)
    assert entry_path(other).exists()
    other.unlink()
    _load(model_copy)  # writing an entry prunes those whose model file is gone
    assert not entry_path(other).exists() and entry_path(model_copy).exists()


def test_remove_for_deletes_the_entry(model_copy):
    from hearthlm.loader.pack_cache import entry_path, remove_for

    _load(model_copy)
    assert entry_path(model_copy).exists()
    remove_for(model_copy)  # `hearth rm` calls it for the model's .gguf files
    assert not entry_path(model_copy).exists()
