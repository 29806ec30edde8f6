"""Progress bars for slow steps (hearthlm.progress): model load per tensor, perplexity per window with the running
PPL, quantize per tensor; quiet off a terminal, off the main thread, and for library calls by default."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest

from hearthlm import progress as P


def test_auto_bars_only_on_a_terminal_and_the_main_thread(monkeypatch):
    import sys

    assert P.wanted(True) and not P.wanted(False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert not P.wanted(None) and isinstance(P.bar(3, "x", progress=None), P._Off)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert P.wanted(None)
    seen = []
    t = threading.Thread(target=lambda: seen.append(P.wanted(None)))  # the server's loader/engine threads
    t.start()
    t.join()
    assert seen == [False]


class _Recorder:
    """Stands in for hearthlm.progress.bar: records every bar's description, total, updates and postfixes."""

    def __init__(self):
        self.bars: list[dict] = []

    def __call__(self, total, desc, unit="it", progress=None, **kwargs):
        rec = {"desc": desc, "total": total, "unit": unit, "progress": progress, "updates": [], "postfix": [],
               "closed": False}
        self.bars.append(rec)

        class Bar(P._Off):
            def update(self, n=1):
                self.n += n
                rec["updates"].append(n)

            def set_postfix_str(self, s="", refresh=True):
                rec["postfix"].append(s)

            def close(self):
                rec["closed"] = True

        b = Bar()
        b.total = total
        return b


@pytest.fixture
def recorder(monkeypatch):
    rec = _Recorder()
    monkeypatch.setattr(P, "bar", rec)
    return rec


def test_load_and_perplexity_drive_their_bars(recorder, capsys):
    from hearthlm.quant import perplexity, perplexity_llm

    llm = perplexity_llm("smollm2", 64, batch=2, progress=True)
    load = recorder.bars[0]
    assert load["desc"].startswith("loading SmolLM2") and load["unit"] == "tensor" and load["progress"] is True
    assert load["total"] == 272 and sum(load["updates"]) == 272 and load["closed"]  # one tick per GGUF tensor

    ids = llm.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 20)
    res = perplexity(llm, ids, 64, batch=2, max_windows=5, progress=True)
    ppl = recorder.bars[-1]
    assert ppl["desc"] == "perplexity" and ppl["total"] == 5 and ppl["updates"] == [2, 2, 1] and ppl["closed"]
    shown = [float(x.split()[-1]) for x in ppl["postfix"]]
    assert len(shown) == 3 and shown[-1] == pytest.approx(res.ppl, rel=1e-4)  # the running PPL ends at the result

    perplexity(llm, ids, 64, batch=2, max_windows=2)  # a library call: progress=None (auto)
    assert recorder.bars[-1]["progress"] is None


def test_a_real_bar_draws_on_stderr_and_auto_stays_quiet_off_a_terminal(capsys):
    from hearthlm.quant import perplexity, perplexity_llm

    llm = perplexity_llm("smollm2", 64, progress=False)
    assert capsys.readouterr().err == ""
    ids = llm.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 10)
    perplexity(llm, ids, 64, max_windows=2, progress=True)
    err = capsys.readouterr().err
    assert "perplexity" in err and "window" in err
    perplexity(llm, ids, 64, max_windows=2)  # pytest's stderr is no terminal: auto draws nothing
    assert capsys.readouterr().err == ""


def test_quantize_drives_its_bar_and_explains_the_bits(tiny, tmp_path, recorder):
    from hearthlm.quant import quantize_model

    report = quantize_model(Path(tiny.path("llama")), "q4_k_m", tmp_path / "t.gguf", progress=True)
    bar = recorder.bars[-1]
    assert bar["desc"] == "quantizing to q4_k_m" and bar["total"] == len(report.tensors) == sum(bar["updates"])
    assert len(bar["postfix"]) == len(report.tensors) and " -> " in bar["postfix"][0] and bar["closed"]
    lines = report.breakdown()
    assert lines[0].startswith(f"{report.bits_per_weight:.2f} bits/weight over the whole file")
    assert any("block matrices" in line for line in lines) and any("F32" in line for line in lines)

    calls = []  # a callback still works, and then no bar is drawn
    quantize_model(Path(tiny.path("llama")), "q8_0", tmp_path / "u.gguf", progress=lambda *a: calls.append(a))
    assert len(calls) == len(report.tensors) and recorder.bars[-1]["progress"] is False


def test_q4_k_m_of_the_default_model_says_why_it_is_6_17_bits(tmp_path):
    """SmolLM2's rows are 576 values, not a multiple of 256: Q4_K falls back to Q5_0 and the tied embedding (21% of
    the weights) to Q8_0 -- the breakdown names both. Types only: no tensor is quantized here."""
    from hearthlm.loader import resolve_model_path
    from hearthlm.quant.formats import TARGETS, tensor_type_why, type_nbytes
    from hearthlm.quant.sources import open_source
    from hearthlm.quant.writer import QuantizeReport

    src = open_source(resolve_model_path("smollm2"))
    tied = "output.weight" not in {t.name for t in src.tensors}
    report = QuantizeReport(tmp_path / "x.gguf", "q4_k_m", src.arch)
    for t in src.tensors:
        qtype, why = tensor_type_why(t.name, t.shape, TARGETS["q4_k_m"], src.n_layers, tied)
        n, nbytes = 1, type_nbytes(qtype, t.shape)
        for d in t.shape:
            n *= d
        report.tensors.append((t.name, qtype, n, nbytes, why))
        report.num_weights += n
        report.data_bytes += nbytes
    text = "\n".join(report.breakdown())
    assert text.startswith("6.17 bits/weight over the whole file")
    assert "Q4_K falls back to Q5_0" in text and "Q6_K falls back to Q8_0" in text
    assert "token embedding and output head: 8.50 bits/weight, 21.0% of the weights" in text
