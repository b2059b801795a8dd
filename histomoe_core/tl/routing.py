"""Routing statistics: how the gate spreads spots over experts, and whether that matches known labels.

Array functions (``gate_entropy``, ``usage_table``, ``agreement``, ``expert_contrast``) take plain arrays;
the AnnData tools (``expert_usage``, ``routing_agreement``, ``expert_genes``) read the slots that
:func:`histomoe_core.tl.predict` (module :mod:`histomoe_core.tl.prediction`) writes under ``key`` (default ``"histomoe"``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import anndata as ad
import numpy as np
import pandas as pd
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from histomoe_core.tl.slots import slot_names


def _gates(gates: np.ndarray) -> np.ndarray:
    g = np.asarray(gates, dtype=np.float64)
    if g.ndim != 2:
        raise ValueError(f"gates must be (spots, experts), got shape {g.shape}")
    if (g < -1e-6).any() or not np.allclose(g.sum(axis=1), 1.0, atol=1e-3):
        raise ValueError("gates must be non-negative with rows summing to 1 (the router's softmax output)")
    return np.clip(g, 0.0, 1.0)


def gate_entropy(gates: np.ndarray, *, normalize: bool = True) -> np.ndarray:
    """Entropy of each spot's gate distribution; divided by ``log(n_experts)`` when ``normalize`` (0 = one
    expert takes all, 1 = uniform)."""
    g = _gates(gates)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(g > 0, g * np.log(g), 0.0).sum(axis=1)
    if normalize and g.shape[1] > 1:
        h = h / np.log(g.shape[1])
    return h


def dominant_expert(gates: np.ndarray) -> np.ndarray:
    """Index of the expert with the largest gate weight per spot."""
    return _gates(gates).argmax(axis=1)


def expert_names(n_experts: int) -> list[str]:
    return [f"e{i}" for i in range(n_experts)]


def usage_table(
    gates: np.ndarray, groups: Sequence, *, kind: Literal["mean_gate", "dominant"] = "mean_gate",
    experts: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Groups x experts: the mean gate weight (``mean_gate``) or the share of spots an expert dominates
    (``dominant``). Rows sum to 1."""
    g = _gates(gates)
    groups = np.asarray(groups).astype(str)
    if len(groups) != len(g):
        raise ValueError(f"{len(groups)} group labels for {len(g)} spots")
    cols = list(experts) if experts is not None else expert_names(g.shape[1])
    if kind == "dominant":
        g = np.eye(g.shape[1])[g.argmax(axis=1)]
    elif kind != "mean_gate":
        raise ValueError(f"unknown kind {kind!r}; use 'mean_gate' or 'dominant'")
    table = pd.DataFrame(g, columns=cols).groupby(groups, sort=True).mean()
    table.index.name = "group"
    table.columns.name = "expert"
    return table


@dataclass
class Agreement:
    """Agreement between two labelings of the same spots."""

    nmi: float  # normalized mutual information, 0 (independent) .. 1 (same partition)
    ari: float  # adjusted Rand index, ~0 for chance, 1 for the same partition
    table: pd.DataFrame  # contingency table: labels (rows) x experts (columns), spot counts

    def as_dict(self) -> dict:
        return {"nmi": self.nmi, "ari": self.ari}


def agreement(experts: Sequence, labels: Sequence) -> Agreement:
    """NMI, ARI and contingency table of the dominant expert against metadata labels."""
    experts = np.asarray(experts).astype(str)
    labels = np.asarray(labels).astype(str)
    if len(experts) != len(labels):
        raise ValueError(f"{len(experts)} expert ids for {len(labels)} labels")
    table = pd.crosstab(pd.Series(labels, name="label"), pd.Series(experts, name="expert"))
    return Agreement(
        nmi=float(normalized_mutual_info_score(labels, experts)),
        ari=float(adjusted_rand_score(labels, experts)),
        table=table,
    )


def expert_contrast(
    expert_preds: np.ndarray, gates: np.ndarray | None = None, *, genes: Sequence[str] | None = None,
    experts: Sequence[str] | None = None, standardize: bool = True,
) -> pd.DataFrame:
    """Genes x experts: how differently each expert predicts each gene from the other experts.

    For expert ``e`` and gene ``g`` this is the mean over spots of ``pred[e, g] - mean_{e' != e} pred[e', g]``,
    weighted by the gate weight of ``e`` (so it describes the spots the expert is actually used for; uniform
    weights when ``gates`` is None), divided by the spread of the gene's prediction across spots when
    ``standardize``. Positive: the expert predicts the gene higher than the others would.
    """
    y = np.asarray(expert_preds, dtype=np.float64)
    if y.ndim != 3:
        raise ValueError(f"expert_preds must be (spots, experts, genes), got shape {y.shape}")
    n, e, ng = y.shape
    if e < 2:
        raise ValueError("expert contrast needs at least two experts")
    w = np.ones((n, e)) if gates is None else _gates(gates)
    others = (y.sum(axis=1, keepdims=True) - y) / (e - 1)
    diff = y - others  # (n, e, g)
    wsum = w.sum(axis=0)
    wsum[wsum == 0] = 1.0
    d = np.einsum("ne,neg->ge", w, diff) / wsum[None, :]
    if standardize:
        mixed = y.mean(axis=1) if gates is None else np.einsum("ne,neg->ng", w, y)
        scale = mixed.std(axis=0)
        scale[scale < 1e-8] = 1.0
        d = d / scale[:, None]
    index = list(genes) if genes is not None else [f"g{i}" for i in range(ng)]
    columns = list(experts) if experts is not None else expert_names(e)
    return pd.DataFrame(d, index=index, columns=columns).rename_axis(index="gene", columns="expert")


# --- AnnData tools -----------------------------------------------------------------------------------------


def _require(adata: ad.AnnData, key: str) -> dict[str, str]:
    names = slot_names(key)
    if names["gates"] not in adata.obsm:
        raise KeyError(f"adata.obsm has no {names['gates']!r}; run tl.predict(adata, model, key_added={key!r}) first")
    return names


def expert_usage(adata: ad.AnnData, *, groupby: str = "sample_id", key: str = "histomoe",
                 kind: Literal["mean_gate", "dominant"] = "mean_gate") -> pd.DataFrame:
    """Expert usage per value of ``adata.obs[groupby]`` (see :func:`usage_table`)."""
    names = _require(adata, key)
    if groupby not in adata.obs:
        raise KeyError(f"adata.obs has no column {groupby!r}; columns: {list(adata.obs.columns)}")
    return usage_table(adata.obsm[names["gates"]], adata.obs[groupby].to_numpy(), kind=kind,
                       experts=adata.uns[key]["experts"])


def routing_agreement(adata: ad.AnnData, labels: str, *, key: str = "histomoe", dropna: bool = True) -> Agreement:
    """Agreement between the dominant expert and ``adata.obs[labels]`` (spots with a missing label are left out)."""
    names = _require(adata, key)
    if labels not in adata.obs:
        raise KeyError(f"adata.obs has no column {labels!r}; columns: {list(adata.obs.columns)}")
    lab = adata.obs[labels]
    keep = lab.notna().to_numpy() if dropna else np.ones(adata.n_obs, bool)
    return agreement(adata.obs[names["expert"]].to_numpy()[keep], lab.to_numpy()[keep])


def expert_genes(adata: ad.AnnData, *, key: str = "histomoe", n_top: int | None = None,
                 standardize: bool = True) -> pd.DataFrame:
    """Genes x experts contrast (see :func:`expert_contrast`); with ``n_top`` only the genes whose largest
    absolute contrast is highest."""
    names = _require(adata, key)
    if names["experts"] not in adata.obsm:
        raise KeyError(f"adata.obsm has no {names['experts']!r}; call tl.predict(..., store_experts=True)")
    table = expert_contrast(adata.obsm[names["experts"]], adata.obsm[names["gates"]],
                            genes=adata.uns[key]["genes"], experts=adata.uns[key]["experts"],
                            standardize=standardize)
    if n_top is not None:
        table = table.loc[table.abs().max(axis=1).sort_values(ascending=False).index[:n_top]]
    return table


#: normalised median gate entropy above which routing is called near-uniform, below which sharp
ROUTING_CLASSES = ((0.9, "near-uniform"), (0.4, "soft"), (0.0, "sharp"))


def routing_character(median_entropy: float) -> str:
    """``near-uniform`` (median normalised entropy >= 0.9), ``soft`` (>= 0.4) or ``sharp``."""
    return next(name for lim, name in ROUTING_CLASSES if median_entropy >= lim)


def routing_summary(adata: ad.AnnData, labels: Sequence[str] = (), *, key: str = "histomoe") -> pd.Series:
    """One model's routing in numbers: experts, median gate entropy and its class, the median largest gate
    weight, the least and most used expert (mean gate), and the NMI of the dominant expert with each
    ``obs`` column in ``labels`` that has values."""
    names = _require(adata, key)
    g = _gates(adata.obsm[names["gates"]])
    h = float(np.median(adata.obs[names["entropy"]].to_numpy(float)))
    usage = g.mean(axis=0)
    out = {"experts": g.shape[1], "median_entropy": h, "routing": routing_character(h),
           "median_top_gate": float(np.median(g.max(axis=1))), "least_used": float(usage.min()),
           "most_used": float(usage.max())}
    for lab in labels:
        if lab in adata.obs and adata.obs[lab].notna().any():
            out[f"nmi_{lab}"] = routing_agreement(adata, lab, key=key).nmi
    return pd.Series(out, name=key)
