"""``histomoe embed DATASET --encoder NAME``: fill the embedding cache (resumable; works under torchrun).

examples:
  histomoe embed her2st --encoder efficientnet_lite0
  histomoe embed her2st --samples A1 B1 --batch-size 32 --no-progress
  histomoe embed hest --task LUNG --encoder hf-hub:MahmoodLab/UNI
  python -m torch.distributed.run --nproc_per_node 2 -m histomoe_core.cli embed her2st --encoder tiny
"""
from __future__ import annotations

import argparse
import os
import time


def add_parser(sub: argparse._SubParsersAction) -> None:
    from histomoe_core.commands.options import HELP, add_selection, positive_float, positive_int

    p = sub.add_parser("embed", help="embed every spot of a dataset into the cache (resumable, torchrun-aware)",
                       description="Embed the patch of every spot with a vision encoder into the embedding cache; "
                       "a re-run reads the cache, a killed run resumes.", epilog=__doc__.split("\n\n", 1)[1], **HELP)
    p.add_argument("dataset", help="dataset name (see `histomoe data list`), e.g. her2st, hest, synthetic")
    p.add_argument("--encoder", default="efficientnet_lite0",
                   help="efficientnet_lite0/1/2, tiny, any timm name (random init) or hf-hub:org/name")
    add_selection(p)
    p.add_argument("--batch-size", type=positive_int, default=64, help="patches per encoder call (default 64)")
    p.add_argument("--size-um", type=positive_float, default=None, help="patch width in micrometres (default 112)")
    p.add_argument("--out-px", type=positive_int, default=None, help="patch size in pixels fed to the encoder (default 224)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: GPU if available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    from histomoe_core.commands.options import check_dataset, check_device, load_selected, selection_options

    check_dataset(args.dataset)
    selection_options(args.dataset, args.task, args.samples)
    check_device(args.device)
    import torch.distributed as dist

    from histomoe_core.data.patches import PatchSpec
    from histomoe_core.embed import dist_info, run_embedding

    started_group = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")  # a barrier is all the ranks share; gloo works with and without GPUs
        started_group = True
    try:
        t0 = time.perf_counter()
        samples = load_selected(args.dataset, args.task, args.samples)
        spec = PatchSpec(**{k: v for k, v in (("size_um", args.size_um), ("out_px", args.out_px)) if v is not None})
        emb, stats = run_embedding(samples, args.encoder, spec=spec, batch_size=args.batch_size, device=args.device,
                                   progress=not args.no_progress)
        rank, world = dist_info()
        if rank == 0:
            dim = next(iter(emb.values())).shape[1] if emb else 0
            n = sum(len(v) for v in emb.values())
            weights = "pretrained" if stats.pretrained else "RANDOM INIT, not pretrained"
            print(f"{args.dataset}: {len(emb)} samples, {n} spots x {dim} ({stats.encoder}, {weights}; cache key {stats.key})")
            print(f"  read from cache: {len(stats.cached)}  computed: {len(stats.computed)}  resumed: {len(stats.resumed)}"
                  + (f"  ({world} ranks)" if world > 1 else ""))
            if stats.n_patches:
                print(f"  embedded {stats.n_patches} patches in {stats.seconds:.1f} s ({stats.patches_per_s:.1f} patches/s on rank 0)")
            print(f"  total {time.perf_counter() - t0:.1f} s")
    finally:
        if started_group:
            dist.destroy_process_group()
    return 0
