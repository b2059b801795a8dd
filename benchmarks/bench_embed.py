"""Embedding throughput: the encoder's ceiling vs the full pipeline from image files to cache, in one run.

    python benchmarks/bench_embed.py                       # her2st, efficientnet_lite0, every section
    python benchmarks/bench_embed.py --sections B4 C2 --encoder resnet18
    python benchmarks/bench_embed.py --dataset tissues     # the multi-tissue collection (23 sections)
    python benchmarks/bench_embed.py --dataset ffpe_analysis --sections V10F24-078_B1   # one big Visium section
    python benchmarks/bench_embed.py --patch-threads 0 1 --repeats 2   # HISTOMOE_PATCH_THREADS settings compared

(a) ceiling: the forward pass alone on patches already decoded and normalised in memory (``inference_mode``,
    ``channels_last``, bf16 autocast on GPU, the same allocator setting), measured just before AND just after
    (b), and averaged, so a change in machine load during the run shows up (both are printed);
(b) pipeline: :func:`histomoe_core.embed.run_embedding` on every section into a cold temporary cache, as
    ``histomoe embed`` runs it: decode each slide and cut its patches in a background thread (the next slide
    decodes while the encoder works on the last one), resize and normalise them (on a CPU in the encoder's thread,
    between forwards), embed, write chunk and sample files.
Both use the same batch size and the encoder's CPU thread count (``HISTOMOE_EMBED_THREADS``). With several
``--patch-threads`` settings or ``--repeats``, the pipeline runs are interleaved with ceiling measurements
(ceiling, run, ceiling, run, ceiling, ...) and each run is compared with the mean of the ceilings on either
side of it, so a change in machine load shows up as disagreeing ceilings rather than as a false ratio.
Prints, per run, both rates in patches/s, their ratio (goal >= 0.85), the same ratio in CPU time per patch
(less sensitive to other programs sharing the machine), how long the encoder waited for patches, and the peak
resident memory of the pipeline (goal < 4 GB while a 9k x 10k px her2st section is embedded), and what the
machine did meanwhile (CPU idle, system and stolen shares; page faults; voluntary context switches, which show
threads blocking on each other); then the median ratio per setting. Not a test: the numbers depend on the machine
and on what else runs on it.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
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


class MachineUse:
    """What the machine did during a block: CPU shares from ``/proc/stat`` (idle, system, stolen by the host), and
    this process's minor page faults and voluntary context switches (a thread blocking: waiting for the GIL,
    an OpenMP worker going to sleep between parallel regions, a queue)."""

    def __enter__(self) -> "MachineUse":
        self._stat, self._ru = self._ticks(), resource.getrusage(resource.RUSAGE_SELF)
        return self

    @staticmethod
    def _ticks() -> list[int]:
        with open("/proc/stat") as f:
            return [int(v) for v in f.readline().split()[1:]]

    def __exit__(self, *exc) -> None:
        d = [b - a for a, b in zip(self._stat, self._ticks())]
        ru = resource.getrusage(resource.RUSAGE_SELF)
        total = sum(d) or 1
        idle, system, steal = d[3] + d[4], d[2], d[7] if len(d) > 7 else 0  # idle + iowait; steal: the host's
        self.shares = {"idle": idle / total, "system": system / total, "steal": steal / total}
        self.page_faults = ru.ru_minflt - self._ru.ru_minflt
        self.voluntary_switches = ru.ru_nvcsw - self._ru.ru_nvcsw


def slide_size(sample) -> str:
    from histomoe_core.data.patches import image_size

    if sample.image_path is None:
        return "patch file"
    w, h = image_size(sample.image_path)
    return f"{w} x {h} px"


def measure_ceiling(enc, big, batch_size: int, device) -> "object":
    from histomoe_core.embed_eval import forward_ceiling

    return forward_ceiling(enc, [big], batch_size=batch_size, n_patches=min(big.n_spots, 4 * batch_size),
                           device=device)


def pipeline_run(samples, enc, batch_size: int, device, patch_threads: int | None) -> dict:
    """One cold-cache pipeline run over every sample: wall and CPU seconds, patches, peak RSS, waits."""
    from histomoe_core.embed import run_embedding
    from histomoe_core.embed_eval import cpu_seconds, temporary_cache
    from histomoe_core.paths import environ

    env = {} if patch_threads is None else {"HISTOMOE_PATCH_THREADS": str(patch_threads)}
    with temporary_cache(), environ(**env):
        base = rss_mb()
        with PeakRSS() as peak, MachineUse() as use:
            t0, c0 = time.perf_counter(), cpu_seconds()
            _, st = run_embedding(samples, enc, batch_size=batch_size, device=device, progress=False)
            wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    return {"patch_threads": patch_threads, "n_patches": st.n_patches, "pipeline_seconds": wall, "cpu_seconds": cpu,
            "pipeline_patches_per_s": st.n_patches / wall, "forward_seconds": st.forward_s,
            "prepare_seconds": st.prepare_s,
            "starved_seconds": st.starved_s, "peak_rss_mb": peak.peak, "rss_before_mb": base,
            "cpu_shares": use.shares, "page_faults": use.page_faults, "voluntary_switches": use.voluntary_switches}


def compare(run: dict, before, after) -> dict:
    """The run's ratios to the mean of the ceilings measured just before and just after it."""
    ceil = (before.rate + after.rate) / 2
    cpu_per_patch_ceil = (before.cpu_s + after.cpu_s) / (before.n + after.n)
    return {**run, "ceiling_patches_per_s": ceil, "ceiling_before": before.rate, "ceiling_after": after.rate,
            "ratio": run["pipeline_patches_per_s"] / ceil,
            "cpu_time_ratio": cpu_per_patch_ceil / (run["cpu_seconds"] / run["n_patches"])}


def report(r: dict, label: str) -> None:
    print(f"[{label}] (a) ceiling {r['ceiling_patches_per_s']:7.1f} patches/s (before {r['ceiling_before']:.1f}, "
          f"after {r['ceiling_after']:.1f})")
    print(f"[{label}] (b) pipeline {r['pipeline_patches_per_s']:7.1f} patches/s ({r['n_patches']} patches in "
          f"{r['pipeline_seconds']:.1f} s; encoder busy {r['forward_seconds']:.1f} s, resizing and normalising "
          f"{r['prepare_seconds']:.1f} s, waited {r['starved_seconds']:.1f} s for patches)")
    print(f"[{label}] ratio (b)/(a) = {r['ratio']:.3f}   (goal >= 0.85: {'met' if r['ratio'] >= 0.85 else 'NOT met'});"
          f"  in CPU time per patch: {r['cpu_time_ratio']:.3f};  peak RSS {r['peak_rss_mb']:.0f} MB (before "
          f"{r['rss_before_mb']:.0f} MB; goal < 4096 MB: {'met' if r['peak_rss_mb'] < 4096 else 'NOT met'}); "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    sh = r["cpu_shares"]
    print(f"[{label}] during (b): CPU idle {sh['idle']:.1%}, system {sh['system']:.1%}, stolen by the host "
          f"{sh['steal']:.1%}; {r['page_faults']:,} minor page faults, {r['voluntary_switches']:,} voluntary context "
          f"switches", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="her2st")
    ap.add_argument("--encoder", default="efficientnet_lite0")
    ap.add_argument("--sections", nargs="+", default=None)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default=None)
    ap.add_argument("--patch-threads", nargs="+", type=int, default=[None],
                    help="HISTOMOE_PATCH_THREADS settings to run (default: the device's default)")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each setting, interleaved with ceilings")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from histomoe_core.data import load_dataset
    from histomoe_core.embed import embed_threads, patch_threads, resolve_device
    from histomoe_core.encoders import create_encoder

    samples = load_dataset(args.dataset, **({"sections": args.sections} if args.sections else {}))
    device = resolve_device(args.device)
    enc = create_encoder(args.encoder).to(device).eval().to(memory_format=torch.channels_last)
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, encoder threads {embed_threads(device)}, "
          f"device {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
          + f", default patch threads {patch_threads(device)}, load average {os.getloadavg()[0]:.1f}")
    print(f"data: {args.dataset}, {len(samples)} sections, {sum(s.n_spots for s in samples)} spots; encoder "
          f"{enc.name}, batch {args.batch_size}")
    big = max(samples, key=lambda s: s.image_path.stat().st_size if s.image_path else 0)
    print(f"ceiling on {min(big.n_spots, 4 * args.batch_size)} in-memory patches of the largest slide, "
          f"{big.sample_id} ({slide_size(big)})", flush=True)
    measure_ceiling(enc, big, args.batch_size, device)  # warm-up
    before = measure_ceiling(enc, big, args.batch_size, device)
    runs = []
    for rep in range(args.repeats):
        for pt in args.patch_threads:
            run = pipeline_run(samples, enc, args.batch_size, device, pt)
            after = measure_ceiling(enc, big, args.batch_size, device)
            runs.append(compare(run, before, after) | {"repeat": rep})
            before = after
            report(runs[-1], f"patch threads {patch_threads(device) if pt is None else pt}, run {rep + 1}")
    for pt in args.patch_threads:
        mine = [r["ratio"] for r in runs if r["patch_threads"] == pt]
        cpu = [r["cpu_time_ratio"] for r in runs if r["patch_threads"] == pt]
        print(f"{args.dataset}, patch threads {patch_threads(device) if pt is None else pt}: median ratio "
              f"{statistics.median(mine):.3f} over {len(mine)} run(s) ({', '.join(f'{x:.3f}' for x in mine)}); "
              f"CPU-time ratio {statistics.median(cpu):.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"dataset": args.dataset, "encoder": enc.name, "device": str(device),
                                               "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
