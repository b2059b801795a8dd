"""Standardise then project on principal components: the input transform shared by the baselines and the MoE.

``standard_pca(x, k)`` returns ``(mean, scale, components)`` such that ``((x - mean) / scale) @ components`` is the
first ``k`` principal-component scores (signs fixed: each component's largest-magnitude loading is positive).
Fits are memoised by the content of ``x``: a benchmark fits many models and seeds on the same training spots, and
the decomposition is most of a small model's fit time.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np

_MEMO: "OrderedDict[tuple[str, int | None], tuple[np.ndarray, np.ndarray, np.ndarray]]" = OrderedDict()
MEMO_SIZE = 16


def standard_pca(x: np.ndarray, k: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(mean (D,), scale (D,), components (D, k))`` in float64, read-only; ``k`` None or >= D: no projection.

    Raises ValueError when ``k`` exceeds ``min(n_samples, n_features)``.
    """
    x = np.ascontiguousarray(x)
    key = (hashlib.blake2b(x.view(np.uint8).ravel(), digest_size=16).hexdigest() + f"{x.shape}{x.dtype}", k)
    if key in _MEMO:
        _MEMO.move_to_end(key)
        return _MEMO[key]
    out = _fit(x.astype(np.float64), k)
    for a in out:
        a.flags.writeable = False
    _MEMO[key] = out
    if len(_MEMO) > MEMO_SIZE:
        _MEMO.popitem(last=False)
    return out


def _fit(x: np.ndarray, k: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mean = x.mean(0)
    scale = np.maximum(x.std(0), 1e-6)
    if k is None or k >= x.shape[1]:
        return mean, scale, np.eye(x.shape[1])
    if k > min(x.shape):
        raise ValueError(f"pca_dim={k} exceeds min(n_samples, n_features)={min(x.shape)}; lower pca_dim")
    comps = _leading_directions((x - mean) / scale, k)
    sign = np.sign(comps[np.abs(comps).argmax(0), np.arange(k)])
    return mean, scale, comps * sign


def _leading_directions(z: np.ndarray, k: int) -> np.ndarray:
    """``(D, k)`` orthonormal leading right singular vectors of ``z``, from the eigendecomposition of the smaller
    Gram matrix (``z'z`` or ``zz'``): the same subspace as an SVD, several times faster for a tall ``z``."""
    n, d = z.shape
    if n >= d:
        w, v = np.linalg.eigh(z.T @ z)
        return v[:, ::-1][:, :k].copy()
    w, u = np.linalg.eigh(z @ z.T)
    v = z.T @ u[:, ::-1][:, :k]
    return v / np.maximum(np.linalg.norm(v, axis=0), 1e-300)
