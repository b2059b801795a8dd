"""Metrics, per-fold arrays and the baselines, on small arrays with known answers."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from histomoe_core.baselines import (
    BASELINES,
    HESTRidge,
    KNNRetrieval,
    PerContext,
    Preprocess,
    RidgeCV,
    cv_ridge_alpha,
    knn_predict,
    ridge_path,
)
from histomoe_core.evaluate import fold_table, markdown_table, pearson_columns, score, summarize
from histomoe_core.features import FoldData, group_folds, inner_split


def fold_data(x, y, patient, sample=None, context=None, meta_dim=0) -> FoldData:
    n = len(x)
    sample = np.asarray(patient if sample is None else sample).astype(str)
    return FoldData(np.asarray(x, np.float32), np.zeros((n, meta_dim), np.float32),
                    np.zeros(n, np.int64) if context is None else np.asarray(context, np.int64),
                    np.asarray(y, np.float32), sample, np.asarray(patient).astype(str), np.arange(n).astype(str),
                    tuple(f"g{i}" for i in range(np.shape(y)[1])), ("c0", "c1"))


def linear_data(n=300, d=20, g=6, noise=0.1, seed=0, patients=("A", "B", "C")):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    w = rng.normal(size=(d, g))
    y = x @ w + noise * rng.normal(size=(n, g))
    return x, y, np.array(patients)[np.arange(n) % len(patients)]


# ---------------------------------------------------------------------------------------------- metrics
def test_pearson_columns_known_values_and_constant_columns():
    y = np.array([[1.0, 1.0, 2.0], [2.0, 1.0, 4.0], [3.0, 1.0, 6.0]])
    p = np.array([[2.0, 0.0, 3.0], [4.0, 1.0, 2.0], [6.0, 2.0, 1.0]])
    r = pearson_columns(y, p)
    assert r[0] == pytest.approx(1.0) and np.isnan(r[1]) and r[2] == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="shapes"):
        pearson_columns(y, p[:, :2])


def test_score_pools_spots_and_averages_sections():
    rng = np.random.default_rng(0)
    y = rng.normal(size=(40, 3))
    sections = np.array(["s1"] * 20 + ["s2"] * 20)
    p = y.copy()
    p[20:] = -y[20:]  # perfect in s1, inverted in s2
    metrics, per_gene, per_section = score(y, p, sections, ["a", "b", "c"])
    assert per_section.loc["s1", "pearson"] == pytest.approx(1.0)
    assert per_section.loc["s2", "pearson"] == pytest.approx(-1.0)
    assert metrics["pearson_section"] == pytest.approx(0.0, abs=1e-12)
    assert metrics["pearson"] == pytest.approx(np.mean(pearson_columns(y, p)))
    assert list(per_gene.index) == ["a", "b", "c"] and metrics["n_test_spots"] == 40
    assert metrics["mse"] == pytest.approx(((y - p) ** 2).mean())


def test_summarize_means_and_spreads():
    rows = []
    for fold, base in (("f1", 0.2), ("f2", 0.4)):
        for seed, d in ((0, -0.01), (1, 0.01)):
            rows.append({"target": "log1p", "model": "m", "fold": fold, "seed": seed,
                         "pearson": base + d, "pearson_section": base, "mse": 1.0})
    s = summarize(pd.DataFrame(rows)).iloc[0]
    assert s["pearson"] == pytest.approx(0.3)
    assert s["pearson_sd_folds"] == pytest.approx(np.std([0.2, 0.4], ddof=0))  # HEST-Bench: ddof = 0
    assert s["pearson_sd_seeds"] == pytest.approx(np.std([0.29, 0.31], ddof=0))
    assert s["n_folds"] == 2 and s["n_seeds"] == 2
    assert "0.300 ± 0.100" in markdown_table(summarize(pd.DataFrame(rows)))
    assert fold_table(pd.DataFrame(rows)).loc["m", "mean"] == pytest.approx(0.3)


# ---------------------------------------------------------------------------------------------- splits
def test_inner_splits_are_patient_grouped():
    x, y, pat = linear_data(n=30)
    d = fold_data(x, y, pat)
    for seed in range(3):
        tr, va = inner_split(d, seed=seed)
        assert not set(d.patient[tr]) & set(d.patient[va]) and va.any() and tr.any()
    folds = group_folds(d)
    assert len(folds) == 3
    for tr, va in folds:
        assert not set(d.patient[tr]) & set(d.patient[va])
    # one patient: fall back to sections
    one = fold_data(x, y, np.full(30, "P"), sample=np.array(["s1", "s2"])[np.arange(30) % 2])
    assert len(group_folds(one)) == 2


# ---------------------------------------------------------------------------------------------- baselines
def test_ridge_path_matches_sklearn():
    from sklearn.linear_model import Ridge

    x, y, _ = linear_data(n=80, d=10, g=3, noise=1.0)
    coefs, b = ridge_path(x, y, [0.5, 30.0])
    for i, a in enumerate([0.5, 30.0]):
        ref = Ridge(alpha=a).fit(x, y)
        assert np.allclose(coefs[i], ref.coef_.T, atol=1e-8) and np.allclose(b[i], ref.intercept_, atol=1e-8)


def test_hest_ridge_reproduces_the_hest_recipe():
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.preprocessing import StandardScaler

    x, y, pat = linear_data(n=120, d=30, g=5, noise=0.5)
    d = fold_data(x, y, pat)
    m = HESTRidge(n_components=8).fit(d)
    assert m.alpha == pytest.approx(100 / (8 * 5))
    sc = StandardScaler().fit(x)
    pca = PCA(n_components=8, random_state=0).fit(sc.transform(x))
    z = pca.transform(sc.transform(x))
    ref = Ridge(alpha=100 / 40, fit_intercept=False, solver="lsqr", max_iter=1000).fit(z, y)
    assert np.allclose(m.predict(d), ref.predict(z), atol=1e-4)


def test_ridge_cv_picks_small_alpha_for_clean_signal_and_large_for_noise():
    x, y, pat = linear_data(n=240, d=10, g=4, noise=0.01)
    clean = RidgeCV(n_components=None).fit(fold_data(x, y, pat))
    noise = RidgeCV(n_components=None).fit(fold_data(x, np.random.default_rng(1).normal(size=y.shape), pat))
    assert clean.alpha <= 1.0 < 1e4 <= noise.alpha
    assert np.corrcoef(clean.predict(fold_data(x, y, pat))[:, 0], y[:, 0])[0, 1] > 0.999


def test_cv_alpha_uses_the_grouped_folds():
    x, y, pat = linear_data(n=90, d=5, g=2, noise=0.5)
    res = cv_ridge_alpha(x, y, group_folds(fold_data(x, y, pat)), [0.01, 0.1, 1.0, 1e6])
    assert res.best in res.grid and len(res.scores) == len(res.grid) >= 4 and res.scores[res.grid.index(1e6)] <= max(res.scores)


def _bayes_ridge(sigma: float, n: int = 1500, p: int = 40, g: int = 20, seed: int = 0):
    """Features with decaying scales, weights ~ N(0, 1), noise sd ``sigma``: the MSE-optimal ridge alpha is
    sigma^2 (posterior mean of a Gaussian prior), and with anisotropic features Pearson peaks there too."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, p)) / np.arange(1, p + 1) ** 0.7
    y = z @ rng.normal(size=(p, g)) + sigma * rng.normal(size=(n, g))
    groups = np.arange(n) % 5
    return z, y, [(np.flatnonzero(groups != k), np.flatnonzero(groups == k)) for k in range(5)]


@pytest.mark.parametrize("sigma", [0.5, 2.0, 5.0])
def test_cv_alpha_finds_the_known_optimum(sigma):
    z, y, folds = _bayes_ridge(sigma)
    res = cv_ridge_alpha(z, y, folds, np.logspace(-3, 3, 25))
    assert sigma**2 / 2.5 <= res.best <= sigma**2 * 2.5 and not res.at_edge


def test_cv_alpha_widens_a_grid_whose_edge_wins_and_warns_when_it_still_does():
    z, y, folds = _bayes_ridge(5.0)  # optimum alpha = 25, far above this grid
    res = cv_ridge_alpha(z, y, folds, np.logspace(-3, -1, 9))
    assert max(res.grid) > 25 and 25 / 2.5 <= res.best <= 25 * 2.5 and not res.at_edge
    with pytest.warns(RuntimeWarning, match="edge of the searched grid"):
        edge = cv_ridge_alpha(z, y, folds, [1e-6, 2e-6])  # three widenings by x2^4 stay far below 25
    assert edge.at_edge and edge.best == max(edge.grid)


def test_inner_cv_groups_by_section_when_the_training_fold_has_two_patients():
    from histomoe_core.features import inner_group_by

    x, y, _ = linear_data(n=60)
    two = fold_data(x, y, np.array(["A", "B"])[np.arange(60) % 2], sample=np.array(["A1", "B1", "A2", "B2"])[np.arange(60) % 4])
    assert inner_group_by(two) == "sample" and len(group_folds(two)) == 4
    m = RidgeCV(n_components=None).fit(two)
    assert m.info()["inner_cv_groups"] == "sample" and m.info()["grid"][0] <= m.alpha
    three = fold_data(x, y, np.array(["A", "B", "C"])[np.arange(60) % 3])
    assert inner_group_by(three) == "patient" and len(group_folds(three)) == 3


def test_knn_predict_averages_the_k_nearest():
    bank = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0]])
    ys = np.array([[1.0], [3.0], [10.0], [100.0]])
    out = knn_predict(bank, ys, np.array([[1.0, 0.05]]), [1, 2, 3])
    assert out[1][0, 0] == pytest.approx(1.0) or out[1][0, 0] == pytest.approx(3.0)
    assert out[2][0, 0] == pytest.approx(2.0) and out[3][0, 0] == pytest.approx(14 / 3)


def test_knn_retrieval_chooses_k_by_inner_cv():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 8)) * 5
    lab = np.arange(400) % 4
    x = centres[lab] + rng.normal(size=(400, 8))
    y = np.eye(4)[lab] + 0.5 * rng.normal(size=(400, 4))
    d = fold_data(x, y, np.array(["A", "B"])[(np.arange(400) // 4) % 2])
    m = KNNRetrieval(n_components=None, ks=(1, 50)).fit(d)
    assert m.k == 50  # averaging many same-cluster neighbours beats one noisy neighbour
    assert pearson_columns(y, m.predict(d)).mean() > 0.6  # ceiling sqrt(0.1875 / 0.4375) = 0.65


def test_per_context_models_beat_a_pooled_one_on_opposite_contexts():
    rng = np.random.default_rng(0)
    n = 400
    x = rng.normal(size=(n, 6))
    ctx = np.arange(n) % 2
    w = rng.normal(size=(6, 3))
    y = np.where(ctx[:, None] == 0, x @ w, -(x @ w)) + 0.1 * rng.normal(size=(n, 3))
    pat = np.array(["A", "B", "C", "D"])[(np.arange(n) // 2) % 4]
    d = fold_data(x, y, pat, context=ctx)
    per = PerContext(n_components=None).fit(d)
    pooled = RidgeCV(n_components=None).fit(d)
    assert set(per.models) == {0, 1}
    assert np.nanmean(pearson_columns(y, per.predict(d))) > 0.95
    assert np.nanmean(pearson_columns(y, pooled.predict(d))) < 0.3


def test_preprocess_pca_is_fit_on_train_only():
    x, _, _ = linear_data(n=50, d=12)
    p = Preprocess(4).fit(x)
    z = p.transform(x)
    assert z.shape == (50, 4) and np.allclose(z.mean(0), 0, atol=1e-8)
    assert np.allclose(p.components.T @ p.components, np.eye(4), atol=1e-8)


def test_registry_lists_every_baseline():
    assert {"ridge_hest", "ridge_cv", "knn", "per_context", "mlp"} <= set(BASELINES.list())
    mlp = BASELINES.get("mlp")(hidden=16, match_experts=4)
    assert mlp.moe_kw["n_experts"] == 1 and mlp.moe_kw["hidden"] == 64


@pytest.mark.parametrize("k", [1, 7, 60, 200])
def test_top_k_order_is_the_stable_full_sort_head(k):
    from histomoe_core.baselines import top_k_order

    rng = np.random.default_rng(2)
    for sim in (rng.normal(size=(40, 200)), np.round(rng.normal(size=(40, 200)), 1)):  # the second has many ties
        assert (top_k_order(sim, k) == np.argsort(-sim, axis=1, kind="stable")[:, :k]).all()


def test_ridge_from_the_eigendecomposition_matches_sklearn():
    from sklearn.linear_model import Ridge

    from histomoe_core.baselines import ridge_path

    rng = np.random.default_rng(4)
    z, y = rng.normal(size=(60, 8)), rng.normal(size=(60, 3))
    coefs, b = ridge_path(z, y, [0.5, 30.0])
    for i, a in enumerate([0.5, 30.0]):
        ref = Ridge(alpha=a).fit(z, y)
        assert np.allclose(coefs[i], ref.coef_.T, atol=1e-10) and np.allclose(b[i], ref.intercept_, atol=1e-10)
