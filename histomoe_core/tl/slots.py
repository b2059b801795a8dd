"""Where HistoMoE results live in an AnnData (one place, so tools and plots agree).

For ``key = "histomoe"``:

- ``layers["histomoe"]``: predicted expression (spots x genes; NaN for genes outside the model's panel)
- ``var["histomoe_panel"]``: True for the genes the model predicts
- ``obsm["histomoe_gates"]``: gate weights (spots x experts, rows sum to 1)
- ``obsm["histomoe_experts"]``: each expert's prediction (spots x experts x panel genes), optional
- ``obs["histomoe_expert"]``: dominant expert (categorical ``e0``, ``e1``, ...)
- ``obs["histomoe_gate_entropy"]``: gate entropy / log(n_experts)
- ``uns["histomoe"]``: ``experts``, ``genes`` (panel order), ``params`` (how the results were made)
"""
from __future__ import annotations

from typing import Sequence

import anndata as ad
import numpy as np
import pandas as pd


def slot_names(key: str) -> dict[str, str]:
    return {
        "pred": key, "panel": f"{key}_panel", "gates": f"{key}_gates", "experts": f"{key}_experts",
        "expert": f"{key}_expert", "entropy": f"{key}_gate_entropy",
    }


def write_results(
    adata: ad.AnnData,
    pred: np.ndarray,
    gates: np.ndarray,
    *,
    genes: Sequence[str],
    expert_preds: np.ndarray | None = None,
    key_added: str = "histomoe",
    experts: Sequence[str] | None = None,
    params: dict | None = None,
) -> None:
    """Store predictions, gates and per-expert outputs of ``len(adata)`` spots in the slots listed above."""
    from histomoe_core.tl.routing import dominant_expert, expert_names, gate_entropy

    genes = [str(g) for g in genes]
    pred = np.asarray(pred, dtype=np.float32)
    gates = np.asarray(gates, dtype=np.float32)
    n = adata.n_obs
    if pred.shape != (n, len(genes)):
        raise ValueError(f"predictions have shape {pred.shape}; expected ({n}, {len(genes)}) for {n} spots x panel genes")
    if gates.ndim != 2 or gates.shape[0] != n:
        raise ValueError(f"gates have shape {gates.shape}; expected ({n}, n_experts)")
    missing = [g for g in genes if g not in adata.var_names]
    if missing:
        raise KeyError(f"{len(missing)} panel genes are not in adata.var_names (e.g. {missing[:3]}); "
                       "predict on an AnnData that has the panel genes as variables")
    names = slot_names(key_added)
    col = adata.var_names.get_indexer(genes)
    if len(genes) == adata.n_vars and (col == np.arange(adata.n_vars)).all():
        layer = pred
    else:
        layer = np.full((n, adata.n_vars), np.nan, dtype=np.float32)
        layer[:, col] = pred
    adata.layers[names["pred"]] = layer
    adata.var[names["panel"]] = np.isin(np.arange(adata.n_vars), col)
    adata.obsm[names["gates"]] = gates
    if expert_preds is not None:
        expert_preds = np.asarray(expert_preds, dtype=np.float32)
        if expert_preds.shape != (n, gates.shape[1], len(genes)):
            want = (n, gates.shape[1], len(genes))
            raise ValueError(f"expert predictions have shape {expert_preds.shape}; expected {want}")
        adata.obsm[names["experts"]] = expert_preds
    experts = [str(e) for e in experts] if experts is not None else expert_names(gates.shape[1])
    if len(experts) != gates.shape[1]:
        raise ValueError(f"{len(experts)} expert names for {gates.shape[1]} gate columns")
    adata.obs[names["expert"]] = pd.Categorical(np.asarray(experts)[dominant_expert(gates)], categories=experts)
    adata.obs[names["entropy"]] = gate_entropy(gates).astype(np.float32)
    adata.uns[key_added] = {"experts": experts, "genes": genes, "params": _jsonable(params or {})}


def _jsonable(d: dict) -> dict:
    """Drop None values and turn tuples into lists so the dict writes to h5ad."""
    out = {}
    for k, v in d.items():
        if v is None:
            continue
        if isinstance(v, dict):
            v = _jsonable(v)
        elif isinstance(v, (tuple, list)):
            v = [str(x) if x is None else x for x in v]
        out[str(k)] = v
    return out


def read_results(adata: ad.AnnData, *, key: str = "histomoe") -> dict:
    """The stored results as arrays: ``pred`` (spots x panel genes), ``gates``, ``expert_preds`` (or None),
    ``genes``, ``experts``."""
    if key not in adata.uns or slot_names(key)["gates"] not in adata.obsm:
        raise KeyError(f"no HistoMoE results under key {key!r}; run tl.predict(adata, model, key_added={key!r})")
    names = slot_names(key)
    genes = [str(g) for g in adata.uns[key]["genes"]]
    col = adata.var_names.get_indexer(genes)
    return {
        "pred": np.asarray(adata.layers[names["pred"]])[:, col],
        "gates": np.asarray(adata.obsm[names["gates"]]),
        "expert_preds": np.asarray(adata.obsm[names["experts"]]) if names["experts"] in adata.obsm else None,
        "genes": genes,
        "experts": [str(e) for e in adata.uns[key]["experts"]],
    }


def section_index(adata: ad.AnnData, sample) -> np.ndarray:
    """Row positions in ``adata`` of ``sample``'s spots, in ``sample.adata.obs_names`` order.

    ``adata`` may hold one section or several (then rows are picked by ``obs["sample_id"]``); spots are matched
    on ``obs["spot_id"]`` when present (concatenated results), else on ``obs_names``.
    """
    obs = adata.obs
    rows = np.arange(adata.n_obs)
    if "sample_id" in obs:
        rows = np.flatnonzero(obs["sample_id"].astype(str).to_numpy() == sample.sample_id)
    ids = (obs["spot_id"] if "spot_id" in obs else obs.index.to_series()).astype(str).to_numpy()[rows]
    pos = pd.Index(ids).get_indexer(sample.adata.obs_names)
    if (pos < 0).any():
        raise KeyError(f"{int((pos < 0).sum())} spots of {sample.sample_id} are not in the AnnData "
                       f"(e.g. {sample.adata.obs_names[pos < 0][:3].tolist()}); pass the results of that section")
    return rows[pos]
