"""How well slide predictions match measured expression: smoothed grid maps, and what the uncertainty is worth.

- :func:`smooth_at`: a grid prediction averaged (Gaussian weights) at measured spot positions;
- :func:`map_correlation`: mean over genes of the Pearson r over spots between two maps;
- :func:`retention_curve`: mean squared error of the most certain share of spots, for any per-spot score;
- :func:`uncertainty_report`: Spearman of each score with the per-spot squared error, and their curves.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd

#: shares of spots kept, most certain first
FRACTIONS = (0.1, 0.25, 0.5, 0.75, 1.0)


def smooth_at(grid_xy: np.ndarray, grid_values: np.ndarray, xy: np.ndarray, *, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """``(values at xy, covered)``: Gaussian-weighted means (``sigma`` px, cut at 3 sigma) of the grid values
    around each point; ``covered`` is False where no grid spot lies within 3 sigma."""
    d2 = ((xy[:, None, :] - grid_xy[None]) ** 2).sum(-1)
    w = np.exp(-d2 / (2 * sigma**2))
    w[d2 > (3 * sigma) ** 2] = 0
    covered = w.sum(1) > 1e-9
    out = np.full((len(xy), grid_values.shape[1]), np.nan)
    out[covered] = (w[covered] @ grid_values) / w[covered].sum(1, keepdims=True)
    return out, covered


def map_correlation(y: np.ndarray, p: np.ndarray) -> float:
    """Mean over genes of the Pearson r over spots (genes constant in either map left out)."""
    from histomoe_core.evaluate import pearson_columns

    return float(np.nanmean(pearson_columns(y, p)))


def retention_curve(sq_err: np.ndarray, score: np.ndarray, fractions: Sequence[float] = FRACTIONS) -> pd.Series:
    """Mean squared error of the ``f`` share of spots with the lowest ``score``, for each ``f``."""
    order = np.argsort(score, kind="stable")
    return pd.Series({f: float(sq_err[order[: max(1, int(round(f * len(sq_err))))]].mean()) for f in fractions},
                     name="mse")


def uncertainty_report(y: np.ndarray, p: np.ndarray, scores: Mapping[str, np.ndarray]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(spearman, curves)``: per score, Spearman with the per-spot squared error (mean over genes); and the
    error-retention curves (rows: share kept; columns: scores, plus ``random`` = the mean error)."""
    from scipy.stats import spearmanr

    err = ((np.asarray(y, float) - np.asarray(p, float)) ** 2).mean(1)
    ok = {k: np.asarray(v, float) for k, v in scores.items() if np.isfinite(np.asarray(v, float)).all()}
    def spearman(v: np.ndarray) -> float:  # undefined (NaN) for a constant score, without scipy's warning
        return float(spearmanr(v, err).statistic) if np.ptp(v) > 0 and np.ptp(err) > 0 else float("nan")

    rho = pd.DataFrame({"spearman_with_sq_error": {k: spearman(v) for k, v in ok.items()}})
    curves = pd.DataFrame({k: retention_curve(err, v) for k, v in ok.items()})
    curves["random"] = float(err.mean())
    curves.index.name = "share kept"
    return rho, curves
