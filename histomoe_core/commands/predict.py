"""``histomoe predict SLIDE --model BUNDLE``: predicted expression for a slide that has no transcriptomics.

examples:
  histomoe predict slide.svs --model bundles/her2st_AB --out pred/
  histomoe predict he.jpg --model b --um-per-px 0.5 --meta organ=Breast "cancer_type=HER2+ IDC" --out pred/
  histomoe predict he.jpg --model b --um-per-px 1.0 --spots tissue_positions.csv --out pred/

Writes ``OUT/predictions.h5ad``, ``OUT/predictions.zarr`` (SpatialData) and ``OUT/maps/*.png``; an interrupted
run resumes from the embedding cache.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from histomoe_core.errors import DataError
from histomoe_core.slide.tissue import TissueParams


def _meta(pairs: list[str]) -> dict[str, str]:
    out = {}
    for p in pairs:
        if "=" not in p or not p.split("=", 1)[0].strip():
            raise DataError(f"--meta {p!r}: write key=value, e.g. --meta organ=Breast")
        k, v = p.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def add_parser(sub: argparse._SubParsersAction) -> None:
    from histomoe_core.commands.options import HELP, positive_float, positive_int

    what = "predict expression for a slide (JPEG/PNG/TIFF/SVS/NDPI) with a model bundle"
    p = sub.add_parser("predict", help=what, description=what[0].upper() + what[1:] + "; writes an h5ad, a "
                       "SpatialData zarr and PNG maps.", epilog="examples:" + __doc__.split("examples:", 1)[1], **HELP)
    p.add_argument("slide", type=Path, help="slide image: JPEG, PNG, TIFF (pyramidal or not), SVS, NDPI, ...")
    p.add_argument("--model", required=True, type=Path, help="bundle folder written by `histomoe train`")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--meta", nargs="+", default=[], metavar="KEY=VALUE", help="slide metadata, e.g. organ=Breast")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--grid", action="store_true", help="spots on a grid at the patch spacing over tissue (default)")
    where.add_argument("--spots", type=Path, default=None,
                       help="CSV of spot centres (x, y in level-0 px) or a Space Ranger tissue_positions file")
    p.add_argument("--um-per-px", type=positive_float, default=None, help="pixel size at level 0 (when the file lacks it)")
    p.add_argument("--name", default=None, help="sample name (default: the file name's stem)")
    p.add_argument("--genes", nargs="+", default=None, help="genes to map as PNG (default: the panel's first 4)")
    p.add_argument("--no-zarr", action="store_true", help="skip the SpatialData zarr")
    p.add_argument("--batch-size", type=positive_int, default=32,
                   help="patches per encoder call (32: peak RSS about 2 GB on a CPU at full speed; 64 about 2.8 GB)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    d = TissueParams()
    t = p.add_argument_group("tissue detection (grid mode)")
    t.add_argument("--thumb-px", type=int, default=d.thumb_px, help="thumbnail size the mask is computed on")
    t.add_argument("--min-saturation", type=float, default=d.min_saturation, help="lowest Otsu threshold")
    t.add_argument("--min-object-um2", type=float, default=d.min_object_um2, help="drop tissue pieces smaller than this")
    t.add_argument("--hole-um2", type=float, default=d.hole_um2, help="fill holes smaller than this")
    t.add_argument("--closing-um", type=float, default=d.closing_um, help="closing radius joining nearby tissue")
    t.add_argument("--min-tissue", type=float, default=d.min_tissue, help="share of a patch that must be tissue")
    p.set_defaults(func=run)


def run(args) -> int:
    from histomoe_core.bundle import load_bundle
    from histomoe_core.slide.outputs import write_outputs
    from histomoe_core.slide.predict import predict_slide, read_spots

    meta = _meta(args.meta)
    bundle = load_bundle(args.model)
    spots = read_spots(args.spots) if args.spots is not None else None
    tissue = TissueParams(thumb_px=args.thumb_px, min_saturation=args.min_saturation,
                          min_object_um2=args.min_object_um2, hole_um2=args.hole_um2, closing_um=args.closing_um,
                          min_tissue=args.min_tissue)
    pred = predict_slide(args.slide, bundle, spots=spots, meta=meta, um_per_px=args.um_per_px, tissue=tissue,
                         batch_size=args.batch_size, device=args.device, progress=not args.no_progress,
                         name=args.name)
    files = write_outputs(pred, args.out, genes=args.genes, zarr=not args.no_zarr)
    a = pred.adata
    print(f"{args.slide.name}: {a.n_obs} spots x {a.n_vars} genes ({pred.info['mode']}, "
          f"{pred.info['um_per_px']:.4g} µm/px, {pred.info['backend']})")
    e = pred.info["embedding"]
    if e["n_patches"]:
        print(f"  embedded {e['n_patches']} patches in {e['seconds']:.1f} s ({e['n_patches'] / e['seconds']:.1f} patches/s)")
    for k, v in files.items():
        print(f"  {k}: {v}")
    return 0
