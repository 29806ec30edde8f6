"""`hearth pull | list (ls) | show | rm | ps`: the model store and the running server, Ollama-style."""
from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from typing import Any


def add_parser(sub) -> None:
    p = sub.add_parser("pull", help="download a model into the store (HF repo id, .gguf URL or local path)")
    p.add_argument("ref", help="org/name, org/name:Q4_K_M, org/name:file.gguf, https://.../x.gguf, or a path")
    p.add_argument("--name", default=None, help="store name (default: the repo id or file name)")
    p.add_argument("--revision", default=None, help="HF branch, tag or commit")
    p.add_argument("--sha256", default=None, help="expected sha256 (URLs and local files)")
    p.set_defaults(func=pull_cmd)
    p = sub.add_parser("list", aliases=["ls"], help="list models in the store")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=list_cmd)
    p = sub.add_parser("show", help="architecture, parameters, quantization, context, template, license")
    p.add_argument("model")
    p.add_argument("--template", action="store_true", help="print only the chat template")
    p.add_argument("--json", action="store_true")
    p.add_argument("--verify", action="store_true", help="recheck every file's sha256 against the manifest")
    p.set_defaults(func=show_cmd)
    p = sub.add_parser("rm", help="delete models from the store")
    p.add_argument("models", nargs="+")
    p.set_defaults(func=rm_cmd)
    p = sub.add_parser("ps", help="models loaded by the running server, and their memory")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=ps_cmd)


def _rich() -> Any:
    """rich's Console when installed and stdout is a terminal; plain text otherwise (pipes, scripts)."""
    if not sys.stdout.isatty():
        return None
    try:
        from rich.console import Console
    except ImportError:
        return None
    return Console()


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def ago(ts: float) -> str:
    s = max(0, time.time() - ts)
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if s >= size:
            k = int(s // size)
            return f"{k} {unit}{'s' if k > 1 else ''} ago"
    return "just now"


def until(expires_at: str | None, now: float | None = None) -> str:
    """/api/ps's expires_at (ISO 8601) as Ollama's UNTIL column says it: '4 minutes from now', 'Forever'."""
    from datetime import datetime

    if not expires_at:
        return "Forever"
    try:
        ts = datetime.fromisoformat(str(expires_at).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return str(expires_at)
    s = ts - (time.time() if now is None else now)
    if s > 50 * 365 * 86400:  # the server says "a century from now" for keep_alive -1
        return "Forever"
    if s <= 0:
        return "Stopping..."
    if s < 1:
        return "Less than a second from now"
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1)):
        if s >= size:
            k = int(s // size)
            return f"{k} {unit}{'s' if k > 1 else ''} from now"
    return "Less than a second from now"


def table(headers: list[str], rows: list[list[str]]) -> None:
    console = _rich()
    if console is not None:
        from rich.table import Table

        t = Table(box=None, header_style="bold", show_header=any(headers))
        for h in headers:
            t.add_column(h)
        for r in rows:
            t.add_row(*r)
        console.print(t)
        return
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    for r in [headers, *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip())


class _Progress:
    """Per-file byte progress: rich on a terminal, else tqdm (which stays quiet off a terminal)."""

    def __init__(self) -> None:
        self.bars: dict[str, Any] = {}
        self.rich = None
        if _rich() is not None or sys.stderr.isatty():
            try:
                from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                           TransferSpeedColumn)

                self.rich = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                     TransferSpeedColumn(), TimeRemainingColumn())
            except ImportError:
                pass

    def __enter__(self) -> _Progress:
        if self.rich is not None:
            self.rich.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.rich is not None:
            self.rich.stop()
        for bar in self.bars.values():
            if self.rich is None:
                bar.close()

    def __call__(self, name: str, done: int, total: int | None) -> None:
        if name not in self.bars:
            if self.rich is not None:
                self.bars[name] = self.rich.add_task(name, total=total)
            else:
                from tqdm import tqdm

                self.bars[name] = tqdm(total=total, desc=name, unit="B", unit_scale=True, disable=None)
        bar = self.bars[name]
        if self.rich is not None:
            self.rich.update(bar, completed=done, total=total)
        else:
            bar.total = total
            bar.update(done - bar.n)


def _recover() -> None:
    """Finish or undo a re-pull that a crash interrupted and drop day-old partial downloads (store.recover_store)."""
    from ..store import recover_store

    for line in recover_store():
        print(f"store: {line}", file=sys.stderr)


def pull_cmd(args: argparse.Namespace) -> int:
    """The local user is trusted: any local path, file:// or http(s) URL (no host restrictions, unlike the
    server's /api/pull); names are still checked so every write stays inside the store."""
    from ..store import pull

    _recover()
    with _Progress() as progress:
        path = pull(args.ref, progress, name=args.name, revision=args.revision, sha256=args.sha256)
    print(f"pulled {args.name or args.ref} -> {path}")
    return 0


def list_cmd(args: argparse.Namespace) -> int:
    from ..store import list_models

    _recover()
    models = list_models()
    if args.json:
        print(json.dumps([m.to_dict() for m in models], indent=2))
        return 0
    rows = [[m.name, human_bytes(m.size_bytes), m.format, m.quantization, m.parameter_size or "-",
             "embedded" if m.embedded else ago(m.modified)] for m in models]
    table(["NAME", "SIZE", "FORMAT", "QUANT", "PARAMS", "MODIFIED"], rows)
    return 0


def show_cmd(args: argparse.Namespace) -> int:
    from ..store import show_model, verify

    _recover()
    info = show_model(args.model)
    if args.template:
        if not info.get("chat_template"):
            print(f"error: {info['name']} has no chat template", file=sys.stderr)
            return 1
        print(info["chat_template"])
        return 0
    if args.verify:
        bad = verify(args.model)
        info["verified"] = not bad
        if bad:
            print(f"error: {', '.join(bad)} differ from the sha256 recorded at pull time: "
                  f"`hearth rm {args.model}` and pull it again", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    template = info.get("chat_template")
    rows = [["name", info["name"]], ["architecture", info["architecture"]],
            ["parameters", f"{info['parameter_size']} ({info['parameters']:,})" if info["parameters"] else "-"],
            ["quantization", info["quantization"]], ["context length", str(info["context_length"] or "-")],
            ["embedding length", str(info["embedding_length"] or "-")], ["layers", str(info["num_layers"] or "-")],
            ["format", info["format"]], ["license", info["license"] or "-"],
            ["chat template", f"{len(template):,} chars (--template prints it)" if template else "none"],
            ["size on disk", human_bytes(info["size_bytes"])], ["path", info["path"]]]
    rows += [[k.replace("_", " "), str(info[k])] for k in ("source", "revision", "pulled_at", "verified")
             if info.get(k) is not None]
    if _rich() is not None:
        table(["", ""], rows)
    else:
        for k, v in rows:
            print(f"  {k:<17} {v}")
    return 0


def rm_cmd(args: argparse.Namespace) -> int:
    from ..store import remove

    _recover()
    for name in args.models:
        remove(name)
        print(f"deleted '{name}'")
    return 0


def ps_cmd(args: argparse.Namespace) -> int:
    from ..client import server_url

    url = server_url()
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"{url}/api/ps", timeout=3) as r:
            data = json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        print(f"error: the server at {url} answered /api/ps with HTTP {e.code}", file=sys.stderr)
        return 1
    except (OSError, ValueError):
        print(f"no hearth server is running at {url} (start one with `hearth serve`, or set HEARTH_HOST)")
        return 0
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    models = data.get("models", [])
    if not models:
        print(f"the server at {url} has no model loaded")
        return 0
    from ..plan.memory import gib  # the unit of `hearth plan` and the engine's start-up log

    rows = [[m.get("name") or m.get("model", "?"), gib(m.get("size") or 0), gib(m.get("size_vram") or 0),
             (m.get("details") or {}).get("quantization_level", "-"), until(m.get("expires_at"))] for m in models]
    table(["NAME", "MEMORY", "GPU MEMORY", "QUANT", "UNTIL"], rows)
    return 0
