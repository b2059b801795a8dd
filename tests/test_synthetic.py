"""Synthetic multi-organ data: HEST layout, determinism, cache reuse, and known answers of the generative model."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
from sklearn.linear_model import RidgeCV
from threadpoolctl import threadpool_limits

from histomoe_core.data import load_dataset
from histomoe_core.data.genes import select_panel
from histomoe_core.data.hest import load_hest
from histomoe_core.data.patches import PatchSpec, iter_patches
from histomoe_core.data.synthetic import make_synthetic, synthetic_dir
from histomoe_core.data.targets import make_targets

DEFAULTS = dict(n_organs=3, patients_per_organ=3, sections_per_patient=1, spots_per_section=120, n_genes=60, patch_px=32, seed=0)
ALPHAS = np.logspace(-2, 3, 6)


@pytest.fixture(scope="module")
def synth():
    t0 = time.perf_counter()
    ss = load_dataset("synthetic")
    return ss, time.perf_counter() - t0


@pytest.fixture(scope="module")
def features(synth):
    """Per spot: 8 x 8 x 3 downsampled patch pixels, true z, log1p counts, organ and patient number."""
    ss, _ = synth
    genes = list(ss[0].adata.var_names)
    x, z, y, organ, pnum = [], [], [], [], []
    for s in ss:
        p = np.concatenate([b for _, b in iter_patches(s, PatchSpec(out_px=32), batch_size=512)]).astype(np.float32)
        x.append(p.reshape(len(p), 8, 4, 8, 4, 3).mean(axis=(2, 4)).reshape(len(p), -1) / 255)
        z.append(s.adata.obsm["z_true"])
        y.append(make_targets(s.adata, genes))
        organ += [s.meta["organ"]] * s.n_spots
        pnum += [int(s.patient.rsplit("P", 1)[1])] * s.n_spots
    return np.concatenate(x), np.concatenate(z), np.concatenate(y), np.array(organ), np.array(pnum)


def test_hest_layout_and_metadata(synth):
    ss, seconds = synth
    root = synthetic_dir(**DEFAULTS)
    assert len(ss) == 9 and ss.name == "synthetic" and seconds < 30
    for s in ss:
        for f in (f"st/{s.sample_id}.h5ad", f"patches/{s.sample_id}.h5", f"metadata/{s.sample_id}.json", f"wsis/{s.sample_id}.tif"):
            assert (root / f).is_file(), f
        assert s.n_spots == 120 and s.adata.n_vars == 60 and s.image_path == root / "wsis" / f"{s.sample_id}.tif"
        meta = json.loads((root / "metadata" / f"{s.sample_id}.json").read_text())
        assert s.metadata_text() == meta["metadata_text"] and s.meta["dataset"] == "synthetic"
    t = ss.table()
    assert sorted(t["organ"].unique()) == ["colon", "kidney", "lung"]
    assert sorted(t["oncotree_code"].unique()) == ["CCRCC", "COAD", "LUAD"]
    assert t.groupby("organ")["patient"].nunique().tolist() == [3, 3, 3]
    assert ss[0].metadata_text() == "kidney, clear cell renal cell carcinoma"
    # the same files read directly as HEST data
    again = load_hest(root=root)
    assert sorted(again.ids) == sorted(ss.ids)
    # a gene panel can be chosen on training patients (every gene is expressed in >= 10% of spots)
    assert len(select_panel([s for s in ss if not s.patient.endswith("P3")], n_genes=50)) == 50


def test_slide_image_and_patch_file_agree(synth):
    ss, _ = synth
    s = ss["COAD-P2-S1"]
    from_h5 = np.concatenate([b for _, b in iter_patches(s, PatchSpec(out_px=32))])  # the patch file is preferred
    s.patches_path, saved = None, s.patches_path
    try:
        from_slide = np.concatenate([b for _, b in iter_patches(s, PatchSpec(out_px=32))])
        wider = np.concatenate([b for _, b in iter_patches(s, PatchSpec(size_um=224, out_px=32))])
    finally:
        s.patches_path = saved
    np.testing.assert_array_equal(from_slide, from_h5)
    # other patch sizes are cut from the slide image: 224 µm = 2 x 2 tiles, whose centre quarter is the spot's tile
    assert not np.array_equal(wider, from_h5)
    wider_from_both = np.concatenate([b for _, b in iter_patches(s, PatchSpec(size_um=224, out_px=64))])
    np.testing.assert_array_equal(wider_from_both[:, 16:48, 16:48], from_h5)


def test_deterministic_per_seed(tmp_path):
    small = dict(n_organs=2, patients_per_organ=1, spots_per_section=30, n_genes=20, patch_px=16)
    a = load_hest(root=make_synthetic(tmp_path / "a", seed=3, **small))
    b = load_hest(root=make_synthetic(tmp_path / "b", seed=3, **small))
    c = load_hest(root=make_synthetic(tmp_path / "c", seed=4, **small))
    for sa, sb, sc in zip(a, b, c):
        np.testing.assert_array_equal(sa.adata.X.toarray(), sb.adata.X.toarray())
        pa, pb, pc = (np.concatenate([x for _, x in iter_patches(s, PatchSpec(out_px=16))]) for s in (sa, sb, sc))
        np.testing.assert_array_equal(pa, pb)
        assert not np.array_equal(pa, pc) and not np.array_equal(sa.adata.X.toarray(), sc.adata.X.toarray())


def test_second_load_reuses_the_cache(synth):
    ss, _ = synth
    root = synthetic_dir(**DEFAULTS)
    stamp = (root / "st" / f"{ss[0].sample_id}.h5ad").stat().st_mtime_ns
    t0 = time.perf_counter()
    again = load_dataset("synthetic", **DEFAULTS)
    assert (root / "st" / f"{ss[0].sample_id}.h5ad").stat().st_mtime_ns == stamp
    assert time.perf_counter() - t0 < 5
    np.testing.assert_array_equal(again[0].adata.X.toarray(), ss[0].adata.X.toarray())
    assert synthetic_dir(**(DEFAULTS | {"seed": 1})) != root


def test_organs_have_distinct_textures(features):
    x, _, _, organ, pnum = features
    colour = x.reshape(len(x), -1, 3).mean(axis=1) * 255  # mean RGB per spot
    means = {o: colour[organ == o].mean(axis=0) for o in np.unique(organ)}
    gaps = [np.linalg.norm(means[a] - means[b]) for a in means for b in means if a < b]
    spread = max(np.linalg.norm(colour[(organ == o) & (pnum == p)].mean(axis=0) - means[o]) for o in means for p in (1, 2, 3))
    assert min(gaps) > 20 and min(gaps) > 2 * spread  # measured: min gap 29.5, spread 10.7
    # nearest organ centroid, fit on patients 1-2, classifies patient 3's spots
    fit = {o: colour[(organ == o) & (pnum < 3)].mean(axis=0) for o in means}
    names = list(fit)
    test = pnum == 3
    pred = np.array(names)[np.argmin([np.linalg.norm(colour[test] - fit[o], axis=1) for o in names], axis=0)]
    assert (pred == organ[test]).mean() > 0.9  # measured 0.986


def test_proportions_are_spatially_smooth_and_libraries_vary(synth):
    ss, _ = synth
    s = ss[0]
    z, rc = s.adata.obsm["z_true"], s.adata.obs[["array_row", "array_col"]].to_numpy()
    d = np.abs(rc[:, None] - rc[None]).sum(axis=2)
    zd = np.abs(z[:, None] - z[None]).sum(axis=2)
    assert zd[d == 1].mean() < 0.5 * zd[d > 6].mean()
    libs = np.array([t.adata.uns["synthetic"]["log_library_size"] for t in ss])
    assert libs.std() > 0.15


def _pearson(pred: np.ndarray, y: np.ndarray) -> float:
    p, t = pred - pred.mean(0), y - y.mean(0)
    return float(np.nanmean((p * t).sum(0) / np.sqrt((p * p).sum(0) * (t * t).sum(0))))


def _held_out(f: np.ndarray, y: np.ndarray, organ: np.ndarray, pnum: np.ndarray) -> tuple[float, float]:
    """Mean over held-out patients (1 per organ per fold) and organs of the per-gene Pearson: pooled vs per-organ ridge."""
    pooled, per = [], []
    with threadpool_limits(1):  # tiny problems: BLAS threads only contend on a shared CPU
        _fit_folds(f, y, organ, pnum, pooled, per)
    return float(np.mean(pooled)), float(np.mean(per))


def _fit_folds(f, y, organ, pnum, pooled: list, per: list) -> None:
    for k in np.unique(pnum):
        tr, te = pnum != k, pnum == k
        p_pool = RidgeCV(alphas=ALPHAS).fit(f[tr], y[tr]).predict(f[te])
        for o in np.unique(organ):
            m = organ[te] == o
            p_own = RidgeCV(alphas=ALPHAS).fit(f[tr & (organ == o)], y[tr & (organ == o)]).predict(f[te][m])
            pooled.append(_pearson(p_pool[m], y[te][m]))
            per.append(_pearson(p_own, y[te][m]))


def test_expression_is_predictable_from_the_image_and_per_organ_models_win(features):
    x, z, y, organ, pnum = features
    pooled_px, per_px = _held_out(x, y, organ, pnum)
    pooled_z, per_z = _held_out(z, y, organ, pnum)
    # measured (seed 0): pixels pooled 0.12, per organ 0.49; true z pooled 0.35, per organ 0.68
    assert per_px > 0.35 and pooled_px > 0.03
    assert per_px - pooled_px > 0.2
    assert per_z > 0.55 and per_z - pooled_z > 0.2
