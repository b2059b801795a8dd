"""Validate ``histomoe predict`` on held-out her2st sections (prints measured numbers; no assertions).

1. held-out match: the bundle (``histomoe train --exclude-patient C``) predicts every section of patient C from
   its image at its own spots; the pooled HEST metric is set beside the benchmark's number for fold test_C
   (seed 0 and the mean over seeds) when a benchmark run of that fold exists in ``$HISTOMOE_HOME``;
2. grid: a grid prediction of one section, smoothed (Gaussian, sigma = one patch) at the measured spots,
   against the measured map (mean over genes of the Pearson r over spots);
3. uncertainty: Spearman of the per-spot uncertainty (expert disagreement) and of the trivial novelty score
   (distance to the nearest training embedding) with the per-spot squared error, and the error-retention curve
   (mean squared error of the most certain x % of spots) of both.

    python benchmarks/validate_predict.py --bundle BUNDLE [--grid-section C3] [--out validation.json]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

def held_out(bundle, patient: str):
    """Predictions, targets and uncertainty at the own spots of every section of ``patient``."""
    from histomoe_core.data import load_dataset
    from histomoe_core.data.targets import make_targets
    from histomoe_core.slide.predict import predict_sample

    samples = [s for s in load_dataset("her2st") if s.patient == patient]
    rows = []
    for s in samples:
        p = predict_sample(s, bundle, progress=False)
        rows.append((s, p.adata, make_targets(s.adata, bundle.genes, kind=bundle.manifest["target"])))
    return rows


def benchmark_reference(fold: str) -> dict | None:
    from histomoe_core.benchmark.results import find_runs

    for run in find_runs("her2st"):
        r = run.results
        r = r[(r["model"] == "histomoe") & (r["fold"] == fold) & (r["target"] == "log1p")]
        if len(r):
            return {"seed0": float(r[r["seed"] == 0]["pearson"].iloc[0]), "mean_over_seeds": float(r["pearson"].mean()),
                    "seeds": sorted(int(s) for s in r["seed"]), "run": str(run.path)}
    return None


def grid_correlation(bundle, section: str, *, sigma_patches: float = 1.0) -> dict:
    """Smoothed grid prediction vs the measured map of ``section``."""
    from histomoe_core.data import load_dataset
    from histomoe_core.data.targets import make_targets
    from histomoe_core.slide.predict import predict_slide
    from histomoe_core.slide.validation import map_correlation, smooth_at

    s = load_dataset("her2st", sections=[section])[0]
    t0 = time.perf_counter()
    p = predict_slide(s.image_path, bundle, um_per_px=s.pixel_size_um, name=f"{section}_grid", progress=False)
    secs = time.perf_counter() - t0
    sigma = sigma_patches * p.info["crop_px"]
    smooth, covered = smooth_at(np.asarray(p.adata.obsm["spatial"]), np.asarray(p.adata.X), s.coords, sigma=sigma)
    y = make_targets(s.adata, bundle.genes, kind=bundle.manifest["target"])
    return {"section": section, "grid_spots": int(p.adata.n_obs), "measured_spots_covered": int(covered.sum()),
            "measured_spots": int(s.n_spots), "r_mean_over_genes": map_correlation(y[covered], smooth[covered]),
            "sigma_px": float(sigma), "seconds": secs}


def main(argv=None) -> int:
    from histomoe_core.bundle import load_bundle
    from histomoe_core.evaluate import score
    from histomoe_core.slide.validation import uncertainty_report

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True, type=Path)
    ap.add_argument("--patient", default="C", help="the held-out patient (the bundle must exclude it)")
    ap.add_argument("--grid-section", default="C3")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    bundle = load_bundle(args.bundle)
    trained = {s["patient"] for s in bundle.manifest["provenance"]["sections"]}
    if args.patient in trained:
        raise SystemExit(f"the bundle was trained on patient {args.patient}; train it with --exclude-patient {args.patient}")
    rows = held_out(bundle, args.patient)
    y = np.concatenate([t for _, _, t in rows])
    p = np.concatenate([np.asarray(a.X) for _, a, _ in rows])
    sections = np.concatenate([[s.sample_id] * s.n_spots for s, _, _ in rows])
    metrics, _, per_section = score(y, p, sections, bundle.genes)
    unc = np.concatenate([a.obs["uncertainty"].to_numpy() for _, a, _ in rows])
    nov = np.concatenate([a.obs["novelty"].to_numpy() for _, a, _ in rows])
    rho, curves = uncertainty_report(y, p, {"uncertainty": unc, "novelty": nov})
    out = {
        "bundle": str(args.bundle), "model": bundle.manifest["model"]["spec"], "chosen":
            (bundle.manifest["model"].get("selection") or {}).get("chosen"),
        "held_out": {"pearson": metrics["pearson"], "n_spots": metrics["n_test_spots"],
                     "per_section": per_section["pearson"].round(4).to_dict(),
                     "benchmark": benchmark_reference(f"test_{args.patient}")},
        "uncertainty": {"spearman_with_sq_error": rho["spearman_with_sq_error"].to_dict(),
                        "retention_mse": {f"{int(k * 100)}%": v for k, v in curves.to_dict("index").items()}},
        "grid": grid_correlation(bundle, args.grid_section),
    }
    ref = out["held_out"]["benchmark"]
    if ref:
        out["held_out"]["diff_vs_seed0"] = metrics["pearson"] - ref["seed0"]
        out["held_out"]["diff_vs_mean"] = metrics["pearson"] - ref["mean_over_seeds"]
    print(json.dumps(out, indent=1))
    if args.out:
        args.out.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
