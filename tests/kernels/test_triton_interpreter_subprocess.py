"""Run test_triton_interpreted.py in a fresh process with TRITON_INTERPRET=1 (CPU machines only)."""
from __future__ import annotations

from pathlib import Path

from .conftest import run_interpreted

INTERPRETED_FILE = Path(__file__).resolve().parent / "test_triton_interpreted.py"  # conftest: cases run here


def test_triton_kernels_under_interpreter() -> None:
    run_interpreted(INTERPRETED_FILE)
