"""Where a run's mixture sends each context: routing against the spots' contexts, from the stored test gates.

Every MoE unit stores its test gates (``predictions/<target>/<model>/<fold>_seed<k>.npz``: ``gates``, and with
per-context panels ``context``). :func:`routing_stats` gives per fold the NMI and ARI between each spot's dominant
expert and its context, and the median gate entropy; :func:`expert_usage` the mean gate of every expert per
context; :func:`top_spots` the test spots that pick each expert most strongly (for a patch montage).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from histomoe_core.benchmark.results import BenchmarkRun


def _gated(run: BenchmarkRun, model: str, fold: str, seed: int, target: str) -> dict[str, np.ndarray]:
    p = run.predictions(model, fold, seed=seed, target=target)
    if "gates" not in p:
        raise ValueError(f"{model} stores no gates (not a mixture); models with gates: {run.saved_models()}")
    if "context" not in p:
        p["context"] = np.full(len(p["sample"]), "all")
    return p


def _entropy(g: np.ndarray) -> np.ndarray:
    g = np.clip(g, 1e-12, 1.0)
    return -(g * np.log(g)).sum(1) / np.log(max(g.shape[1], 2))


def routing_stats(run: BenchmarkRun, model: str, *, target: str, seed: int = 0) -> pd.DataFrame:
    """Per fold: NMI and ARI of dominant expert vs context, median normalised gate entropy, experts used."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    rows = {}
    for f in run.config["folds"]:
        p = _gated(run, model, f["name"], seed, target)
        dom = p["gates"].argmax(1)
        rows[f["name"]] = {"nmi": normalized_mutual_info_score(p["context"], dom),
                           "ari": adjusted_rand_score(p["context"], dom),
                           "entropy": float(np.median(_entropy(p["gates"]))),
                           "experts_used": int(len(np.unique(dom))), "n_spots": int(len(dom))}
    return pd.DataFrame(rows).T


def expert_usage(run: BenchmarkRun, model: str, *, target: str, seed: int = 0) -> pd.DataFrame:
    """Contexts x experts: mean gate over the test spots of every fold (rows sum to 1)."""
    parts = []
    for f in run.config["folds"]:
        p = _gated(run, model, f["name"], seed, target)
        parts.append(pd.DataFrame(p["gates"], columns=[f"expert {e}" for e in range(p["gates"].shape[1])])
                     .assign(context=p["context"]))
    return pd.concat(parts).groupby("context").mean()


def dominant_counts(run: BenchmarkRun, model: str, *, target: str, seed: int = 0) -> pd.DataFrame:
    """Contexts x experts: how many test spots each expert dominates (the routing-vs-context contingency)."""
    parts = []
    for f in run.config["folds"]:
        p = _gated(run, model, f["name"], seed, target)
        parts.append(pd.DataFrame({"context": p["context"], "expert": p["gates"].argmax(1)}))
    both = pd.concat(parts, ignore_index=True)
    t = pd.crosstab(both["context"], both["expert"])
    t.columns = [f"expert {e}" for e in t.columns]
    return t


def top_spots(run: BenchmarkRun, model: str, *, target: str, n: int = 6, seed: int = 0) -> pd.DataFrame:
    """Per expert, the ``n`` test spots (over all folds) with the largest gate on it: expert, sample, spot,
    context, gate."""
    rows = []
    for f in run.config["folds"]:
        p = _gated(run, model, f["name"], seed, target)
        for e in range(p["gates"].shape[1]):
            for i in np.argsort(-p["gates"][:, e])[:n]:
                rows.append({"expert": e, "sample": str(p["sample"][i]), "spot": str(p["spot"][i]),
                             "context": str(p["context"][i]), "gate": float(p["gates"][i, e])})
    t = pd.DataFrame(rows)
    return t.sort_values(["expert", "gate"], ascending=[True, False]).groupby("expert").head(n).reset_index(drop=True)
