"""``histomoe data list | fetch NAME | verify NAME | summary NAME | add NAME``.

examples:
  histomoe data list
  histomoe data fetch her2st
  histomoe data fetch hest1k --task LUNG
  histomoe data verify her2st
  histomoe data summary her2st
  histomoe data summary hest --samples TENX95 TENX99
  histomoe data summary ffpe_analysis --sections V19D02-085_B1
  histomoe data add my_visium --spaceranger path/to/outs --species human --organ Kidney
"""
from __future__ import annotations

import argparse

VERBS = {
    "list": "datasets with a manifest, and every dataset name the other commands accept",
    "fetch": "copy a dataset from a mirror or download it, and verify every file (--sections; HEST: --task / --samples)",
    "verify": "check the sha256 of every file of a fetched dataset (--sections; HEST: --task / --samples)",
    "summary": "sections, patients, spots, genes, µm/px and image sizes of a dataset",
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    from histomoe_core.commands.options import HELP, add_selection

    p = sub.add_parser("data", help="list, fetch, verify, summarise and add datasets",
                       description="Datasets: " + "; ".join(f"{v} = {t}" for v, t in VERBS.items()) + ".",
                       epilog=__doc__.split("\n\n", 1)[1] + _names_line(), **HELP)
    verbs = p.add_subparsers(dest="verb", required=True)
    for verb, fn in (("list", _list), ("fetch", _fetch), ("verify", _verify), ("summary", _summary)):
        example = [line for line in __doc__.splitlines() if line.startswith(f"  histomoe data {verb}")]
        v = verbs.add_parser(verb, help=VERBS[verb], description=VERBS[verb] + ".",
                             epilog="examples:\n" + "\n".join(example), **HELP)
        if verb != "list":
            v.add_argument("name", help="dataset name (see `histomoe data list`)")
            add_selection(v)
        v.set_defaults(func=fn)
    from histomoe_core.commands.data_add import add_parser as add_add

    add_add(verbs)


def _names_line() -> str:
    try:
        from histomoe_core.commands.options import dataset_names

        return "\n\ndataset names: " + ", ".join(dataset_names())
    except Exception:  # --help must work even when an adapter cannot be imported
        return ""


def _list(args) -> int:
    from histomoe_core.commands.options import dataset_names
    from histomoe_core.data import userdata
    from histomoe_core.data.manifests import list_manifests, load_manifest

    for name in list_manifests():
        m = load_manifest(name)
        print(f"{name:22s} {m.source.get('kind'):12s} {m.title}")
    for name in userdata.registered():
        print(f"{name:22s} {'registered':12s} {userdata.registry_dir() / name}.yaml")
    print(f"\ndataset names for embed / benchmark / data summary: {', '.join(dataset_names())}")
    return 0


def _manifest_name(name: str) -> str:
    """The manifest of a dataset name (``hest`` -> ``hest1k``); unknown names list the known ones."""
    from histomoe_core.data.manifests import list_manifests
    from histomoe_core.data.sources import ALIASES
    from histomoe_core.errors import UnknownNameError

    manifests = list_manifests()
    if name in manifests:
        return name
    by_source = {v: k for k, v in ALIASES.items() if k in manifests}
    if name in by_source:
        return by_source[name]
    raise UnknownNameError(f"unknown dataset {name!r}; datasets with a manifest: {', '.join(manifests)}")


def _hest_ids(args) -> list[str] | None:
    """Sample ids named by ``--task`` / ``--samples`` (None: the command's default)."""
    from histomoe_core.data.hest import hest_task
    from histomoe_core.errors import DataError

    if args.task is None:
        return list(args.samples) if args.samples else None
    task = hest_task(args.task)
    outside = sorted(set(args.samples or ()) - set(task["samples"]))
    if outside:
        raise DataError(f"samples {outside} are not part of HEST-Bench task {task['name']}; "
                        f"its samples: {', '.join(task['samples'])}")
    return list(args.samples) if args.samples else task["samples"]


def _check_selection(args, manifest: str) -> None:
    from histomoe_core.errors import HistoMoEError

    if manifest != "hest1k" and args.task:
        raise HistoMoEError(f"--task applies to hest1k only; {manifest} has sections, not tasks (use --sections)")


def _fetch(args) -> int:
    from histomoe_core.data.fetch import fetch

    name = _manifest_name(args.name)
    _check_selection(args, name)
    if name == "hest1k":
        from histomoe_core.data.hest import fetch_hest

        print(fetch_hest(None, _hest_ids(args)))
        return 0
    print(fetch(name, sections=args.samples))
    return 0


def _verify(args) -> int:
    from histomoe_core.data.fetch import verify
    from histomoe_core.errors import FetchError

    name = _manifest_name(args.name)
    _check_selection(args, name)
    if name == "hest1k":
        from histomoe_core.data.hest import verify_hest

        rows = verify_hest(_hest_ids(args))
    else:
        rows = verify(name, sections=args.samples)
    if not rows:
        raise FetchError(f"{name}: no files to verify (its manifest lists none); fetch it first with "
                         f"`histomoe data fetch {name}`")
    for path, status in rows:
        print(f"{status:10s} {path}")
    bad = [r for r in rows if r[1] not in ("ok", "present")]
    print(f"{len(rows) - len(bad)}/{len(rows)} files ok")
    return 1 if bad else 0


def _summary(args) -> int:
    import pandas as pd

    from histomoe_core.commands.options import check_dataset, load_selected, selection_options
    from histomoe_core.data.summary import summary_table

    check_dataset(args.name)
    selection_options(args.name, args.task, args.samples)
    samples = load_selected(args.name, args.task, args.samples)
    table = summary_table(samples)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.to_string())
    print(f"\n{len(samples)} sections, {len(samples.patients)} patients ({', '.join(samples.patients)}), "
          f"{int(table['spots'].sum())} spots")
    return 0
