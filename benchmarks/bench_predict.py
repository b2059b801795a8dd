"""Throughput and memory of ``histomoe predict`` on a large pyramidal slide (prints measured numbers).

Writes (once) a synthetic pyramidal TIFF of ``--side`` x ``--side`` px at ``--um-per-px`` (default 40,000 px at
0.25 µm/px, tiles of 512 px, levels 1, 2, 4, 8, 16; a textured tissue disc of radius side / ``--disc``), then runs
the grid prediction in a child process with a fresh cache and reports:

- patches/s of the embedding stage and its ratio to the encoder's forward ceiling, two ways: the share of the
  stage the encoder itself was running (the same forward passes at the same moment: robust when other work shares
  the CPU), and against the encoder alone on 256 of the slide's patches already in memory (``channels_last``,
  inference mode, measured in the same process just before and after; noisy on a shared machine), also in CPU
  time per patch;
- the child's peak RSS (the slide is read tile-wise at the level the patches need: no level is held whole).

    python benchmarks/bench_predict.py --bundle BUNDLE [--side 40000] [--disc 6] [--device cpu]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TILE = 512


def _tile(ty: int, tx: int, d: int, side: int, disc: float) -> np.ndarray:
    """The level-``d`` tile at (ty, tx): white glass, or textured stain inside the disc."""
    yy, xx = np.mgrid[ty * TILE : (ty + 1) * TILE, tx * TILE : (tx + 1) * TILE] * d
    inside = (xx - side / 2) ** 2 + (yy - side / 2) ** 2 < (side / disc) ** 2
    out = np.full((TILE, TILE, 3), 242, np.uint8)
    if inside.any():
        rng = np.random.default_rng([ty, tx, d])
        tex = rng.integers(-40, 40, (TILE // 16, TILE // 16, 1)).repeat(16, 0).repeat(16, 1)
        stain = np.clip(np.array([200, 110, 170]) + tex, 0, 255).astype(np.uint8)
        out[inside] = stain[inside]
    return out


def write_slide(path: Path, side: int, um_per_px: float, disc: float) -> Path:
    import tifffile

    levels = [1, 2, 4, 8, 16]
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for i, d in enumerate(levels):
            n = -(-side // d // TILE)
            tiles = (_tile(ty, tx, d, side, disc) for ty in range(n) for tx in range(n))
            kw = {"subifds": len(levels) - 1, "resolution": (1e4 / um_per_px, 1e4 / um_per_px),
                  "resolutionunit": "CENTIMETER"} if i == 0 else {"subfiletype": 1}
            tw.write(tiles, shape=(side // d, side // d, 3), dtype=np.uint8, tile=(TILE, TILE), photometric="rgb",
                     compression="zlib", compressionargs={"level": 1}, **kw)
    return path


def real_batches(slide_path: Path, bundle, n_patches: int, batch_size: int, device: str):
    """Normalised batches of the slide's own grid patches (read tile-wise), on the device."""
    from histomoe_core.data.patches import PatchSpec
    from histomoe_core.encoders import create_encoder
    from histomoe_core.slide.patches import SlidePatches
    from histomoe_core.slide.predict import slide_sample
    from histomoe_core.slide.reader import open_slide_image
    import pandas as pd

    enc = create_encoder(bundle.encoder)
    slide = open_slide_image(slide_path)
    step = PatchSpec(**bundle.patch).crop_px(slide.um_per_px)
    side = slide.size[0]
    ys = side / 2 + (np.arange(n_patches) - n_patches / 2) * step / 8  # overlapping patches across the centre
    xy = np.column_stack([np.full(n_patches, side / 2), ys])
    sample = slide_sample(slide_path, pd.DataFrame(xy, columns=["x", "y"]), slide.um_per_px, {})
    out = [enc.preprocess(p) for _, p in SlidePatches(slide).batches(sample, PatchSpec(**bundle.patch),
                                                                       batch_size=batch_size,
                                                                       indices=np.arange(n_patches))]
    slide.close()
    return enc, out


def forward_ceiling(enc, batches, device: str, reps: int = 2) -> tuple[float, float]:
    """``(patches/s, CPU s per patch)`` of the encoder alone on ready batches, after a warm-up batch (the same
    precision, memory format and allocator setting as the pipeline)."""
    import torch

    from histomoe_core.embed import malloc_for_inference, resolve_device
    from histomoe_core.embed_eval import cpu_seconds

    dev = resolve_device(device)
    enc = enc.to(dev).eval().to(memory_format=torch.channels_last)
    batches = [x.to(dev) for x in batches]
    n = reps * sum(len(x) for x in batches)
    with malloc_for_inference(), torch.inference_mode():
        enc(batches[0])
        t0, c0 = time.perf_counter(), cpu_seconds()
        for x in batches * reps:
            enc(x).float().cpu()
        return n / (time.perf_counter() - t0), (cpu_seconds() - c0) / n


def child(args) -> None:
    from histomoe_core.bundle import load_bundle
    from histomoe_core.embed_eval import cpu_seconds
    from histomoe_core.slide.predict import predict_slide

    b = load_bundle(args.bundle)
    enc, batches = real_batches(args.slide, b, 256, args.batch_size, args.device)
    before = forward_ceiling(enc, batches, args.device)
    t0, c0 = time.perf_counter(), cpu_seconds()
    pred = predict_slide(args.slide, b, device=args.device, progress=False, batch_size=args.batch_size)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    after = forward_ceiling(enc, batches, args.device)
    print(json.dumps({**pred.info["embedding"], "wall_s": wall, "cpu_s": cpu, "ceiling": [before, after],
                      "n_spots": pred.adata.n_obs, "level_downsamples": pred.info["downsamples"],
                      "crop_px": pred.info["crop_px"], "out_px": b.patch["out_px"], "encoder": b.encoder,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True, type=Path)
    ap.add_argument("--side", type=int, default=40_000)
    ap.add_argument("--um-per-px", type=float, default=0.25)
    ap.add_argument("--disc", type=float, default=6.0, help="tissue disc radius = side / disc")
    ap.add_argument("--slide", type=Path, default=None, help="slide file (written when missing)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args)
        return 0
    args.slide = args.slide or Path(tempfile.gettempdir()) / f"bench_slide_{args.side}_{args.disc:g}.tif"
    if not args.slide.exists():
        t0 = time.perf_counter()
        write_slide(args.slide, args.side, args.um_per_px, args.disc)
        print(f"wrote {args.slide} ({args.slide.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t0:.0f} s")
    env = {**os.environ, "HISTOMOE_HOME": tempfile.mkdtemp(prefix="bench-predict-")}
    cmd = [sys.executable, __file__, "--child", "--bundle", str(args.bundle), "--slide", str(args.slide),
           "--device", args.device, "--batch-size", str(args.batch_size)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode:
        print(res.stderr[-3000:])
        return res.returncode
    r = json.loads(res.stdout.strip().splitlines()[-1])
    ceiling = max(c[0] for c in r["ceiling"])  # the faster of the two: the ratio is not flattered by a slow moment
    cpu_ceiling = min(c[1] for c in r["ceiling"])
    rate = r["n_patches"] / r["seconds"]
    print(f"slide {args.side}x{args.side} px at {args.um_per_px} µm/px, levels {r['level_downsamples']}; "
          f"{r['n_spots']} grid spots, crop {r['crop_px']} px -> {r['out_px']} px")
    print(f"embedding: {r['n_patches']} patches in {r['seconds']:.1f} s = {rate:.1f} patches/s; the encoder ran "
          f"{r['forward_s']:.1f} s of it (waited for patches {r['starved_s']:.1f} s): ratio to the forward pass at "
          f"that moment {r['forward_s'] / r['seconds']:.3f}")
    print(f"encoder forward ceiling ({args.device}, batch {args.batch_size}, 256 of the slide's patches in memory, "
          f"before / after): {r['ceiling'][0][0]:.1f} / {r['ceiling'][1][0]:.1f} patches/s; ratio to the faster "
          f"{rate / ceiling:.3f}")
    print(f"CPU time per patch: whole predict {r['cpu_s'] / r['n_patches'] * 1e3:.1f} ms, encoder alone "
          f"{cpu_ceiling * 1e3:.1f} ms; ratio {cpu_ceiling * r['n_patches'] / r['cpu_s']:.3f}")
    print(f"predict wall time {r['wall_s']:.1f} s; peak RSS {r['peak_rss_mb']:.0f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
