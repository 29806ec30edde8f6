"""The README's supported-models table names exactly what the loader's registry accepts."""
from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _section() -> str:
    text = README.read_text()
    return text[text.index("<!-- models:begin -->"):text.index("<!-- models:end -->")]


def _rows() -> list[list[str]]:
    """The families table: the section's first table, header row dropped."""
    lines = _section().splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("|"))
    table = []
    for line in lines[first:]:
        if not line.startswith("|"):
            break
        if not line.startswith("|---"):
            table.append([c.strip() for c in line.strip().strip("|").split("|")])
    return table[1:]


def _names(cell: str) -> set[str]:
    return set(re.findall(r"`([^`]+)`", cell))


def test_every_hf_architecture_has_a_row_and_every_row_loads():
    from hearthlm.loader.hf_config import HF_FAMILIES
    from hearthlm.models.bert import ENCODER_TYPES

    rows = _rows()
    listed = set().union(*(_names(r[1]) for r in rows)) - {"model_type"}
    assert listed == set(HF_FAMILIES), listed ^ set(HF_FAMILIES)
    encoders = next(r[1] for r in rows if "`model_type`" in r[1]).split("`model_type`")[1]
    assert {t.strip() for t in encoders.split(",")} == set(ENCODER_TYPES)


def test_every_gguf_architecture_has_a_row():
    from hearthlm.loader.hf_config import GGUF_FAMILIES

    listed = set().union(*(_names(r[2]) for r in _rows()))
    assert listed == set(GGUF_FAMILIES), listed ^ set(GGUF_FAMILIES)


def test_gguf_tensor_types_line_is_the_loaders():
    from hearthlm.loader.gguf import SUPPORTED_TYPES

    line = next(ln for ln in _section().splitlines() if ln.startswith("GGUF tensor types:"))
    listed = {t.strip(" .") for t in line.split(":", 1)[1].split(",")}
    assert listed == set(SUPPORTED_TYPES), listed ^ set(SUPPORTED_TYPES)
