"""Paired comparisons of two models of one run: per-fold and per-section differences, and a bootstrap confidence
interval for the difference in the headline metric.

The HEST metric of a fold is the Pearson r per gene over the fold's pooled test spots, mean over genes; a run's
score is its mean over folds (and seeds). :func:`bootstrap_difference` resamples, in every replicate, the test
sections within each fold (and context), the spots within each drawn section, and the seeds, recomputes both
models' scores on exactly the same draws, and reports the percentile interval of the difference. It measures how
much the margin depends on which sections and spots happened to be held out, not on which patients: with three
patients the spread over patients is only seen in the per-fold table. A difference whose interval covers 0 is a
tie.
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


def _spot_stats(p: dict[str, np.ndarray], rows: np.ndarray) -> np.ndarray:
    """(6, N, G') per-spot terms over measured entries: 1, y, p, y^2, p^2, y*p (0 where unmeasured), on the
    genes measured somewhere in ``rows`` only (a context's own panel)."""
    if "mask" in p:
        m = p["mask"][rows]
        cols = np.flatnonzero(m.any(0))
        w = m[:, cols].astype(np.float64)
    else:
        cols = slice(None)
        w = np.ones((len(rows), p["y"].shape[1]))
    y, pred = p["y"][rows][:, cols].astype(np.float64), p["pred"][rows][:, cols].astype(np.float64)
    return np.stack([w, w * y, w * pred, w * y**2, w * pred**2, w * y * pred])


def _pooled_metric(terms: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """HEST metric of weighted spot multisets: ``terms`` (6, N, G), ``weights`` (B, N) -> (B,)."""
    n, sy, sp, syy, spp, syp = np.einsum("bn,kng->kbg", weights, terms, optimize=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        cov = syp - sy * sp / n
        r = cov / np.sqrt((syy - sy**2 / n) * (spp - sp**2 / n))
    r[~np.isfinite(r)] = np.nan
    with np.errstate(invalid="ignore"):
        return np.nanmean(np.clip(r, -1, 1), axis=1)


def _hierarchical_weights(sections: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(B, N) bootstrap counts: test sections drawn with replacement, then spots drawn with replacement within
    every drawn section (so a context held out with a single section still gets an interval)."""
    names, inverse = np.unique(sections, return_inverse=True)
    rows = [np.flatnonzero(inverse == i) for i in range(len(names))]
    w = np.zeros((n_boot, len(sections)))
    picks = rng.multinomial(len(names), np.full(len(names), 1 / len(names)), size=n_boot)
    for b in range(n_boot):
        for i, c in enumerate(picks[b]):
            if c:
                w[b, rows[i]] += rng.multinomial(c * len(rows[i]), np.full(len(rows[i]), 1 / len(rows[i])))
    return w


def _cells(p: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Row indices of a fold's test spots grouped by context (one group without per-context panels)."""
    ctx = p["context"] if "context" in p else np.full(len(p["sample"]), "")
    return {c: np.flatnonzero(ctx == c) for c in pd.unique(ctx)}


def bootstrap_difference(run: BenchmarkRun, model: str, reference: str, *, target: str, n_boot: int = 1000,
                         level: float = 0.95, seed: int = 0, context: str | None = None) -> dict:
    """Difference ``model - reference`` in the run's HEST metric with a hierarchical bootstrap interval: within
    each fold and context, held-out sections are resampled, then spots within sections, and the seeds are
    resampled; both models are scored on exactly the same draws. Returns ``{"diff", "lo", "hi", "verdict",
    "n_sections", "n_boot"}``; verdict is "better", "worse" or "tie" (the interval covers 0). Neighbouring
    spots are correlated, so the spot level makes intervals narrower than they should be where a context has
    few sections; the per-fold table is the check against that. With per-context panels the metric of a fold
    is the macro mean over its contexts; ``context`` restricts everything to one context."""
    rng = np.random.default_rng(seed)
    folds = sorted(run.results["fold"].unique())
    seeds = sorted(run.results["seed"].unique())
    draws_seed = rng.integers(len(seeds), size=(n_boot, len(seeds)))
    total, point, used, n_sections = np.zeros((2, n_boot)), np.zeros(2), 0, 0
    for fold in folds:
        preds = {(j, k): run.predictions(name, fold, seed=int(s), target=target)
                 for j, name in enumerate((model, reference)) for k, s in enumerate(seeds)}
        cells = {c: rows for c, rows in _cells(preds[0, 0]).items() if context is None or c == context}
        if not cells:
            continue
        used += 1
        for rows in cells.values():
            secs = preds[0, 0]["sample"][rows]
            n_sections += len(np.unique(secs))
            w = _hierarchical_weights(secs, n_boot, rng)
            ones = np.ones((1, len(rows)))
            for j in range(2):
                terms = [_spot_stats(preds[j, k], rows) for k in range(len(seeds))]
                per_seed = np.stack([_pooled_metric(t, w) for t in terms], axis=1)  # (B, seeds)
                total[j] += np.take_along_axis(per_seed, draws_seed, axis=1).mean(1) / len(cells)
                point[j] += np.mean([_pooled_metric(t, ones)[0] for t in terms]) / len(cells)
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
    return pd.DataFrame(rows).T.astype({"diff": float, "ci_lo": float, "ci_hi": float})


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
    return pd.DataFrame(rows).T.astype({"sections": int, "groups": int})


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
    out = pd.DataFrame(rows).T
    num = ["its score", model, "diff", "ci_lo", "ci_hi"]
    return out.astype({c: float for c in num})
