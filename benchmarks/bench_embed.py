"""Embedding throughput: the encoder's ceiling vs the full pipeline from image files to cache, in one run.

    python benchmarks/bench_embed.py                       # her2st, efficientnet_lite0, every section
    python benchmarks/bench_embed.py --sections B4 C2 --encoder resnet18

(a) ceiling: the forward pass alone on patches already decoded and normalised in memory (``inference_mode``,
    ``channels_last``, bf16 autocast on GPU, the same allocator setting), measured just before AND just after
    (b), and averaged, so a change in machine load during the run shows up (both are printed);
(b) pipeline: :func:`histomoe_core.embed.run_embedding` on every section into a cold temporary cache, as
    ``histomoe embed`` runs it: decode each slide, crop, resize and normalise patches in a background thread
    (the next slide decodes while the encoder works on the last one), embed, write chunk and sample files.
Prints both in patches/s, their ratio (goal >= 0.85), the same ratio in CPU time (less sensitive to other
programs sharing the machine), how long the encoder waited for patches, and the peak resident memory of the
pipeline (goal < 4 GB while a 9k x 10k px her2st section is embedded).
Not a test: the numbers depend on the machine and on what else runs on it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import torch


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class PeakRSS:
    """Samples the resident set size every 20 ms in a thread."""

    def __init__(self) -> None:
        self.peak = 0.0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb())
            time.sleep(0.02)

    def __enter__(self) -> "PeakRSS":
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()


def slide_size(sample) -> str:
    from histomoe_core.data.patches import image_size

    if sample.image_path is None:
        return "patch file"
    w, h = image_size(sample.image_path)
    return f"{w} x {h} px"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="her2st")
    ap.add_argument("--encoder", default="efficientnet_lite0")
    ap.add_argument("--sections", nargs="+", default=None)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default=None)
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from histomoe_core.data import load_dataset
    from histomoe_core.embed import resolve_device, run_embedding
    from histomoe_core.embed_eval import cpu_seconds, forward_ceiling, temporary_cache
    from histomoe_core.encoders import create_encoder

    samples = load_dataset(args.dataset, **({"sections": args.sections} if args.sections else {}))
    device = resolve_device(args.device)
    enc = create_encoder(args.encoder).to(device).eval().to(memory_format=torch.channels_last)
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
          + f", load average {os.getloadavg()[0]:.1f}")
    print(f"data: {args.dataset}, {len(samples)} sections, {sum(s.n_spots for s in samples)} spots; encoder {enc.name}, "
          f"batch {args.batch_size}")
    big = max(samples, key=lambda s: s.image_path.stat().st_size if s.image_path else 0)
    n_ceil = min(big.n_spots, 4 * args.batch_size)
    forward_ceiling(enc, [big], batch_size=args.batch_size, n_patches=args.batch_size, device=device)  # warm-up
    before = forward_ceiling(enc, [big], batch_size=args.batch_size, n_patches=n_ceil, device=device)
    with temporary_cache():
        base = rss_mb()
        with PeakRSS() as peak:
            t0, c0 = time.perf_counter(), cpu_seconds()
            _, st = run_embedding(samples, enc, batch_size=args.batch_size, device=device, progress=False)
            wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    after = forward_ceiling(enc, [big], batch_size=args.batch_size, n_patches=n_ceil, device=device)

    ceil = (before.rate + after.rate) / 2
    pipe = st.n_patches / wall
    ratio = pipe / ceil
    cpu_per_patch_ceil = (before.cpu_s + after.cpu_s) / (before.n + after.n)
    cpu_ratio = cpu_per_patch_ceil / (cpu / st.n_patches)
    print(f"(a) ceiling  (forward on {n_ceil} in-memory {big.sample_id} patches): {ceil:7.1f} patches/s "
          f"(before {before.rate:.1f}, after {after.rate:.1f})")
    print(f"(b) pipeline (image files -> cache, {st.n_patches} patches in {wall:.1f} s): {pipe:7.1f} patches/s "
          f"(encoder busy {st.forward_s:.1f} s, waited {st.starved_s:.1f} s for patches)")
    print(f"ratio (b)/(a) = {ratio:.3f}   (goal >= 0.85: {'met' if ratio >= 0.85 else 'NOT met'});  "
          f"in CPU time per patch: {cpu_ratio:.3f}")
    print(f"peak RSS of the pipeline: {peak.peak:.0f} MB (process before: {base:.0f} MB; largest slide "
          f"{big.sample_id}, {slide_size(big)}; goal < 4096 MB: {'met' if peak.peak < 4096 else 'NOT met'}); "
          f"load average now {os.getloadavg()[0]:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "ceiling_patches_per_s": ceil, "pipeline_patches_per_s": pipe, "ratio": ratio, "cpu_time_ratio": cpu_ratio,
            "ceiling_before": before.rate, "ceiling_after": after.rate, "pipeline_seconds": wall,
            "forward_seconds": st.forward_s, "starved_seconds": st.starved_s,
            "peak_rss_mb": peak.peak, "encoder": enc.name, "device": str(device),
        }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
