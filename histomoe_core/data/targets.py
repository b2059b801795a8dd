"""Regression targets from raw counts: log1p of raw counts (HEST-Bench) or of library-size-normalised counts."""
from __future__ import annotations

from typing import Literal, Sequence

import anndata as ad
import numpy as np
import scipy.sparse as sp

from histomoe_core.errors import DataError

TargetKind = Literal["log1p", "log1p_norm"]
TARGET_KINDS: tuple[str, ...] = ("log1p", "log1p_norm")
#: counts per spot after library-size normalisation
NORM_TARGET_SUM = 1e4


def dense(x) -> np.ndarray:
    return np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float32)


def make_targets(adata: ad.AnnData, genes: Sequence[str], *, kind: TargetKind = "log1p") -> np.ndarray:
    """(spots x genes) float32 targets for ``genes`` (normalisation uses all of the sample's genes)."""
    if kind not in TARGET_KINDS:
        raise ValueError(f"unknown target kind {kind!r}; choose one of {TARGET_KINDS}")
    missing = [g for g in genes if g not in adata.var_names]
    if missing:
        raise DataError(f"genes {missing[:5]} are not measured in sample {next(iter(adata.obs.get('sample_id', ['?'])), '?')}")
    raw = dense(adata[:, list(genes)].X)
    if kind == "log1p":
        return np.log1p(raw)
    lib = np.asarray(adata.X.sum(axis=1), dtype=np.float64).ravel()
    lib[lib == 0] = 1.0
    return np.log1p(raw / lib[:, None] * NORM_TARGET_SUM).astype(np.float32)
