"""A random-weight GGUF of a real Llama shape in seconds, for load and cold-start timings (no download, no
K-quant search): `hearth quantize`'s writer with its per-tensor types (Q4_K_M: Q4_K, Q6_K for attn_v / ffn_down
of llama.cpp's use_more_bits layers and the output head), whose blocks hold random codes and small finite scales.

    python benchmarks/random_gguf.py --preset llama-3.1-8b --type q4_k_m -o /tmp/r8b.gguf

The tokenizer is the synthetic byte-level one of `hearth bench` (bench/models.py). Timings only: the model's
output is noise.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

# byte offsets of each block's float16 scale fields (d, dmin), by GGML type
SCALE_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "Q2_K": (80, 82),
                "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "BF16": (), "F16": (), "F32": ()}


def random_blocks(shape: tuple[int, ...], qtype: str, rng: np.random.Generator) -> np.ndarray:
    """Random bytes of a `qtype` tensor of `shape` (rows first) with every block's scales set to small values."""
    import gguf

    t = gguf.GGMLQuantizationType[qtype]
    if qtype == "F32":
        return np.ones(shape, dtype=np.float32)  # norms
    block, size = gguf.GGML_QUANT_SIZES[t]
    n_blocks = int(np.prod(shape)) // block
    data = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
    for off in SCALE_FIELDS[qtype]:
        data[:, off:off + 2] = np.frombuffer(np.float16(2e-3).tobytes(), dtype=np.uint8)
    return data.reshape(*shape[:-1], shape[-1] // block * size)


def source_for(preset: str, workdir: Path, vocab_size: int):
    """A quant.sources.HFSource of the preset's shape whose tensors are never read (the writer asks for blocks)."""
    from hearthlm.bench.models import synthetic_tokenizer
    from hearthlm.loader.hf_config import config_from_hf_dict
    from hearthlm.plan.presets import HF_CONFIGS
    from hearthlm.quant.sources import GGUF_ARCH, HFSource, SourceTensor

    d = dict(HF_CONFIGS[preset], vocab_size=vocab_size, bos_token_id=1, eos_token_id=2)
    (workdir / "config.json").write_text(json.dumps(d))
    tok = synthetic_tokenizer(vocab_size)
    raw = json.loads(tok.backend.to_str())
    raw["model"]["merges"] = [["\u0120", "b"], ["\u0120b", "a"]]  # GGUF's gpt2 vocabulary needs merges
    raw["model"]["vocab"]["\u0120b"] = raw["model"]["vocab"].pop(max(raw["model"]["vocab"], key=len))
    tok.backend = type(tok.backend).from_str(json.dumps(raw))
    tok.save(workdir)
    cfg = config_from_hf_dict(d, name=f"{preset}-random")
    if cfg.architecture not in ("llama", "mistral"):
        raise SystemExit(f"{preset}: only Llama-shaped presets ({cfg.architecture})")
    h, q, kv, f = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    shapes = {"token_embd.weight": (cfg.vocab_size, h), "output_norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["output.weight"] = (cfg.vocab_size, h)
    for i in range(cfg.num_layers):
        shapes.update({f"blk.{i}.{n}.weight": s for n, s in (
            ("attn_norm", (h,)), ("attn_q", (q, h)), ("attn_k", (kv, h)), ("attn_v", (kv, h)),
            ("attn_output", (h, q)), ("ffn_norm", (h,)), ("ffn_gate", (f, h)), ("ffn_up", (f, h)),
            ("ffn_down", (h, f)))})
    src = HFSource.__new__(HFSource)
    src.dir, src.cfg, src.family = workdir, cfg, cfg.architecture
    src.arch, src.n_layers = GGUF_ARCH[cfg.architecture], cfg.num_layers
    src.tensors = [SourceTensor(n, s, lambda s=s: np.empty(s, dtype=np.float32)) for n, s in shapes.items()]
    return src


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="llama-3.2-1b")
    p.add_argument("--type", default="q4_k_m", help="a `hearth quantize` target")
    p.add_argument("--vocab-size", type=int, default=49152)
    p.add_argument("-o", "--output", required=True)
    args = p.parse_args()
    import hearthlm.quant.writer as writer

    rng = np.random.default_rng(0)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        src = source_for(args.preset, Path(tmp), args.vocab_size)
        writer.open_source = lambda _path: src
        writer.quantize_array = lambda data, qtype: random_blocks(data.shape, qtype, rng)
        report = writer.quantize_model(Path(tmp), args.type, Path(args.output), progress=False)
    print(f"wrote {args.output}: {report.num_weights / 1e9:.2f} B weights, {report.bits_per_weight:.2f} bits/weight, "
          f"{report.data_bytes / 2**30:.2f} GiB, {dict(report.types)} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
