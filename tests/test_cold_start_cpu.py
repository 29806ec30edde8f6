"""CPU start-up: `from hearthlm import LLM` does not import Triton in a process with no CUDA device (it is only
imported where a kernel can run: a CUDA device, or TRITON_INTERPRET=1)."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device: Triton is wanted")
def test_import_does_not_import_triton():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import sys\nfrom hearthlm import LLM\nimport hearthlm.llm, hearthlm.loader.load, hearthlm.kernels\n"
            "print('triton' in sys.modules, hearthlm.kernels.HAS_TRITON)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["False", "False"], out.stdout + out.stderr


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device: Triton is wanted")
def test_interpreter_still_gets_triton():
    """The session's TRITON_INTERPRET=1 child (kernels/conftest.py) imports hearthlm.kernels first: did triton come?"""
    from .kernels.conftest import interpreter_child

    child = interpreter_child()
    assert child.imports == [True, True], child.start_output
