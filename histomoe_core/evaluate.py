"""Metrics and their aggregation.

- HEST metric (``pearson``): Pearson r per gene over all test spots of a fold pooled, mean over genes
  (genes constant in the test fold or in the prediction give NaN and are left out of the mean; their count
  is reported as ``n_nan_genes``).
- ``pearson_section``: the same per test section, averaged over sections (a different, usually lower number).
- ``mse``: mean squared error over spots and genes.

:func:`score` returns the fold's metrics plus per-gene and per-section tables; :func:`summarize` turns the
one-row-per (model, target, fold, seed) results table into mean +/- sd over folds and seeds.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

METRICS = ("pearson", "pearson_section", "mse")


def pearson_columns(y: np.ndarray, p: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Pearson r of each column of ``y`` with the same column of ``p`` over the rows where ``mask`` (spots x genes,
    True = measured) holds; NaN where either is constant or fewer than two rows are measured."""
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    if y.shape != p.shape or y.ndim != 2:
        raise ValueError(f"targets {y.shape} and predictions {p.shape} must be equal 2-D shapes (spots, genes)")
    if mask is None:
        yc, pc = y - y.mean(0), p - p.mean(0)
    else:
        w = np.asarray(mask, dtype=np.float64)
        n = np.maximum(w.sum(0), 1.0)
        yc, pc = (y - (w * y).sum(0) / n) * w, (p - (w * p).sum(0) / n) * w
    den = np.sqrt((yc**2).sum(0) * (pc**2).sum(0))
    num = (yc * pc).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = num / den
    # constant columns (relative to their scale) are undefined, not perfectly (anti)correlated
    tiny = (den <= 1e-12 * np.maximum(1.0, np.abs(num))) | (den == 0)
    r[tiny] = np.nan
    return np.clip(r, -1.0, 1.0)


def hest_metric(y: np.ndarray, p: np.ndarray, mask: np.ndarray | None = None,
                context: np.ndarray | None = None) -> float:
    """HEST-Bench's score: Pearson r per gene over all spots, mean over genes (-1 when no gene is defined).

    With ``mask`` only measured entries count (genes never measured are left out); with ``context`` (a label
    per spot) the score is the macro mean over contexts of each context's own HEST metric, so a gene shared by
    two tissues is never correlated across them."""
    if context is not None and len(np.unique(context)) > 1:
        parts = [hest_metric(y[c], p[c], None if mask is None else mask[c]) for c in _context_rows(context)]
        return float(np.mean(parts))
    r = pearson_columns(y, p, mask)
    return float(np.nanmean(r)) if np.isfinite(r).any() else -1.0


def _context_rows(context: np.ndarray) -> list[np.ndarray]:
    return [np.flatnonzero(context == c) for c in np.unique(context)]


def _nanmean(a: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64)
    return float(np.nanmean(a)) if np.isfinite(a).any() else float("nan")


def score(y: np.ndarray, p: np.ndarray, sections: Sequence[str], genes: Sequence[str], *,
          mask: np.ndarray | None = None, context: Sequence[str] | None = None
          ) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    """Metrics of one fold: ``(metrics, per_gene, per_section)``.

    ``per_gene`` (index gene): pooled ``pearson`` and ``mse``; ``per_section`` (index section): ``pearson``
    (mean over genes within the section), ``mse``, ``n_spots``. With ``mask`` (spots x genes, True = measured
    and scored) only measured entries count; with ``context`` (a name per spot) ``pearson`` is the macro mean
    over contexts of each context's HEST metric (see :func:`context_scores`) and ``worst_context`` its minimum.
    """
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    sections = np.asarray(sections)
    if len(sections) != len(y):
        raise ValueError(f"{len(sections)} section labels for {len(y)} spots")
    if y.shape[1] != len(genes):
        raise ValueError(f"{y.shape[1]} target columns but {len(genes)} genes")
    w = np.ones(y.shape, bool) if mask is None else np.asarray(mask, bool)
    r = pearson_columns(y, p, mask)
    err = np.where(w, (y - p) ** 2, 0.0)
    per_gene = pd.DataFrame({"pearson": r, "mse": err.sum(0) / np.maximum(w.sum(0), 1)},
                            index=pd.Index(list(genes), name="gene"))
    rows = []
    for s in pd.unique(sections):
        m = sections == s
        rows.append({"section": s, "pearson": _nanmean(pearson_columns(y[m], p[m], None if mask is None else w[m])),
                     "mse": float(err[m].sum() / max(w[m].sum(), 1)), "n_spots": int(m.sum())})
    per_section = pd.DataFrame(rows).set_index("section")
    metrics = {
        "pearson": _nanmean(r),
        "pearson_section": _nanmean(per_section["pearson"].to_numpy()),
        "mse": float(err.sum() / max(w.sum(), 1)),
        "n_nan_genes": int(np.isnan(r).sum()),
        "n_test_spots": int(len(y)),
    }
    if context is not None:
        metrics.update(context_metrics(context_scores(y, p, np.asarray(context), mask=mask, sections=sections)))
    return metrics, per_gene, per_section


def context_metrics(table: pd.DataFrame) -> dict:
    """Headline metrics from a :func:`context_scores` table: macro-mean ``pearson``, ``worst_context``,
    ``n_contexts``."""
    return {"pearson": float(table["pearson"].mean()), "worst_context": float(table["pearson"].min()),
            "n_contexts": int(len(table))}


def context_scores(y: np.ndarray, p: np.ndarray, context: np.ndarray, *, mask: np.ndarray | None = None,
                   sections: Sequence[str] | None = None) -> pd.DataFrame:
    """Per context (index): its HEST metric over its own spots and measured genes, its per-section Pearson,
    and how many spots, sections and scored genes it has."""
    rows = {}
    for c in pd.unique(context):
        m = context == c
        mk = None if mask is None else np.asarray(mask, bool)[m]
        r = pearson_columns(y[m], p[m], mk)
        row = {"pearson": _nanmean(r), "n_spots": int(m.sum()), "n_genes": int(np.isfinite(r).sum())}
        if sections is not None:
            sec = np.asarray(sections)[m]
            row["pearson_section"] = _nanmean([_nanmean(pearson_columns(y[m][sec == s], p[m][sec == s],
                                                                        None if mk is None else mk[sec == s]))
                                               for s in pd.unique(sec)])
            row["n_sections"] = int(len(pd.unique(sec)))
        rows[str(c)] = row
    return pd.DataFrame(rows).T.rename_axis("context")


def summarize(results: pd.DataFrame, *, by: Sequence[str] = ("target", "model"),
              metrics: Sequence[str] = METRICS) -> pd.DataFrame:
    """Mean and spreads of each metric per ``by`` group.

    ``<m>`` is the mean over folds and seeds; ``<m>_sd_folds`` the sd over folds of the seed-averaged
    values; ``<m>_sd_seeds`` the sd over seeds of the fold-averaged values (both ddof = 0, as HEST-Bench).
    Also ``n_folds``, ``n_seeds``.
    """
    by = list(by)
    out = []
    for key, g in results.groupby(by, sort=False):
        row = dict(zip(by, key if isinstance(key, tuple) else (key,)))
        for m in metrics:
            per_fold = g.groupby("fold")[m].mean()
            per_seed = g.groupby("seed")[m].mean()
            row[m] = float(g[m].mean())
            row[f"{m}_sd_folds"] = float(per_fold.std(ddof=0))  # HEST-Bench reports np.std (ddof = 0)
            row[f"{m}_sd_seeds"] = float(per_seed.std(ddof=0))
        row["n_folds"] = int(g["fold"].nunique())
        row["n_seeds"] = int(g["seed"].nunique())
        out.append(row)
    return pd.DataFrame(out)


def fold_table(results: pd.DataFrame, *, metric: str = "pearson", target: str | None = None) -> pd.DataFrame:
    """Models x folds table of ``metric`` (mean over seeds), plus a ``mean`` column."""
    r = results if target is None else results[results["target"] == target]
    t = r.pivot_table(index="model", columns="fold", values=metric, aggfunc="mean", sort=False)
    t["mean"] = t.mean(axis=1)
    return t.sort_values("mean", ascending=False)


def format_pm(mean: float, sd: float, digits: int = 3) -> str:
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def markdown_table(summary: pd.DataFrame, *, metrics: Sequence[str] = METRICS, digits: int = 3) -> str:
    """A markdown table: one row per (target, model), ``mean ± sd over folds`` per metric."""
    cols = [c for c in ("target", "model") if c in summary.columns]
    header = cols + [f"{m} (± sd folds)" for m in metrics] + ["sd seeds (pearson)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in summary.iterrows():
        cells = [str(row[c]) for c in cols]
        cells += [format_pm(row[m], row[f"{m}_sd_folds"], digits) for m in metrics]
        cells.append(f"{row['pearson_sd_seeds']:.{digits}f}" if "pearson_sd_seeds" in row else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
