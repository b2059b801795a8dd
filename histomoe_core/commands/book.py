"""``histomoe book [--profile P] [--chapter NN ...] [-p key=value ...]``: execute the chapters and render the book.

examples:
  histomoe book --profile smoke --keep-going
  histomoe book --chapter 05 -p seed=1 --no-html
  histomoe book --list
"""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "book", help="execute the book's chapters with papermill and render the HTML (Jupyter Book)",
        description="Execute every chapter (or those given with --chapter) with the profile's parameters, "
        "reusing cached executions whose inputs did not change, then build book/_build/html.",
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--profile", default="her2st", help="book/configs/<profile>.yaml: smoke, her2st (default) or hest")
    p.add_argument("--chapter", "-c", action="append", metavar="NN", help="only this chapter (number or slug); repeatable")
    p.add_argument("-p", "--param", action="append", metavar="KEY=VALUE", help="override a chapter parameter, e.g. -p seed=1")
    p.add_argument("--force", action="store_true", help="execute even when a cached execution matches")
    p.add_argument("--keep-going", action="store_true",
                   help="after a failed chapter, run the others and build the HTML anyway (then exit with an error)")
    p.add_argument("--no-html", action="store_true", help="execute the chapters only; skip jupyter-book build")
    p.add_argument("--root", type=Path, default=None, help="book root (folder with _config.yml); default: found from the cwd")
    p.add_argument("--sync-toc", action="store_true", help="only rewrite _toc.yml and the Colab notebooks (book/notebooks/) from book/chapters/ and exit")
    p.add_argument("--list", action="store_true", help="list every chapter's parameters (default and profile value) and exit")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from histomoe_core.book import build_book, discover_chapters, find_root, parse_overrides, sync_colab, sync_toc

    if args.list:
        import pandas as pd

        from histomoe_core.book_reports import parameter_table

        with pd.option_context("display.width", 200, "display.max_rows", None, "display.max_colwidth", 60):
            print(parameter_table(args.profile, args.root).to_string())
        return 0
    if args.sync_toc:
        root = find_root(args.root)
        chapters = discover_chapters(root)
        if not sync_toc(root, chapters):
            print(f"[book] {root / '_toc.yml'} is up to date")
        if not sync_colab(root, chapters):
            print("[book] the Colab notebooks in book/notebooks/ are up to date")
        return 0
    result = build_book(
        args.profile, chapters=args.chapter, overrides=parse_overrides(args.param), root=args.root,
        html=not args.no_html, force=args.force, keep_going=args.keep_going,
    )
    done = {s: sum(r.status == s for r in result.runs) for s in ("executed", "cached", "kept", "missing")}
    print(f"[book] {done['executed']} executed, {done['cached']} from cache, {done['kept']} kept, "
          f"{done['missing']} missing; {result.seconds:.0f} s")
    return 0
