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
    quiet = {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"} if getattr(args, "no_progress", False) else {}
    saved = {k: os.environ.get(k) for k in quiet}
    os.environ.update(quiet)  # every bar: ours, the hub's, and those of spawned workers
    try:
        return int(args.func(args) or 0)
    except HistoMoEError as exc:
        print(f"histomoe: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: worker pools are already killed; what was written whole stays
        print("histomoe: interrupted", file=sys.stderr)
        return 130
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


if __name__ == "__main__":
    sys.exit(main())
