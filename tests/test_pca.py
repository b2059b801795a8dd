"""The shared standardise + PCA transform: known answers, memoisation, errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from histomoe_core.moe import InputNorm
from histomoe_core.pca import standard_pca


def planted(n=200, d=10, seed=0):
    """Data whose standardised covariance has two known leading directions."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(d, 2)))[0]
    scores = rng.normal(size=(n, 2)) * [5.0, 2.0]
    return scores @ basis.T + 0.05 * rng.normal(size=(n, d)), basis


def test_components_are_the_leading_eigenvectors_of_the_standardised_covariance():
    x, _ = planted()
    mean, scale, comps = standard_pca(x, 3)
    z = (x - x.mean(0)) / x.std(0)
    evals, evecs = np.linalg.eigh(np.cov(z, rowvar=False, bias=True))
    top = evecs[:, ::-1][:, :3]
    assert np.allclose(np.abs(comps.T @ top), np.eye(3), atol=1e-6)
    assert np.allclose(mean, x.mean(0)) and np.allclose(scale, x.std(0))
    # sign convention: the largest-magnitude loading of every component is positive
    assert (comps[np.abs(comps).argmax(0), np.arange(3)] > 0).all()
    scores = ((x - mean) / scale) @ comps
    assert np.allclose(scores.var(0), evals[::-1][:3], rtol=1e-6)


def test_memoised_by_content_and_read_only():
    x, _ = planted(seed=1)
    a = standard_pca(x, 4)
    assert standard_pca(x.copy(), 4)[2] is a[2]  # same content: the same fit, not a recomputation
    assert standard_pca(x + 1e-3, 4)[2] is not a[2]
    with pytest.raises(ValueError):
        a[2][0, 0] = 1.0


def test_no_projection_and_too_many_components():
    x, _ = planted(n=20, d=6)
    assert np.array_equal(standard_pca(x, None)[2], np.eye(6))
    assert np.array_equal(standard_pca(x, 6)[2], np.eye(6))
    with pytest.raises(ValueError, match="pca_dim=30 exceeds"):
        standard_pca(np.random.default_rng(0).normal(size=(20, 40)), 30)


def test_moe_input_norm_uses_the_same_transform():
    x, _ = planted(seed=2)
    norm = InputNorm(10, 3).fit(torch.as_tensor(x, dtype=torch.float32))
    mean, scale, comps = standard_pca(x.astype(np.float32), 3)
    z = norm(torch.as_tensor(x, dtype=torch.float32)).numpy()
    assert np.allclose(z, ((x - mean) / scale) @ comps, atol=1e-4)


@pytest.mark.parametrize("n, d", [(300, 40), (25, 40)])
def test_leading_directions_span_the_svd_subspace_on_tall_and_wide_data(n, d):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(n, d)) @ np.diag(np.linspace(3, 0.1, d)) + 0.01 * rng.normal(size=(n, d))
    _, _, comps = standard_pca(x, 6)
    z = (x - x.mean(0)) / x.std(0)
    ref = np.linalg.svd(z, full_matrices=False)[2][:6].T
    assert np.allclose(np.abs((comps * ref).sum(0)), 1.0, atol=1e-8)
    assert np.allclose(comps.T @ comps, np.eye(6), atol=1e-8)
