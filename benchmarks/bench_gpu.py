"""The GPU path against the CPU path on real her2st sections: embeddings and training, on one machine.

    python benchmarks/bench_gpu.py                                   # fetched her2st, sections A1 B4 C2 C3
    python benchmarks/bench_gpu.py --root /data/her2st --json gpu.json

(a) embeddings: every spot of ``--sections`` embedded by ``--encoder`` on the CPU (float32) and on the GPU
    (bfloat16 autocast, ``channels_last``), each into its own cold cache; prints wall time, patches/s and how
    far the GPU embeddings are from the CPU ones (cosine similarity per spot, relative L2 error);
(b) throughput on the GPU: the encoder's forward ceiling against the whole pipeline on the largest section;
(c) training: the benchmark's models fit on the CPU and on the GPU (bfloat16 autocast) with the same seed, on
    the same CPU embeddings, training on every section but ``--test``'s patient; prints the HEST metric on
    the held-out section for both devices and the fit times.
Needs a CUDA device. Not a test: timings depend on the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch


def embed(samples, encoder: str, device: str, batch_size: int):
    from histomoe_core.embed import run_embedding
    from histomoe_core.embed_eval import temporary_cache

    with temporary_cache():
        t0 = time.perf_counter()
        emb, stats = run_embedding(samples, encoder, batch_size=batch_size, device=device, progress=False)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    return emb, {"seconds": wall, "patches": stats.n_patches, "patches_per_s": stats.n_patches / wall}


def closeness(a: dict, b: dict) -> dict:
    x = np.concatenate([a[k] for k in sorted(a)]).astype(np.float64)
    y = np.concatenate([b[k] for k in sorted(a)]).astype(np.float64)
    cos = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
    return {"cosine_min": float(cos.min()), "cosine_median": float(np.median(cos)),
            "relative_l2": float(np.linalg.norm(x - y) / np.linalg.norm(x))}


def train_compare(samples, emb, test: str, models: list[str], seed: int, device: str) -> list[dict]:
    from histomoe_core.benchmark import ABLATIONS, MODELS, TRAIN, centre_sections, create_model
    from histomoe_core.data.genes import select_panel
    from histomoe_core.data.splits import Fold
    from histomoe_core.evaluate import score
    from histomoe_core.features import fold_arrays, spot_table

    held = samples[test].patient
    fold = Fold(f"test_{held}", tuple(s.sample_id for s in samples if s.patient != held),
                tuple(s.sample_id for s in samples if s.patient == held))
    genes = select_panel([samples[i] for i in fold.train], n_genes=50, kind="log1p").index.tolist()
    train, test_data = fold_arrays(spot_table(samples, emb), samples, fold, genes=genes, kind="log1p")
    rows = []
    for name in models:
        spec = {**MODELS, **ABLATIONS}[name]
        for dev in ("cpu", device):
            est = create_model(spec, name=name, train={**TRAIN, "device": dev})
            t0 = time.perf_counter()
            est.fit(centre_sections(train), seed=seed)
            fit_s = time.perf_counter() - t0
            metrics, _, _ = score(test_data.y, est.predict(test_data), test_data.sample, test_data.genes)
            info = est.info() if hasattr(est, "info") else {}
            rows.append({"model": name, "device": dev, "fit_seconds": fit_s, "pearson": metrics["pearson"],
                         "best_epoch": info.get("best_epoch")})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=None, help="a her2st folder (default: fetch it)")
    ap.add_argument("--sections", nargs="+", default=["A1", "B4", "C2", "C3"])
    ap.add_argument("--test", default="B4", help="section whose patient is held out in (c)")
    ap.add_argument("--encoder", default="efficientnet_lite0")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--models", nargs="+", default=["moe_soft_mlp", "histomoe"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--device", default="cuda", help="the device compared with the CPU (cpu: a dry run of the script)")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark compares the GPU path with the CPU path")
    warnings.filterwarnings("ignore", message=".*randomly initialised.*")

    from histomoe_core.data.her2st import load_her2st
    from histomoe_core.embed_eval import throughput

    samples = load_her2st(sections=args.sections, root=args.root)
    gpu = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else args.device
    out: dict = {"gpu": gpu, "torch": torch.__version__, "cpus": os.cpu_count(),
                 "cpu_threads": torch.get_num_threads(), "sections": args.sections, "encoder": args.encoder}
    print(json.dumps(out), flush=True)
    cpu_emb, out["embed_cpu"] = embed(samples, args.encoder, "cpu", args.batch_size)
    embed([samples[0]], args.encoder, args.device, args.batch_size)  # warm-up: CUDA context, cuDNN autotuning
    gpu_emb, out["embed_gpu"] = embed(samples, args.encoder, args.device, args.batch_size)
    out["gpu_vs_cpu_embeddings"] = closeness(cpu_emb, gpu_emb)
    out["embed_speedup"] = out["embed_gpu"]["patches_per_s"] / out["embed_cpu"]["patches_per_s"]
    print(json.dumps({k: out[k] for k in ("embed_cpu", "embed_gpu", "gpu_vs_cpu_embeddings", "embed_speedup")}),
          flush=True)
    out["gpu_throughput"] = throughput(samples, args.encoder, batch_size=args.batch_size, device=args.device).to_dict()
    print(json.dumps(out["gpu_throughput"], default=str), flush=True)
    out["training"] = train_compare(samples, cpu_emb, args.test, args.models, args.seed, args.device)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
