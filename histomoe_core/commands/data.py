"""``histomoe data list | fetch NAME | verify NAME | summary NAME | add NAME``; ``--sections`` limits fetch, verify
and summary to some sections."""
from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="list, fetch, verify, summarise and add datasets")
    verbs = p.add_subparsers(dest="verb", required=True)
    verbs.add_parser("list", help="datasets with a manifest, and registered ones").set_defaults(func=_list)
    for verb, fn, text in (("fetch", _fetch, "fetch and verify a dataset"), ("verify", _verify, "check sha256 of every file"),
                           ("summary", _summary, "sections, patients, spots, genes, um/px, patch px, image sizes")):
        v = verbs.add_parser(verb, help=text)
        v.add_argument("name")
        v.add_argument("--sections", nargs="+", default=None, help="only these sections")
        v.set_defaults(func=fn)
    from histomoe_core.commands.data_add import add_parser as add_add

    add_add(verbs)


def _list(args) -> int:
    from histomoe_core.data import userdata
    from histomoe_core.data.manifests import list_manifests, load_manifest

    for name in list_manifests():
        m = load_manifest(name)
        print(f"{name:22s} {m.source.get('kind'):12s} {m.title}")
    for name in userdata.registered():
        print(f"{name:22s} {'registered':12s} {userdata.registry_dir() / name}.yaml")
    return 0


def _fetch(args) -> int:
    from histomoe_core.data.fetch import fetch

    print(fetch(args.name, sections=args.sections))
    return 0


def _verify(args) -> int:
    from histomoe_core.data.fetch import verify

    rows = verify(args.name, sections=args.sections)
    for path, status in rows:
        print(f"{status:10s} {path}")
    bad = [r for r in rows if r[1] != "ok"]
    print(f"{len(rows) - len(bad)}/{len(rows)} files ok")
    return 1 if bad else 0


def _summary(args) -> int:
    import pandas as pd

    from histomoe_core.data import load_dataset
    from histomoe_core.data.summary import summary_table

    samples = load_dataset(args.name, **({"sections": args.sections} if args.sections else {}))
    table = summary_table(samples)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.to_string())
    print(f"\n{len(samples)} sections, {len(samples.patients)} patients ({', '.join(samples.patients)}), "
          f"{int(table['spots'].sum())} spots")
    return 0
