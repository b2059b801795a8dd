"""Baselines on the same embeddings as HistoMoE (registry ``BASELINES``; every entry builds an estimator with
``fit(train: FoldData, *, seed) -> self`` and ``predict(data: FoldData) -> (N, G)``).

- ``ridge_hest``: HEST-Bench's head: StandardScaler -> PCA(256) -> Ridge(fit_intercept=False, solver="lsqr",
  alpha = 100 / (n_pca_features * n_genes)), all fit on the training fold.
- ``ridge_cv``: the same features, ridge alpha chosen by grouped inner cross-validation on the HEST metric
  (pooled Pearson), with an intercept; inner folds group by patient, by section when the training fold has fewer
  than three patients; the alpha grid is widened while the best alpha lies on its edge.
- ``knn``: BLEEP-style retrieval: mean target of the k most cosine-similar training spots in the
  standardised PCA space, k chosen by inner patient-grouped CV (or fixed).
- ``per_context``: one ``ridge_cv`` per context label (organ / cancer type); contexts unseen in training fall
  back to a model fit on all training spots.
- ``mlp``: a single MLP (a one-expert HistoMoE) with about the parameter count of the reference MoE, trained
  with the same loop (:mod:`histomoe_core.train`).

The linear-algebra helpers (:class:`Preprocess`, :func:`ridge_path`, :func:`cv_ridge_alpha`, :func:`knn_predict`)
are shared with the MoE estimator, which can start from the ridge solution and use retrieval as an expert.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from histomoe_core.evaluate import hest_metric
from histomoe_core.features import FoldData, group_folds, inner_group_by
from histomoe_core.pca import standard_pca
from histomoe_core.registry import Registry

BASELINES: Registry[Any] = Registry("baseline")

#: ridge penalties tried by inner cross-validation (features are standardised PCA scores)
ALPHAS = tuple(float(a) for a in np.logspace(-1, 6, 29))
#: neighbour counts tried by inner cross-validation
KS = (5, 10, 20, 50, 100, 200)


class Estimator(Protocol):
    name: str

    def fit(self, data: FoldData, *, seed: int = 0) -> "Estimator": ...

    def predict(self, data: FoldData) -> np.ndarray: ...


# ----------------------------------------------------------------------------------------------------------
# shared linear algebra


@dataclass
class Preprocess:
    """StandardScaler -> PCA(n_components) fit on training embeddings (numpy; float64)."""

    n_components: int | None = 256
    mean: np.ndarray = field(default=None, repr=False)
    scale: np.ndarray = field(default=None, repr=False)
    components: np.ndarray = field(default=None, repr=False)  # (D, P)

    def fit(self, x: np.ndarray) -> "Preprocess":
        k = self.n_components
        k = None if k is None else min(k, *np.shape(x))
        self.mean, self.scale, self.components = standard_pca(np.asarray(x), k)
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        return ((np.asarray(x, dtype=np.float64) - self.mean) / self.scale) @ self.components


def ridge_path(z: np.ndarray, y: np.ndarray, alphas: Sequence[float], *, intercept: bool = True):
    """Ridge solutions for every alpha from one eigendecomposition: returns ``(coefs (A, P, G), intercepts (A, G))``."""
    return ridge_solve(ridge_basis(z, y, intercept=intercept), alphas)


def ridge_basis(z: np.ndarray, y: np.ndarray, *, intercept: bool = True) -> tuple:
    """What every ridge solution of ``(z, y)`` shares: the means, the eigendecomposition ``V diag(lam) V'`` of the
    centred ``z'z`` and ``V' z'y`` (then ``coef(alpha) = V diag(1 / (lam + alpha)) V' z'y``, the SVD solution)."""
    zm = z.mean(0) if intercept else np.zeros(z.shape[1])
    ym = y.mean(0) if intercept else np.zeros(y.shape[1])
    zc = z - zm
    lam, v = np.linalg.eigh(zc.T @ zc)
    return zm, ym, np.maximum(lam, 0.0), v, v.T @ (zc.T @ (y - ym))


def ridge_solve(basis: tuple, alphas: Sequence[float]):
    """``(coefs (A, P, G), intercepts (A, G))`` for every alpha from a :func:`ridge_basis`."""
    zm, ym, lam, v, vtzy = basis
    coefs = np.stack([v @ (vtzy / (lam + a)[:, None]) for a in alphas])
    intercepts = ym[None] - np.einsum("p,apg->ag", zm, coefs)
    return coefs, intercepts


def mask_groups(mask: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(rows, genes)`` index pairs: the genes measured on exactly the same training rows, for each such pattern."""
    cols = np.asarray(mask, bool).T
    _, first, inverse = np.unique(np.packbits(cols, axis=1), axis=0, return_index=True, return_inverse=True)
    return [(np.flatnonzero(cols[i]), np.flatnonzero(inverse.ravel() == k)) for k, i in enumerate(first)]


def masked_ridge_bases(z: np.ndarray, y: np.ndarray, mask: np.ndarray | None = None) -> list:
    """``(genes, basis)`` per measured-rows pattern (one pattern, all genes, without ``mask``); genes measured on
    fewer than two rows are left out (their coefficients and intercepts stay zero)."""
    if mask is None:
        return [(slice(None), ridge_basis(z, y))]
    return [(genes, ridge_basis(z[rows], y[np.ix_(rows, genes)])) for rows, genes in mask_groups(mask) if len(rows) >= 2]


def masked_ridge_solve(bases: list, alphas: Sequence[float], shape: tuple[int, int]):
    """:func:`ridge_solve` over the patterns of :func:`masked_ridge_bases`; ``shape`` is ``(P, G)``."""
    coefs = np.zeros((len(alphas), *shape))
    intercepts = np.zeros((len(alphas), shape[1]))
    for genes, basis in bases:
        coefs[:, :, genes], intercepts[:, genes] = ridge_solve(basis, alphas)
    return coefs, intercepts


def masked_ridge_path(z: np.ndarray, y: np.ndarray, alphas: Sequence[float], mask: np.ndarray | None = None):
    """:func:`ridge_path` where each gene is fit on the rows that measure it (``mask``); genes measured on fewer
    than two rows get zero coefficients and intercepts."""
    return masked_ridge_solve(masked_ridge_bases(z, y, mask), alphas, (z.shape[1], y.shape[1]))


class GridEdgeWarning(RuntimeWarning):
    """Inner CV chose a value on the edge of its (widened) grid."""


@dataclass(frozen=True)
class GridSearch:
    """The outcome of an inner-CV search: the best value, every value tried (in order) with its mean inner-fold
    HEST metric, and whether the best still lies on the edge of the (widened) grid."""

    best: float
    grid: tuple
    scores: np.ndarray
    at_edge: bool


def grid_search(evaluate: Callable[[list], np.ndarray], grid: Sequence, *, widen: Callable[[list, int], list],
                rounds: int = 3, what: str = "value") -> GridSearch:
    """Maximise ``evaluate(values) -> scores`` over ``grid``; while the best is on an edge, add the values
    ``widen(grid, side)`` gives beyond that edge (side -1 low, +1 high), at most ``rounds`` times, then warn."""
    grid = list(grid)
    scores = np.asarray(evaluate(grid), dtype=np.float64)
    for _ in range(rounds + 1):
        i = int(np.nanargmax(scores))
        side = -1 if i == 0 else 1 if i == len(grid) - 1 else 0
        new = widen(grid, side) if side and len(grid) > 1 else []
        if not new or _ == rounds:
            break
        new_scores = np.asarray(evaluate(new), dtype=np.float64)
        grid, scores = (new + grid, np.r_[new_scores, scores]) if side < 0 else (grid + new, np.r_[scores, new_scores])
    i = int(np.nanargmax(scores))
    at_edge = len(grid) > 1 and i in (0, len(grid) - 1)
    if at_edge:
        warnings.warn(f"inner CV chose {what} {grid[i]:g}, the edge of the searched grid "
                      f"[{grid[0]:g}, {grid[-1]:g}]: the optimum may lie beyond it", GridEdgeWarning, stacklevel=3)
    return GridSearch(grid[i], tuple(grid), scores, at_edge)


def _widen_log(grid: list, side: int, steps: int = 4) -> list:
    """Four more log-spaced values beyond one end of ``grid`` (its own ratio at that end)."""
    if side < 0:
        r = grid[1] / grid[0]
        return [grid[0] / r**k for k in range(steps, 0, -1)]
    r = grid[-1] / grid[-2]
    return [grid[-1] * r**k for k in range(1, steps + 1)]


def cv_ridge_alpha(z: np.ndarray, y: np.ndarray, folds, alphas: Sequence[float] = ALPHAS, *,
                   mask: np.ndarray | None = None, context: np.ndarray | None = None) -> GridSearch:
    """Ridge alpha with the best mean inner-fold HEST metric (grid widened while the best is on its edge);
    with ``mask`` / ``context``, masked fits and the per-context macro metric."""
    bases: dict[int, list] = {}  # one SVD per inner fold (and mask pattern), reused when the grid widens

    def evaluate(grid: list) -> np.ndarray:
        scores = np.zeros(len(grid))
        for j, (tr, va) in enumerate(folds):
            if j not in bases:
                bases[j] = masked_ridge_bases(z[tr], y[tr], _rows(mask, tr))
            coefs, b = masked_ridge_solve(bases[j], grid, (z.shape[1], y.shape[1]))
            for i in range(len(grid)):
                scores[i] += hest_metric(y[va], z[va] @ coefs[i] + b[i], _rows(mask, va), _rows(context, va)) / len(folds)
        return scores

    return grid_search(evaluate, [float(a) for a in alphas], widen=_widen_log, what="ridge alpha")


def _rows(a: np.ndarray | None, idx: np.ndarray) -> np.ndarray | None:
    return None if a is None else a[idx]


def knn_predict(bank_z: np.ndarray, bank_y: np.ndarray, query_z: np.ndarray, ks: Sequence[int], *,
                bank_mask: np.ndarray | None = None, chunk: int = 512) -> dict[int, np.ndarray]:
    """Mean target of the k most cosine-similar bank rows, for every k in ``ks`` (one sort per query chunk).

    With ``bank_mask`` a gene is averaged over the neighbours that measure it (its bank mean when none does)."""
    def unit(a):
        return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)

    bank = unit(bank_z)
    kmax = min(max(ks), len(bank))
    w = None if bank_mask is None else np.asarray(bank_mask, np.float64)
    yw = bank_y if w is None else bank_y * w
    fallback = None if w is None else yw.sum(0) / np.maximum(w.sum(0), 1)
    out = {k: np.zeros((len(query_z), bank_y.shape[1])) for k in ks}
    for s in range(0, len(query_z), chunk):
        order = top_k_order(unit(query_z[s:s + chunk]) @ bank.T, kmax)
        sums = _neighbour_sums(order, yw, w, sorted({min(k, kmax) for k in ks}))
        for k in ks:
            total, cnt = sums[min(k, kmax)]
            if cnt is None:
                out[k][s:s + chunk] = total / min(k, kmax)
            else:
                out[k][s:s + chunk] = np.where(cnt > 0, total / np.maximum(cnt, 1), fallback)
    return out


def _neighbour_sums(order: np.ndarray, yw: np.ndarray, w: np.ndarray | None, ks: list[int]) -> dict:
    """``{k: (sum of yw, sum of w)}`` over each row's first ``k`` neighbours in ``order``, for ascending ``ks``:
    one sparse selection matrix per segment between consecutive ks (no (Q, k, G) intermediate)."""
    from scipy import sparse

    q, n = len(order), len(yw)
    total, cnt, prev, out = np.zeros((q, yw.shape[1])), None if w is None else np.zeros((q, w.shape[1])), 0, {}
    for k in ks:
        width = k - prev
        pick = sparse.csr_matrix((np.ones(q * width), order[:, prev:k].ravel(), np.arange(0, q * width + 1, width)),
                                 shape=(q, n))
        total = total + pick @ yw
        cnt = None if w is None else cnt + pick @ w
        out[k], prev = (total, cnt), k
    return out


def top_k_order(sim: np.ndarray, k: int) -> np.ndarray:
    """``(Q, k)`` column indices of each row's ``k`` largest values, largest first, ties by lower index (what a
    stable full sort gives), from a partial sort."""
    if k >= sim.shape[1]:
        return np.argsort(-sim, axis=1, kind="stable")[:, :k]
    part = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    vals = np.take_along_axis(sim, part, 1)
    kth = vals.min(1, keepdims=True)
    if ((sim == kth).sum(1) > (vals == kth).sum(1)).any():  # a tie across the cut
        return np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(part, np.lexsort((part, -vals), axis=1), 1)


def cv_knn_k(z: np.ndarray, y: np.ndarray, folds, ks: Sequence[int] = KS, *, mask: np.ndarray | None = None,
             context: np.ndarray | None = None) -> GridSearch:
    """Neighbour count with the best mean inner-fold HEST metric (larger / smaller k tried while on an edge)."""
    n_bank = min(len(tr) for tr, _ in folds)

    def evaluate(grid: list) -> np.ndarray:
        scores = np.zeros(len(grid))
        for tr, va in folds:
            preds = knn_predict(z[tr], y[tr], z[va], grid, bank_mask=_rows(mask, tr))
            for i, k in enumerate(grid):
                scores[i] += hest_metric(y[va], preds[k], _rows(mask, va), _rows(context, va)) / len(folds)
        return scores

    def widen(grid: list, side: int) -> list:
        new = sorted({max(1, grid[0] // 2), max(1, grid[0] - 2)} - set(grid)) if side < 0 else \
            sorted({min(n_bank, 2 * grid[-1]), min(n_bank, 4 * grid[-1])} - set(grid))
        return [int(k) for k in new]

    return grid_search(evaluate, [int(k) for k in ks], widen=widen, what="k")


# ----------------------------------------------------------------------------------------------------------
# estimators


def _search_info(est) -> dict:
    """What an estimator's inner-CV search recorded (nothing when its value was fixed)."""
    search = getattr(est, "search", None)
    if search is None:
        return {}
    return {"inner_cv_groups": est.inner_by, "grid": [float(g) for g in search.grid], "at_edge": search.at_edge}


@BASELINES.register("ridge_hest")
class HESTRidge:
    """HEST-Bench ridge: scaler + PCA-256 + Ridge(alpha = 100 / (P * G), no intercept, lsqr)."""


    def __init__(self, *, n_components: int = 256, name: str = "ridge_hest") -> None:
        self.name, self.n_components = name, n_components

    def fit(self, data: FoldData, *, seed: int = 0) -> "HESTRidge":
        from sklearn.decomposition import PCA
        from sklearn.linear_model import Ridge
        from sklearn.pipeline import Pipeline
        from sklearn.preprocessing import StandardScaler

        k = min(self.n_components, *data.x.shape)
        self.pipe = Pipeline([("scaler", StandardScaler()), ("pca", PCA(n_components=k, random_state=0))])
        z = self.pipe.fit_transform(data.x)
        self.alpha = 100.0 / (z.shape[1] * data.y.shape[1])
        mask = np.ones(data.y.shape, bool) if data.mask is None else data.mask
        self.coef = np.zeros((data.y.shape[1], z.shape[1]))
        for rows, genes in mask_groups(mask):  # one fit when every gene is measured on every spot
            if len(rows) >= 2:
                reg = Ridge(alpha=self.alpha, fit_intercept=False, solver="lsqr", max_iter=1000, random_state=0)
                self.coef[genes] = reg.fit(z[rows], data.y[np.ix_(rows, genes)]).coef_
        return self

    def predict(self, data: FoldData) -> np.ndarray:
        return (self.pipe.transform(data.x) @ self.coef.T).astype(np.float32)

    def info(self) -> dict:
        return {"alpha": self.alpha}


@BASELINES.register("ridge_cv")
class RidgeCV:
    """Scaler + PCA + ridge with an intercept; alpha by grouped inner CV (:func:`inner_group_by`) on the HEST metric."""


    def __init__(self, *, n_components: int | None = 256, alphas: Sequence[float] = ALPHAS, alpha: float | None = None,
                 name: str = "ridge_cv") -> None:
        self.name, self.alphas, self.fixed_alpha = name, tuple(alphas), alpha
        self.prep = Preprocess(n_components)

    def fit(self, data: FoldData, *, seed: int = 0, z: np.ndarray | None = None) -> "RidgeCV":
        if z is None:
            z = self.prep.fit(data.x).transform(data.x)
        y = data.y.astype(np.float64)
        if self.fixed_alpha is None:
            self.inner_by = inner_group_by(data)
            self.search = cv_ridge_alpha(z, y, group_folds(data), self.alphas, mask=data.mask,
                                         context=data.scoring_context())
            self.alpha = float(self.search.best)
        else:
            self.alpha = float(self.fixed_alpha)
        coefs, b = masked_ridge_path(z, y, [self.alpha], data.mask)
        self.coef, self.intercept = coefs[0], b[0]
        return self

    def predict_z(self, z: np.ndarray) -> np.ndarray:
        return (z @ self.coef + self.intercept).astype(np.float32)

    def predict(self, data: FoldData) -> np.ndarray:
        return self.predict_z(self.prep.transform(data.x))

    def info(self) -> dict:
        return {"alpha": self.alpha, **_search_info(self)}


@BASELINES.register("knn")
class KNNRetrieval:
    """Nearest-neighbour retrieval of training spots (cosine, standardised PCA space); k by inner CV."""


    def __init__(self, *, n_components: int | None = 256, k: int | None = None, ks: Sequence[int] = KS,
                 name: str = "knn") -> None:
        self.name, self.fixed_k, self.ks = name, k, tuple(ks)
        self.prep = Preprocess(n_components)

    def fit(self, data: FoldData, *, seed: int = 0) -> "KNNRetrieval":
        self.z = self.prep.fit(data.x).transform(data.x)
        self.y, self.mask = data.y.astype(np.float64), data.mask
        if self.fixed_k is None:
            self.inner_by = inner_group_by(data)
            self.search = cv_knn_k(self.z, self.y, group_folds(data), self.ks, mask=data.mask,
                                   context=data.scoring_context())
            self.k = int(self.search.best)
        else:
            self.k = int(self.fixed_k)
        return self

    def predict(self, data: FoldData) -> np.ndarray:
        return knn_predict(self.z, self.y, self.prep.transform(data.x), [self.k],
                           bank_mask=self.mask)[self.k].astype(np.float32)

    def info(self) -> dict:
        return {"k": self.k, **_search_info(self)}


@BASELINES.register("per_context")
class PerContext:
    """One ridge head per context label on the pooled model's features (standardised PCA fit on every training
    spot, so a context with few spots gets no PCA of its own); alpha by inner CV where the context has two or more
    groups, else the pooled model's alpha. Unseen contexts use the pooled model."""


    def __init__(self, *, n_components: int | None = 256, min_spots: int = 50, name: str = "per_context") -> None:
        self.name, self.n_components, self.min_spots = name, n_components, min_spots

    def fit(self, data: FoldData, *, seed: int = 0) -> "PerContext":
        self.fallback = RidgeCV(n_components=self.n_components).fit(data, seed=seed)
        z = self.fallback.prep.transform(data.x)
        self.models = {}
        for c in np.unique(data.context):
            rows = np.flatnonzero(data.context == c)
            if len(rows) < self.min_spots:
                continue
            part = data.take(rows)
            groups = np.unique(part.patient if len(np.unique(part.patient)) > 1 else part.sample)
            alpha = None if len(groups) > 1 else self.fallback.alpha  # no inner CV possible: the pooled alpha
            head = RidgeCV(n_components=self.n_components, alpha=alpha)
            head.prep = self.fallback.prep
            self.models[int(c)] = head.fit(part, seed=seed, z=z[rows])
        return self

    def predict(self, data: FoldData) -> np.ndarray:
        z = self.fallback.prep.transform(data.x)
        out = self.fallback.predict_z(z)
        for c, m in self.models.items():
            sel = data.context == c
            if sel.any():
                out[sel] = m.predict_z(z[sel])
        return out

    def info(self) -> dict:
        return {"contexts": sorted(self.models), "alphas": [m.alpha for m in self.models.values()]}


@BASELINES.register("mlp")
def single_mlp(*, match_experts: int = 4, hidden: int = 128, train: dict | None = None, name: str = "mlp", **moe: Any):
    """A single MLP with the parameter count of a ``match_experts``-expert MoE of ``hidden``-unit MLP experts."""
    from histomoe_core.train import MoERegressor

    return MoERegressor(name=name, n_experts=1, hidden=hidden * match_experts, router_input="image",
                        train=train, **moe)


def create_baseline(name: str, **kw) -> Estimator:
    return BASELINES.create(name, **kw)
