"""Paired comparisons of two models of one run: per-fold and per-section differences, and a bootstrap confidence
interval for the difference in the headline metric.

The HEST metric of a fold is the Pearson r per gene over the fold's pooled test spots, mean over genes; a run's
score is its mean over folds (and seeds). :func:`bootstrap_difference` resamples, in every replicate, the test
sections within each fold (with replacement) and the seeds, recomputes both models' scores on exactly the same
draws from per-section sufficient statistics, and reports the percentile interval of the difference. It measures
how much the margin depends on which sections happened to be held out, not on which patients: with three patients
the spread over patients is only seen in the per-fold table. A difference whose interval covers 0 is a tie.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from histomoe_core.benchmark.results import BenchmarkRun


def fold_differences(run: BenchmarkRun, model: str, reference: str, *, target: str,
                     metric: str = "pearson") -> pd.DataFrame:
    """Per fold (mean over seeds): ``model``, ``reference`` and ``diff`` = model - reference."""
    r = run.results
    r = r[(r["target"] == target) & r["model"].isin([model, reference])]
    t = r.pivot_table(index="fold", columns="model", values=metric, aggfunc="mean")
    return pd.DataFrame({model: t[model], reference: t[reference], "diff": t[model] - t[reference]})


def section_differences(run: BenchmarkRun, model: str, reference: str, *, target: str) -> pd.DataFrame:
    """Per test section (mean over seeds): per-section Pearson of both models and their difference."""
    ps = run.per_section
    ps = ps[(ps["target"] == target) & ps["model"].isin([model, reference])]
    t = ps.pivot_table(index=["fold", "section"], columns="model", values="pearson", aggfunc="mean")
    return pd.DataFrame({model: t[model], reference: t[reference], "diff": t[model] - t[reference]})


def _section_stats(pred: np.ndarray, y: np.ndarray, sections: np.ndarray, order: Sequence[str]) -> np.ndarray:
    """(S, 6, G) sums per section: n, sum y, sum p, sum y^2, sum p^2, sum y*p."""
    out = np.zeros((len(order), 6, y.shape[1]))
    for i, s in enumerate(order):
        m = sections == s
        yy, pp = y[m].astype(np.float64), pred[m].astype(np.float64)
        out[i] = [np.full(y.shape[1], m.sum()), yy.sum(0), pp.sum(0), (yy**2).sum(0), (pp**2).sum(0), (yy * pp).sum(0)]
    return out


def _pooled_metric(stats: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """HEST metric of weighted section multisets: ``stats`` (S, 6, G), ``weights`` (B, S) -> (B,)."""
    n, sy, sp, syy, spp, syp = np.einsum("bs,skg->kbg", weights, stats)
    with np.errstate(invalid="ignore", divide="ignore"):
        cov = syp - sy * sp / n
        r = cov / np.sqrt((syy - sy**2 / n) * (spp - sp**2 / n))
    r[~np.isfinite(r)] = np.nan
    return np.nanmean(np.clip(r, -1, 1), axis=1)


def bootstrap_difference(run: BenchmarkRun, model: str, reference: str, *, target: str, n_boot: int = 2000,
                         level: float = 0.95, seed: int = 0) -> dict:
    """Difference ``model - reference`` in the run's HEST metric with a bootstrap interval over held-out sections
    (within folds) and seeds: ``{"diff", "lo", "hi", "verdict", "n_sections", "n_boot"}``; verdict is "better",
    "worse" or "tie" (the interval covers 0)."""
    rng = np.random.default_rng(seed)
    folds = sorted(run.results["fold"].unique())
    seeds = sorted(run.results["seed"].unique())
    draws_seed = rng.integers(len(seeds), size=(n_boot, len(seeds)))
    total = np.zeros((2, n_boot))
    point = np.zeros(2)
    n_sections = 0
    for fold in folds:
        order = None
        stats = {}
        for j, name in enumerate((model, reference)):
            for k, s in enumerate(seeds):
                p = run.predictions(name, fold, seed=int(s), target=target)
                if order is None:
                    order = list(pd.unique(p["sample"]))
                stats[j, k] = _section_stats(p["pred"], p["y"], p["sample"], order)
        n_sections += len(order)
        w = rng.multinomial(len(order), np.full(len(order), 1 / len(order)), size=n_boot).astype(np.float64)
        ones = np.ones((1, len(order)))
        for j in range(2):
            per_seed = np.stack([_pooled_metric(stats[j, k], w) for k in range(len(seeds))], axis=1)  # (B, seeds)
            total[j] += np.take_along_axis(per_seed, draws_seed, axis=1).mean(1) / len(folds)
            point[j] += np.mean([_pooled_metric(stats[j, k], ones)[0] for k in range(len(seeds))]) / len(folds)
    diff = total[0] - total[1]
    lo, hi = np.quantile(diff, [(1 - level) / 2, 1 - (1 - level) / 2])
    verdict = "tie" if lo <= 0 <= hi else "better" if lo > 0 else "worse"
    return {"diff": float(point[0] - point[1]), "lo": float(lo), "hi": float(hi), "verdict": verdict,
            "level": level, "n_sections": n_sections, "n_boot": n_boot}


def compare_to(run: BenchmarkRun, model: str, references: Sequence[str], *, target: str, **kw) -> pd.DataFrame:
    """One row per reference: the paired difference of ``model`` against it, its interval, the verdict, and
    how many folds and sections ``model`` wins."""
    rows = []
    for ref in references:
        b = bootstrap_difference(run, model, ref, target=target, **kw)
        f = fold_differences(run, model, ref, target=target)
        s = section_differences(run, model, ref, target=target)
        rows.append({"reference": ref, "diff": b["diff"], "ci_lo": b["lo"], "ci_hi": b["hi"], "verdict": b["verdict"],
                     "folds_won": f"{int((f['diff'] > 0).sum())}/{len(f)}",
                     "sections_won": f"{int((s['diff'] > 0).sum())}/{len(s)}",
                     "section_diff": float(s["diff"].mean())})
    return pd.DataFrame(rows).set_index("reference")


def versus(run: BenchmarkRun, models: Sequence[str], reference: str, *, target: str, **kw) -> pd.DataFrame:
    """One row per model: its paired difference against ``reference`` (model - reference), interval, verdict."""
    rows = {}
    for m in models:
        if m == reference:
            continue
        b = bootstrap_difference(run, m, reference, target=target, **kw)
        rows[m] = {"diff": b["diff"], "ci_lo": b["lo"], "ci_hi": b["hi"], "verdict": b["verdict"]}
    return pd.DataFrame(rows).T


def panel_depth(run: BenchmarkRun, samples, *, target: str) -> pd.DataFrame:
    """Per fold, on the test sections: how much the fold's panel follows spot depth (median over genes of the
    Pearson r between a gene's log1p counts and the spot's log1p total counts) and the genes' median detection."""
    from histomoe_core.data.genes import panel_stats

    rows = {}
    for f in run.config["folds"]:
        st = panel_stats([samples[i] for i in f["test"]], run.panel(target, f["name"]).index)
        rows[f["name"]] = {"depth_r": float(st["depth_r"].median()), "detected": float(st["detected"].median())}
    return pd.DataFrame(rows).T
