"""Per-fold arrays for training and evaluation: image embeddings, metadata embeddings, context labels,
targets on the fold's gene panel, and the section / patient of every spot.

``spot_table(samples, img_emb, meta_emb)`` stacks all spots of a dataset once;
``fold_arrays(table, samples, fold, genes=..., kind=...)`` cuts it into the fold's train and test
:class:`FoldData` (targets computed only for the fold's genes).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping, Sequence

import numpy as np

from histomoe_core.data.sample import SampleSet
from histomoe_core.data.splits import Fold
from histomoe_core.data.targets import make_targets
from histomoe_core.errors import DataError


@dataclass
class FoldData:
    """Spots of one side of a fold. Row i of every array is the same spot."""

    x: np.ndarray  #: (N, D) float32 image embeddings
    meta: np.ndarray  #: (N, M) float32 metadata embedding of the spot's section (M may be 0)
    context: np.ndarray  #: (N,) int64 context label (index into ``contexts``)
    y: np.ndarray  #: (N, G) float32 targets
    sample: np.ndarray  #: (N,) section ids
    patient: np.ndarray  #: (N,) patient ids
    spot: np.ndarray  #: (N,) spot ids (obs_names)
    genes: tuple[str, ...] = ()
    contexts: tuple[str, ...] = ()  #: context names, indexed by ``context``

    def __len__(self) -> int:
        return len(self.x)

    def take(self, mask_or_idx: np.ndarray) -> "FoldData":
        i = np.asarray(mask_or_idx)
        return replace(self, x=self.x[i], meta=self.meta[i], context=self.context[i], y=self.y[i],
                       sample=self.sample[i], patient=self.patient[i], spot=self.spot[i])

    def groups(self, by: str = "patient") -> np.ndarray:
        """Integer group id per spot (``by`` = "patient" or "sample")."""
        return np.unique(getattr(self, by), return_inverse=True)[1]


@dataclass
class SpotTable:
    """All spots of a dataset with their embeddings (no targets yet)."""

    x: np.ndarray
    meta: np.ndarray
    context: np.ndarray
    sample: np.ndarray
    patient: np.ndarray
    spot: np.ndarray
    contexts: tuple[str, ...]


def context_labels(samples: SampleSet, key: str = "organ") -> dict[str, str]:
    """Sample id -> context name (``sample.meta[key]``, e.g. organ or cancer_type; "unknown" if missing)."""
    return {s.sample_id: str(s.meta.get(key) or "unknown") for s in samples}


def spot_table(samples: SampleSet, img_emb: Mapping[str, np.ndarray], meta_emb: Mapping[str, np.ndarray] | None = None,
               *, context_key: str = "organ") -> SpotTable:
    """Stack the embeddings of every sample (rows in ``adata.obs_names`` order)."""
    ctx = context_labels(samples, context_key)
    names = tuple(sorted(set(ctx.values())))
    xs, ms, cs, ss, ps, sp = [], [], [], [], [], []
    for s in samples:
        if s.sample_id not in img_emb:
            raise DataError(f"no image embeddings for sample {s.sample_id}; run embed_samples on this dataset first")
        x = np.asarray(img_emb[s.sample_id], dtype=np.float32)
        if len(x) != s.n_spots:
            raise DataError(f"{s.sample_id}: {len(x)} embedding rows for {s.n_spots} spots; the embedding cache is stale")
        m = np.zeros(0, np.float32) if meta_emb is None else np.asarray(meta_emb[s.sample_id], dtype=np.float32).ravel()
        xs.append(x)
        ms.append(np.broadcast_to(m, (len(x), m.size)))
        cs.append(np.full(len(x), names.index(ctx[s.sample_id]), dtype=np.int64))
        ss.append(np.full(len(x), s.sample_id, dtype=object))
        ps.append(np.full(len(x), s.patient, dtype=object))
        sp.append(np.asarray(s.adata.obs_names, dtype=object))
    return SpotTable(np.concatenate(xs), np.concatenate(ms).astype(np.float32), np.concatenate(cs),
                     np.concatenate(ss).astype(str), np.concatenate(ps).astype(str), np.concatenate(sp).astype(str), names)


def targets(samples: SampleSet, genes: Sequence[str], kind: str, ids: Sequence[str]) -> np.ndarray:
    return np.concatenate([make_targets(samples[i].adata, list(genes), kind=kind) for i in ids]).astype(np.float32)


def fold_arrays(table: SpotTable, samples: SampleSet, fold: Fold, *, genes: Sequence[str],
                kind: str = "log1p") -> tuple[FoldData, FoldData]:
    """Train and test :class:`FoldData` of ``fold`` with targets of ``kind`` on ``genes``."""
    out = []
    for ids in (fold.train, fold.test):
        idx = np.concatenate([np.flatnonzero(table.sample == i) for i in ids])
        y = targets(samples, genes, kind, ids)
        if len(y) != len(idx):
            raise DataError(f"fold {fold.name}: {len(idx)} embedded spots but {len(y)} target rows")
        out.append(FoldData(table.x[idx], table.meta[idx], table.context[idx], y, table.sample[idx],
                            table.patient[idx], table.spot[idx], tuple(genes), table.contexts))
    return out[0], out[1]


#: inner cross-validation groups by patient only when the training fold has at least this many patients
MIN_INNER_PATIENTS = 3


def inner_group_by(data: FoldData, by: str = "patient") -> str:
    """What inner folds group by: ``by`` ("patient"), or "sample" (sections) when the training fold has fewer than
    :data:`MIN_INNER_PATIENTS` patients (two patients give two inner folds, each fitting on one patient alone, too
    few and too small to choose a hyperparameter: on her2st every alpha scored <= 0 that way)."""
    if by == "patient" and len(np.unique(data.patient)) < MIN_INNER_PATIENTS:
        return "sample"
    return by


def inner_split(data: FoldData, *, seed: int = 0, by: str = "patient") -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks (train, val) holding out one group (see :func:`inner_group_by`) for validation.

    The held-out group is drawn with ``seed`` among the groups, so different seeds validate on different groups.
    """
    keys = getattr(data, inner_group_by(data, by))
    uniq = np.unique(keys)
    if len(uniq) < 2:
        raise ValueError("an inner validation split needs at least two sections in the training fold")
    held = uniq[np.random.default_rng(seed).integers(len(uniq))]
    val = keys == held
    return ~val, val


def group_folds(data: FoldData, *, by: str = "patient", max_folds: int = 5) -> list[tuple[np.ndarray, np.ndarray]]:
    """Leave-one-group-out (train, val) index pairs over the groups of :func:`inner_group_by`, merging groups
    into at most ``max_folds`` folds."""
    keys = getattr(data, inner_group_by(data, by))
    uniq = np.unique(keys)
    if len(uniq) < 2:
        raise ValueError("inner cross-validation needs at least two sections in the training fold")
    chunks = np.array_split(uniq, min(max_folds, len(uniq)))
    return [(np.flatnonzero(~np.isin(keys, c)), np.flatnonzero(np.isin(keys, c))) for c in chunks]


def centre_sections(data):
    """Training targets with each section's mean moved to the pooled training mean (per gene)."""
    y = data.y.astype(np.float64)
    pooled = y.mean(0)
    out = y.copy()
    for s in np.unique(data.sample):
        m = data.sample == s
        out[m] += pooled - y[m].mean(0)
    return replace(data, y=out.astype(np.float32))
