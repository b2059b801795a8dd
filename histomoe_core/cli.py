"""``histomoe`` command line. Each sub-command lives in ``histomoe_core/commands/<name>.py`` and exposes
``add_parser(subparsers)``, which registers its parser with ``func=<callable(args) -> int>``."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from histomoe_core.errors import HistoMoEError

#: sub-command modules, in the order ``histomoe --help`` lists them
COMMANDS = ["data", "embed", "benchmark", "train", "predict", "inspect", "book"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="histomoe", description="HistoMoE: spatial expression from H&E with a mixture of experts")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"histomoe_core.commands.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", os.environ.get("HISTOMOE_OFFLINE", "0") if os.environ.get("HISTOMOE_OFFLINE") else os.environ.get("HF_HUB_OFFLINE", "0"))
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except HistoMoEError as exc:
        print(f"histomoe: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
