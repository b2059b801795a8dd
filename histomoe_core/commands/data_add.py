"""``histomoe data add NAME --spaceranger DIR [DIR ...] | --h5ad FILE --image IMG --um-per-px X``: register your
own dataset (validated now, then usable by name in ``embed``, ``benchmark`` and the book's ``dataset``)."""
from __future__ import annotations

import argparse


EXAMPLES = """examples:
  histomoe data add my_visium --spaceranger run1/outs run2/outs --species human --organ Kidney
  histomoe data add my_h5ad --h5ad spots.h5ad --image slide.tif --um-per-px 0.5 --species mouse --organ Brain"""


def add_parser(verbs: argparse._SubParsersAction) -> None:
    from histomoe_core.commands.options import HELP, positive_float

    what = "register your own dataset from Space Ranger folders or an AnnData (.h5ad)"
    a = verbs.add_parser("add", help=what, description=what[0].upper() + what[1:] + ": validated now, then usable "
                         "by name in embed, benchmark and the book's dataset parameter.", epilog=EXAMPLES, **HELP)
    a.add_argument("name", help="the name to register the dataset under")
    src = a.add_mutually_exclusive_group(required=True)
    src.add_argument("--spaceranger", nargs="+", metavar="DIR", help="Space Ranger outs/ folders, one per section")
    src.add_argument("--h5ad", metavar="FILE", help="AnnData: raw counts, obsm['spatial'] spot x, y in image pixels")
    a.add_argument("--image", nargs="+", default=None,
                   help="with --h5ad: its H&E image (required); with --spaceranger: full-resolution images, one per folder (default: hires)")
    a.add_argument("--um-per-px", type=positive_float, default=None, help="image pixel size (required with --h5ad; Visium: from the spot spacing)")
    a.add_argument("--species", required=True, choices=["human", "mouse"], help="species of every section's genes")
    a.add_argument("--patients", nargs="+", default=None, help="split group per section (default: the section)")
    for key in ("organ", "tissue", "disease-state", "cancer-type", "preservation", "technology"):
        a.add_argument(f"--{key}", default=None, help=f"the sections' {key.replace('-', ' ')} (metadata and context)")
    a.set_defaults(func=_add)


def _add(args) -> int:
    from histomoe_core.data import userdata
    from histomoe_core.data.summary import summary_table
    from histomoe_core.errors import DataError

    context = {k: getattr(args, k) for k in ("organ", "tissue", "disease_state", "cancer_type", "preservation", "technology")}
    if args.spaceranger:
        samples = userdata.register_spaceranger(args.name, args.spaceranger, species=args.species, patients=args.patients,
                                                um_per_px=args.um_per_px, image=args.image or "hires", **context)
    else:
        if not args.image or args.um_per_px is None:
            raise DataError("--h5ad needs --image (the H&E the coordinates refer to) and --um-per-px")
        samples = userdata.register_anndata(args.name, args.h5ad, image=args.image[0], um_per_px=args.um_per_px,
                                            species=args.species, patient=(args.patients or [None])[0], **context)
    print(summary_table(samples).to_string())
    print(f"\nregistered {args.name!r} ({len(samples)} sections): {userdata.registry_dir() / args.name}.yaml")
    return 0
