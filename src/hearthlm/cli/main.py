"""`hearth` command line: serve, run, pull, list, show, rm, ps, bench, plan."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ..errors import HearthError

# subcommand modules, each with add_parser(subparsers) that sets func=run
COMMANDS = ["run_cmd", "plan_cmd", "serve_cmd", "store_cmd", "bench_cmd", "quant_cmd"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hearth", description="Local-first LLM inference and serving")
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except HearthError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
