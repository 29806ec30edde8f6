"""`hearth quantize`'s quality guard: perplexity before/after, refusal with the worst tensors named, --force,
--tensor-type, --allow-requantize, --eval-file. Sources are the tiny llama's F32 GGUF (quick to re-quantize);
few evaluation tokens keep each run near a second."""
from __future__ import annotations

import pytest

from hearthlm.cli.main import main

from .sample_text import TEXT

FEW = ["--eval-tokens", "256"]


@pytest.fixture
def f32(tiny_gguf):
    return str(tiny_gguf("llama", "f32"))


def _types(path) -> dict[str, str]:
    import gguf

    from hearthlm.loader.gguf_header import GGUFFile

    return {n: gguf.GGMLQuantizationType(t.ggml_type).name for n, t in GGUFFile(path).tensors.items()}


def test_benign_quantization_passes_and_prints_the_change(f32, tmp_path, capsys):
    out = tmp_path / "q8.gguf"
    assert main(["quantize", f32, "-q", "q8_0", "-o", str(out), *FEW]) == 0
    text = capsys.readouterr().out
    assert "perplexity on 256 tokens of the built-in text (pydoc_data.topics)" in text
    assert " before, " in text and "% (limit +10%)" in text and f"wrote {out}" in text
    assert out.is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["q8.gguf"]  # no staging file left


def test_damaging_quantization_is_refused_with_the_worst_tensors_named_and_force_writes(f32, tmp_path, capsys):
    out = tmp_path / "q4.gguf"
    # q4_0 raises the tiny random model's perplexity ~25% (2048-entry rows of noise quantize badly)
    assert main(["quantize", f32, "-q", "q4_0", "-o", str(out), *FEW]) == 2
    err = capsys.readouterr().err
    assert "above --max-ppl-increase 10%" in err and "the tensors quantized worst: blk.*." in err
    assert "--tensor-type 'blk.*." in err and "not written (--force writes it anyway)" in err
    assert not any(tmp_path.iterdir())
    argv = ["quantize", f32, "-q", "q4_0", "-o", str(out), *FEW, "--force", "--tensor-type", "blk.*.ffn_down=q8_0",
            "--tensor-type", "output_norm=q4_0"]
    assert main(argv) == 0
    assert "writing anyway (--force)" in capsys.readouterr().err
    types = _types(out)
    assert {types[f"blk.{i}.ffn_down.weight"] for i in range(4)} == {"Q8_0"}  # the override
    assert types["blk.0.attn_q.weight"] == "Q4_0" and types["output_norm.weight"] == "F32"  # norms stay F32


def test_requantize_needs_allow_requantize(tiny_gguf, tmp_path, capsys):
    src = str(tiny_gguf("llama", "q8_0", source=tiny_gguf("llama", "f32")))
    out = tmp_path / "re.gguf"
    assert main(["quantize", src, "-q", "q4_0", "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "already quantized" in err and "--allow-requantize" in err and not out.exists()
    assert main(["quantize", src, "-q", "q8_0", "-o", str(out), "--allow-requantize", "--no-eval"]) == 0
    assert out.is_file()


def test_eval_file_is_used_and_a_bad_path_is_a_clear_error(f32, tmp_path, capsys):
    text = tmp_path / "eval.txt"
    text.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "q8.gguf"
    assert main(["quantize", f32, "-q", "q8_0", "-o", str(out), "--eval-file", str(text)]) == 0
    assert "tokens of eval.txt:" in capsys.readouterr().out and out.is_file()
    out.unlink()
    assert main(["quantize", f32, "-q", "q8_0", "-o", str(out), "--eval-file", str(tmp_path / "no.txt")]) == 1
    assert f"--eval-file {tmp_path / 'no.txt'} not found" in capsys.readouterr().err and not out.exists()


def test_a_model_the_guard_cannot_run_needs_force_or_no_eval(f32, tmp_path, capsys, monkeypatch):
    from hearthlm.errors import UnsupportedModelError
    from hearthlm.quant import guard

    def cannot(*a, **k):
        raise UnsupportedModelError("no kernel for this family on this device")

    monkeypatch.setattr(guard, "perplexity_llm", cannot)
    out = tmp_path / "q8.gguf"
    assert main(["quantize", f32, "-q", "q8_0", "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "cannot run this model here (no kernel" in err and "--force" in err and "--no-eval" in err
    assert not out.exists()
    assert main(["quantize", f32, "-q", "q8_0", "-o", str(out), "--force"]) == 0
    assert "writing without the quality check (--force)" in capsys.readouterr().err and out.is_file()


@pytest.mark.parametrize("argv, message", [
    (["--tensor-type", "blk.*.ffn_down"], "write PATTERN=TYPE"),
    (["--tensor-type", "blk.*.ffn_down=q3_k"], "write PATTERN=TYPE"),
    (["--max-ppl-increase", "-1"], "must be >= 0"),
])
def test_bad_guard_flags_exit_1(f32, tmp_path, capsys, argv, message):
    assert main(["quantize", f32, "-q", "q8_0", "-o", str(tmp_path / "x.gguf"), *argv]) == 1
    assert message in capsys.readouterr().err
