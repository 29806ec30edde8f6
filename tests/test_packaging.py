"""A plain `pip install hearthlm` must be able to run `hearth serve` (the README's first command is followed by it)."""
from __future__ import annotations

import re
from importlib.metadata import requires


def test_server_dependencies_are_core():
    core = {re.split(r"[<>=!~ ;\[]", r)[0].lower().replace("-", "_") for r in requires("hearthlm") or []
            if "extra ==" not in r}
    assert {"fastapi", "uvicorn", "pydantic", "prometheus_client", "httpx"} <= core, core
