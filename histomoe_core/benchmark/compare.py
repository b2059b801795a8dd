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


def _section_stats(p: dict[str, np.ndarray], order: Sequence[str]) -> np.ndarray:
    """(S, 6, G) sums per section over its measured entries: n, sum y, sum p, sum y^2, sum p^2, sum y*p."""
    y, pred, sections = p["y"].astype(np.float64), p["pred"].astype(np.float64), p["sample"]
    w = p["mask"].astype(np.float64) if "mask" in p else np.ones(y.shape)
    out = np.zeros((len(order), 6, y.shape[1]))
    for i, s in enumerate(order):
        m = sections == s
        yy, pp, ww = y[m], pred[m], w[m]
        out[i] = [ww.sum(0), (ww * yy).sum(0), (ww * pp).sum(0), (ww * yy**2).sum(0), (ww * pp**2).sum(0),
                  (ww * yy * pp).sum(0)]
    return out


def _pooled_metric(stats: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """HEST metric of weighted section multisets: ``stats`` (S, 6, G), ``weights`` (B, S) -> (B,)."""
    n, sy, sp, syy, spp, syp = np.einsum("bs,skg->kbg", weights, stats)
    with np.errstate(invalid="ignore", divide="ignore"):
        cov = syp - sy * sp / n
        r = cov / np.sqrt((syy - sy**2 / n) * (spp - sp**2 / n))
    r[~np.isfinite(r)] = np.nan
    with np.errstate(invalid="ignore"):
        return np.nanmean(np.clip(r, -1, 1), axis=1)


def _cells(p: dict[str, np.ndarray]) -> dict[str, list[str]]:
    """Test sections of a fold grouped by context (one group when the run has no per-context panels)."""
    ctx = p["context"] if "context" in p else np.full(len(p["sample"]), "")
    out: dict[str, list[str]] = {}
    for s, c in dict.fromkeys(zip(p["sample"].tolist(), ctx.tolist())):
        out.setdefault(c, []).append(s)
    return out


def bootstrap_difference(run: BenchmarkRun, model: str, reference: str, *, target: str, n_boot: int = 2000,
                         level: float = 0.95, seed: int = 0, context: str | None = None) -> dict:
    """Difference ``model - reference`` in the run's HEST metric with a bootstrap interval over held-out sections
    (resampled within each fold and context) and seeds: ``{"diff", "lo", "hi", "verdict", "n_sections",
    "n_boot"}``; verdict is "better", "worse" or "tie" (the interval covers 0). With per-context panels the
    metric of a fold is the macro mean over its contexts; ``context`` restricts everything to one context (its
    folds where it is tested)."""
    rng = np.random.default_rng(seed)
    folds = sorted(run.results["fold"].unique())
    seeds = sorted(run.results["seed"].unique())
    draws_seed = rng.integers(len(seeds), size=(n_boot, len(seeds)))
    total, point, used, n_sections = np.zeros((2, n_boot)), np.zeros(2), 0, 0
    for fold in folds:
        preds = {(j, k): run.predictions(name, fold, seed=int(s), target=target)
                 for j, name in enumerate((model, reference)) for k, s in enumerate(seeds)}
        cells = {c: secs for c, secs in _cells(preds[0, 0]).items() if context is None or c == context}
        if not cells:
            continue
        used += 1
        fold_total, fold_point = np.zeros((2, n_boot)), np.zeros(2)
        for secs in cells.values():
            n_sections += len(secs)
            w = rng.multinomial(len(secs), np.full(len(secs), 1 / len(secs)), size=n_boot).astype(np.float64)
            for j in range(2):
                stats = [_section_stats(preds[j, k], secs) for k in range(len(seeds))]
                per_seed = np.stack([_pooled_metric(st, w) for st in stats], axis=1)  # (B, seeds)
                fold_total[j] += np.take_along_axis(per_seed, draws_seed, axis=1).mean(1) / len(cells)
                fold_point[j] += np.mean([_pooled_metric(st, np.ones((1, len(secs))))[0] for st in stats]) / len(cells)
        total += fold_total
        point += fold_point
    if not used:
        raise ValueError(f"context {context!r} is not tested in any fold of {run.path.name}")
    diff = (total[0] - total[1]) / used
    lo, hi = np.nanquantile(diff, [(1 - level) / 2, 1 - (1 - level) / 2])
    verdict = "tie" if lo <= 0 <= hi else "better" if lo > 0 else "worse"
    return {"diff": float((point[0] - point[1]) / used), "lo": float(lo), "hi": float(hi), "verdict": verdict,
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


def context_differences(run: BenchmarkRun, model: str, references: Sequence[str], *, target: str,
                        **kw) -> pd.DataFrame:
    """Per tested context and reference: the paired difference of ``model`` in that context's HEST metric, its
    bootstrap interval (sections of that context) and the verdict."""
    pc = run.per_context
    rows = []
    for ctx in sorted(pc.loc[pc["target"] == target, "context"].unique()):
        for ref in references:
            b = bootstrap_difference(run, model, ref, target=target, context=ctx, **kw)
            rows.append({"context": ctx, "reference": ref, "diff": b["diff"], "ci_lo": b["lo"], "ci_hi": b["hi"],
                         "verdict": b["verdict"], "n_sections": b["n_sections"]})
    return pd.DataFrame(rows)


def per_context_table(run: BenchmarkRun, *, target: str) -> pd.DataFrame:
    """Contexts x models: each context's HEST metric (mean over the folds where it is tested and seeds), plus
    the macro mean and the worst context as two extra rows."""
    pc = run.per_context
    pc = pc[pc["target"] == target]
    t = pc.groupby(["context", "model", "fold"])["pearson"].mean().groupby(["context", "model"]).mean().unstack()
    t.loc["macro mean"] = t.mean()
    t.loc["worst context"] = t.drop(index="macro mean").min()
    return t


def context_sizes(run: BenchmarkRun, samples) -> pd.DataFrame:
    """Per context: sections, groups, and the mean number of training spots over the folds."""
    ctx_key = run.config["config"]["context_key"]
    ctx = {s.sample_id: str(s.meta.get(ctx_key) or "unknown") for s in samples}
    spots = {s.sample_id: s.n_spots for s in samples}
    rows = {}
    for c in sorted(set(ctx.values())):
        ids = [i for i, v in ctx.items() if v == c]
        train = [sum(spots[i] for i in f["train"] if ctx[i] == c) for f in run.config["folds"]]
        rows[c] = {"sections": len(ids), "groups": len({samples[i].patient for i in ids}),
                   "train_spots": float(np.mean(train))}
    return pd.DataFrame(rows).T


def versus_best_single(run: BenchmarkRun, model: str, singles: Sequence[str], *, target: str, **kw) -> pd.DataFrame:
    """Per tested context: the best of the ``singles`` (single models) in that context, and the paired difference
    of ``model`` against it with its bootstrap interval over the context's held-out sections."""
    table = per_context_table(run, target=target).drop(index=["macro mean", "worst context"])
    rows = {}
    for ctx, row in table.iterrows():
        best = row[list(singles)].astype(float).idxmax()
        b = bootstrap_difference(run, model, best, target=target, context=ctx, **kw)
        rows[ctx] = {"best single": best, "its score": float(row[best]), model: float(row[model]),
                     "diff": b["diff"], "ci_lo": b["lo"], "ci_hi": b["hi"], "verdict": b["verdict"]}
    return pd.DataFrame(rows).T
