"""``histomoe train``: fit one model on chosen datasets / sections and write a model bundle.

examples:
  histomoe train --datasets her2st --exclude-patient C --model histomoe --out bundles/her2st_AB
  histomoe train --datasets her2st --sections A1 B4 C2 --model ridge_cv --out ridge.bundle
"""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    from histomoe_core.commands.options import HELP, positive_float, positive_int

    what = "fit a model on chosen sections and write a self-contained model bundle"
    p = sub.add_parser("train", help=what, description=what[0].upper() + what[1:] + " (see `histomoe predict`).",
                       epilog=__doc__.split("\n\n", 1)[1], **HELP)
    p.add_argument("--datasets", nargs="+", default=["her2st"], help="dataset names (default her2st)")
    p.add_argument("--sections", nargs="+", default=None, help="train on these sample ids only")
    p.add_argument("--exclude-patient", nargs="+", default=[], dest="exclude_patient",
                   help="leave these patients out (e.g. C, to predict them later)")
    p.add_argument("--model", default="histomoe", help="a benchmark model name (default histomoe: inner-CV choice)")
    p.add_argument("--target", default="log1p", choices=["log1p", "log1p_norm"], help="target kind (default log1p)")
    p.add_argument("--seed", type=int, default=0, help="training seed of neural models (default 0)")
    p.add_argument("--encoder", default=None, help="vision encoder (default: the dataset profile's)")
    p.add_argument("--text-encoder", default=None, help="metadata encoder (minilm or onehot)")
    p.add_argument("--n-genes", type=positive_int, default=None, help="panel size (default 50)")
    p.add_argument("--epochs", type=positive_int, default=None, help="maximum epochs of neural models (default: the profile's)")
    p.add_argument("--size-um", type=positive_float, default=None, help="patch width in micrometres (default 112)")
    p.add_argument("--out-px", type=positive_int, default=None, help="patch pixels fed to the encoder (default 224)")
    p.add_argument("--out", required=True, type=Path, help="bundle folder to write")
    p.set_defaults(func=run)


def run(args) -> int:
    from histomoe_core.bundle.fit import TrainRequest, describe, train_bundle

    req = TrainRequest(datasets=tuple(args.datasets), sections=tuple(args.sections) if args.sections else None,
                       exclude_patients=tuple(args.exclude_patient), model=args.model, target=args.target,
                       seed=args.seed, encoder=args.encoder, text_encoder=args.text_encoder, n_genes=args.n_genes,
                       epochs=args.epochs, patch=tuple((k, v) for k, v in (("size_um", args.size_um),
                                                                           ("out_px", args.out_px)) if v is not None))
    man = train_bundle(req, args.out)
    for line in describe(man):
        print(line)
    print(f"bundle: {args.out}")
    return 0
