"""Throughput and memory of ``histomoe predict`` on a large pyramidal slide (prints measured numbers).

Writes (once) a synthetic pyramidal TIFF of ``--side`` x ``--side`` px at ``--um-per-px`` (default 40,000 px at
0.25 um/px, tiles of 512 px, levels 1, 2, 4, 8, 16; a textured tissue disc of radius side / ``--disc``), then runs
the grid prediction in a child process with a fresh cache and reports:

- patches/s of the embedding stage and its ratio to the encoder's forward ceiling (the same encoder on a ready
  batch of the same shape, ``channels_last``, inference mode, on the same device);
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


def forward_ceiling(encoder: str, out_px: int, batch: int, device: str, reps: int = 8) -> float:
    """Patches/s of the encoder alone on a ready batch (no reading, no resizing, no cache writes)."""
    import torch

    from histomoe_core.embed import malloc_for_inference, resolve_device
    from histomoe_core.encoders import create_encoder

    dev = resolve_device(device)
    enc = create_encoder(encoder).to(dev).eval().to(memory_format=torch.channels_last)
    x = enc.preprocess(np.random.default_rng(0).integers(0, 255, (batch, out_px, out_px, 3), dtype=np.uint8)).to(dev)
    with malloc_for_inference(), torch.inference_mode():
        enc(x)
        t0 = time.perf_counter()
        for _ in range(reps):
            enc(x).float().cpu()
    return reps * batch / (time.perf_counter() - t0)


def child(args) -> None:
    from histomoe_core.bundle import load_bundle
    from histomoe_core.slide.predict import predict_slide

    b = load_bundle(args.bundle)
    before = forward_ceiling(b.encoder, b.patch["out_px"], args.batch_size, args.device)
    t0 = time.perf_counter()
    pred = predict_slide(args.slide, b, device=args.device, progress=False, batch_size=args.batch_size)
    wall = time.perf_counter() - t0
    after = forward_ceiling(b.encoder, b.patch["out_px"], args.batch_size, args.device)
    print(json.dumps({**pred.info["embedding"], "wall_s": wall, "ceiling": [before, after], "n_spots": pred.adata.n_obs,
                      "level_downsamples": pred.info["downsamples"], "crop_px": pred.info["crop_px"],
                      "out_px": b.patch["out_px"], "encoder": b.encoder,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True, type=Path)
    ap.add_argument("--side", type=int, default=40_000)
    ap.add_argument("--um-per-px", type=float, default=0.25)
    ap.add_argument("--disc", type=float, default=6.0, help="tissue disc radius = side / disc")
    ap.add_argument("--slide", type=Path, default=None, help="slide file (written when missing)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=64)
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
    ceiling = float(np.mean(r["ceiling"]))
    rate = r["n_patches"] / r["seconds"]
    print(f"slide {args.side}x{args.side} px at {args.um_per_px} um/px, levels {r['level_downsamples']}; "
          f"{r['n_spots']} grid spots, crop {r['crop_px']} px -> {r['out_px']} px")
    print(f"embedding: {r['n_patches']} patches in {r['seconds']:.1f} s = {rate:.1f} patches/s "
          f"(encoder busy {r['forward_s']:.1f} s, waited for patches {r['starved_s']:.1f} s)")
    print(f"encoder forward ceiling ({args.device}, batch {args.batch_size}, same process, before / after): "
          f"{r['ceiling'][0]:.1f} / {r['ceiling'][1]:.1f} patches/s; "
          f"ratio {rate / ceiling:.3f}")
    print(f"predict wall time {r['wall_s']:.1f} s; peak RSS {r['peak_rss_mb']:.0f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
