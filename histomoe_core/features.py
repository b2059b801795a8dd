"""Per-fold arrays for training and evaluation: image embeddings, metadata embeddings, context labels,
targets on the fold's gene panel, and the section / patient of every spot.

``spot_table(samples, img_emb, meta_emb)`` stacks all spots of a dataset once;
``fold_arrays(table, samples, fold, genes=..., kind=...)`` cuts it into the fold's train and test
:class:`FoldData` (targets computed only for the fold's genes).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Mapping, Sequence

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
    #: (N, G) bool, True where a gene is measured and scored for a spot (None: every gene of every spot);
    #: unmeasured entries of ``y`` are 0 and must be ignored by every loss and metric
    mask: np.ndarray | None = None
    #: (N, C) float32 spatial-context features only a router reads (``router_input="spatial"`` or
    #: ``"image+spatial"``, :mod:`~histomoe_core.spatial_context`); None: none
    spatial: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.x)

    def take(self, mask_or_idx: np.ndarray) -> "FoldData":
        i = np.asarray(mask_or_idx)
        return replace(self, x=self.x[i], meta=self.meta[i], context=self.context[i], y=self.y[i],
                       sample=self.sample[i], patient=self.patient[i], spot=self.spot[i],
                       mask=None if self.mask is None else self.mask[i],
                       spatial=None if self.spatial is None else self.spatial[i])

    def context_names(self) -> np.ndarray:
        """The context name of every spot."""
        return np.asarray(self.contexts, dtype=object)[self.context] if self.contexts else self.context.astype(str)

    def scoring_context(self) -> np.ndarray | None:
        """Context names to score by (the macro mean over contexts of per-context HEST metrics) for data with
        per-context panels (a mask); None for one pooled panel, scored as HEST-Bench does."""
        return self.context_names() if self.mask is not None and len(np.unique(self.context)) > 1 else None

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
    spatial: np.ndarray | None = None  #: (N, C) router-only spatial context (:func:`~histomoe_core.spatial_context.apply_context`)


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
                kind: str = "log1p", scored: Callable[[str], Sequence[str]] | None = None
                ) -> tuple[FoldData, FoldData]:
    """Train and test :class:`FoldData` of ``fold`` with targets of ``kind`` on ``genes``.

    ``scored(sample_id)`` gives the genes scored in that section (a subset of ``genes``); those it measures are
    filled in, the rest stay 0 and are masked out (:attr:`FoldData.mask`). None: every gene of every
    section. Gene names may carry a species prefix (``"mouse:Actb"``, see
    :func:`~histomoe_core.data.genes.gene_key`); targets are read under the bare symbol.
    """
    out = []
    for ids in (fold.train, fold.test):
        idx = np.concatenate([np.flatnonzero(table.sample == i) for i in ids])
        if scored is None:
            y, mask = targets(samples, genes, kind, ids), None
        else:
            y, mask = masked_targets(samples, genes, kind, ids, scored)
        if len(y) != len(idx):
            raise DataError(f"fold {fold.name}: {len(idx)} embedded spots but {len(y)} target rows")
        out.append(FoldData(table.x[idx], table.meta[idx], table.context[idx], y, table.sample[idx],
                            table.patient[idx], table.spot[idx], tuple(genes), table.contexts, mask,
                            None if table.spatial is None else table.spatial[idx]))
    return out[0], out[1]


def masked_targets(samples: SampleSet, genes: Sequence[str], kind: str, ids: Sequence[str],
                   scored: Callable[[str], Sequence[str]]) -> tuple[np.ndarray, np.ndarray]:
    """Targets on ``genes`` (0 where not scored) and the mask of scored entries, section by section."""
    from histomoe_core.data.genes import symbol_of

    col = {g: j for j, g in enumerate(genes)}
    ys, ms = [], []
    for i in ids:
        measured = set(map(str, samples[i].adata.var_names))
        keep = [g for g in scored(i) if g in col and symbol_of(g) in measured]  # a gene a section lacks: masked
        y = np.zeros((samples[i].n_spots, len(genes)), np.float32)
        m = np.zeros(y.shape, bool)
        if keep:
            cols = [col[g] for g in keep]
            y[:, cols] = make_targets(samples[i].adata, [symbol_of(g) for g in keep], kind=kind)
            m[:, cols] = True
        ys.append(y)
        ms.append(m)
    return np.concatenate(ys), np.concatenate(ms)


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
    Data with per-context panels (a mask) hold out one group of every context that has two or more.
    """
    keys = getattr(data, inner_group_by(data, by))
    uniq = np.unique(keys)
    if len(uniq) < 2:
        raise ValueError("an inner validation split needs at least two sections in the training fold")
    rng = np.random.default_rng(seed)
    if data.mask is not None and len(np.unique(data.context)) > 1:
        held = [g[rng.integers(len(g))] for c in np.unique(data.context)
                for g in [np.unique(keys[data.context == c])] if len(g) > 1]
        if held:
            val = np.isin(keys, held)
            return ~val, val
    val = keys == uniq[rng.integers(len(uniq))]
    return ~val, val


def group_folds(data: FoldData, *, by: str = "patient", max_folds: int = 5) -> list[tuple[np.ndarray, np.ndarray]]:
    """Leave-one-group-out (train, val) index pairs over the groups of :func:`inner_group_by`, merging groups
    into at most ``max_folds`` folds. Data with per-context panels (a mask) get folds stratified by context:
    each context's groups are dealt round-robin over the folds, and a context with a single group is never
    validated on (its spots always train), unless every context has a single group."""
    keys = getattr(data, inner_group_by(data, by))
    uniq = np.unique(keys)
    if len(uniq) < 2:
        raise ValueError("inner cross-validation needs at least two sections in the training fold")
    if data.mask is not None and len(np.unique(data.context)) > 1:
        folds = _stratified_group_folds(keys, data.context, max_folds)
        if folds:
            return folds  # else every context has one group: fall back to plain group folds
    chunks = np.array_split(uniq, min(max_folds, len(uniq)))
    return [(np.flatnonzero(~np.isin(keys, c)), np.flatnonzero(np.isin(keys, c))) for c in chunks]


def _stratified_group_folds(keys: np.ndarray, context: np.ndarray, max_folds: int) -> list[tuple[np.ndarray, np.ndarray]]:
    per_ctx: dict = {}
    for c, g in dict.fromkeys(zip(context.tolist(), keys.tolist())):
        per_ctx.setdefault(c, []).append(g)
    k = min(max_folds, max(len(g) for g in per_ctx.values()))
    fold_of = {g: i % k for gs in per_ctx.values() if len(gs) > 1 for i, g in enumerate(sorted(gs))}
    assign = np.array([fold_of.get(g, -1) for g in keys.tolist()])
    return [(np.flatnonzero(assign != i), np.flatnonzero(assign == i)) for i in range(k) if (assign == i).any()]


def centre_sections(data):
    """Training targets with each section's mean moved to the pooled training mean (per gene; with a mask,
    means over measured entries only, unmeasured entries left at 0)."""
    y = data.y.astype(np.float64)
    w = np.ones(y.shape) if data.mask is None else data.mask.astype(np.float64)
    pooled = (y * w).sum(0) / np.maximum(w.sum(0), 1)
    out = y.copy()
    for s in np.unique(data.sample):
        m = data.sample == s
        sec = (y[m] * w[m]).sum(0) / np.maximum(w[m].sum(0), 1)
        out[m] += (pooled - sec) * w[m]
    return replace(data, y=out.astype(np.float32))
