"""Cold start: `import hearthlm`, `hearth --help`, every subcommand's --help and `hearth --version` import no
torch, Triton, transformers or server modules (each in a fresh interpreter); the offline API imports no server
or transformers modules. Wall times are printed (run with -s), not asserted: the machine may be shared."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

SERVER = {"fastapi", "uvicorn", "starlette", "httpx", "httpcore", "anyio", "pydantic", "prometheus_client"}
HEAVY = {"torch", "triton", "transformers", "numpy", "gguf", "tokenizers", "jinja2"} | SERVER
PROBE = """
import sys
{code}
loaded = sorted({{m.split('.')[0] for m in sys.modules}} & {heavy!r})
print('LOADED:' + ','.join(loaded), file=sys.stderr)
"""
CLI = """
from hearthlm.cli.main import main
try:
    main({argv!r})
except SystemExit:
    pass
"""
COMMANDS = [["--help"], ["--version"], ["serve", "--help"], ["run", "--help"], ["plan", "--help"],
            ["bench", "--help"], ["quantize", "--help"], ["perplexity", "--help"], ["pull", "--help"],
            ["list", "--help"], ["show", "--help"], ["rm", "--help"], ["ps", "--help"]]


def loaded_by(code: str, heavy: set[str] = HEAVY) -> tuple[set[str], float]:
    """(heavy top-level packages imported by `code` in a fresh interpreter, wall seconds)."""
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", PROBE.format(code=code, heavy=heavy)], capture_output=True,
                         text=True, timeout=120)
    wall = time.perf_counter() - t
    line = next((ln for ln in out.stderr.splitlines() if ln.startswith("LOADED:")), None)
    assert line is not None, out.stderr
    return {m for m in line.removeprefix("LOADED:").split(",") if m}, wall


def test_import_hearthlm_is_light():
    loaded, wall = loaded_by("import hearthlm")
    print(f"\nimport hearthlm: {wall:.2f}s (interpreter start included)")
    assert not loaded, f"import hearthlm imported {sorted(loaded)}"


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda a: " ".join(a))
def test_help_and_version_import_no_torch(argv):
    loaded, wall = loaded_by(CLI.format(argv=argv))
    print(f"\nhearth {' '.join(argv)}: {wall:.2f}s")
    assert not loaded, f"hearth {' '.join(argv)} imported {sorted(loaded)}"


def test_offline_api_imports_no_server_or_transformers():
    loaded, wall = loaded_by("from hearthlm import LLM, SamplingParams")
    print(f"\nfrom hearthlm import LLM, SamplingParams: {wall:.2f}s; loaded {sorted(loaded)}")
    assert "torch" in loaded  # the engine needs it; nothing else on this list should come with it
    assert not loaded & (SERVER | {"transformers"}), sorted(loaded)
