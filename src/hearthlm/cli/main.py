"""`hearth` command line: serve, run, pull, list, show, rm, ps, bench, plan, quantize, perplexity.

Building the parser imports no torch, uvicorn or transformers: each subcommand module imports its heavy
dependencies inside its run function (tests/test_cold_start.py checks), so --help and --version are instant."""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from ..errors import HearthError

# subcommand modules, each with add_parser(subparsers) that sets func=run
COMMANDS = ["run_cmd", "plan_cmd", "serve_cmd", "store_cmd", "bench_cmd", "quant_cmd"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hearth", description="Local-first LLM inference and serving")
    parser.add_argument("--version", action="version", version=f"hearth {version()}")
    parser.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING (default), ERROR")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"hearthlm.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"hearthlm.cli.{name}":
                continue
            raise
        module.add_parser(sub)
    return parser


def version() -> str:
    """The installed distribution's version (importlib.metadata: no hearthlm submodule, no torch)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("hearthlm")
    except PackageNotFoundError:  # run from a source tree that is not installed
        from .. import __version__

        return __version__


def _stdout_closed() -> int:
    """The reader of stdout went away (`hearth show smollm2 --template | head`): exit quietly like other CLI
    tools. stdout is pointed at /dev/null so the interpreter's final flush raises nothing either."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
    return 141  # 128 + SIGPIPE, what a shell reports for a killed writer


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        return _stdout_closed()


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, inside main, not in the interpreter's exit flush
        return code
    except HearthError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
