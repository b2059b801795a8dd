"""Spatial context stage: neighbour rings on Visium (hexagonal) and legacy-ST (square) grids with known answers,
no neighbours across sections, wide patches clipped at image borders like spot patches, features independent of
the subset or batch they are computed in, the router reading context, and the benchmark hook."""
from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
from PIL import Image

from histomoe_core.data.patches import PatchSpec, iter_patches
from histomoe_core.data.sample import Sample, SampleSet
from histomoe_core.errors import HistoMoEError
from histomoe_core.features import spot_table
from histomoe_core.spatial_context import aggregate, apply_context, check_spec, neighbour_rings


def hex_grid(n: int = 9, pitch: float = 100.0) -> np.ndarray:
    """Visium layout: rows sqrt(3)/2 pitch apart, odd rows shifted by half a pitch (µm)."""
    return np.array([((c + 0.5 * (r % 2)) * pitch, r * pitch * np.sqrt(3) / 2) for r in range(n) for c in range(n)])


def square_grid(n: int = 5, pitch: float = 200.0) -> np.ndarray:
    """Legacy ST layout: a square grid, 200 µm centre to centre (µm)."""
    return np.array([(c * pitch, r * pitch) for r in range(n) for c in range(n)], dtype=float)


def counts(rings) -> list[np.ndarray]:
    return [np.diff(w.indptr) for w in rings]


def test_hexagonal_visium_rings_have_6_then_12_neighbours():
    xy = hex_grid()
    centre = 4 * 9 + 4
    first, second = counts(neighbour_rings(xy, [100.0, 200.0]))
    assert first[centre] == 6 and second[centre] == 12  # 6 at 100 µm; 6 at 173 µm + 6 at 200 µm
    assert first[0] == 2  # a corner of an even row: right and the one below-right
    assert set(neighbour_rings(xy, 100.0)[0][centre].indices) == {39, 41, 30, 31, 48, 49}


def test_square_st_rings_have_4_sides_then_4_diagonals():
    xy = square_grid()
    centre, corner = 12, 0
    sides, diagonals = counts(neighbour_rings(xy, [200.0, 300.0]))
    assert (sides[centre], diagonals[centre]) == (4, 4)
    assert (sides[corner], diagonals[corner]) == (2, 1)
    assert counts(neighbour_rings(xy, 199.0))[0].sum() == 0  # the pitch is exclusive below it


def test_mean_and_gaussian_weights_known_answer():
    xy = np.array([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0]])
    x = np.array([[0.0], [10.0], [30.0]])
    mean = aggregate(x, neighbour_rings(xy, 3.0))
    assert mean[:, 0].tolist() == pytest.approx([20.0, 15.0, 5.0])
    g = aggregate(x, neighbour_rings(xy, 3.0, weight="gaussian", sigma_um=1.0))
    w1, w3 = np.exp(-0.5), np.exp(-4.5)  # spot 0: neighbours at 1 µm (10) and 3 µm (30)
    assert g[0, 0] == pytest.approx((10 * w1 + 30 * w3) / (w1 + w3), rel=1e-6)


def test_empty_ring_takes_the_spots_own_embedding():
    xy = np.array([[0.0, 0.0], [1000.0, 0.0]])
    x = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    assert np.array_equal(aggregate(x, neighbour_rings(xy, 100.0)), x)


# ------------------------------------------------------------------------------------------------ on sections
def make_sample(folder, sid: str, xy_px: np.ndarray, *, patient: str = "P1", px_um: float = 1.0, seed: int = 0,
                shape: tuple[int, int] = (300, 400)) -> Sample:
    """A noise image (``shape`` = height, width) with spots at ``xy_px``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    img = folder / f"{sid}.png"
    Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).save(img)
    n = len(xy_px)
    adata = ad.AnnData(X=sp.csr_matrix(rng.poisson(2.0, (n, 4)).astype(np.float32)))
    adata.obs_names = [f"{sid}_{i}" for i in range(n)]
    adata.var_names = [f"g{i}" for i in range(4)]
    adata.obsm["spatial"] = np.asarray(xy_px, float)
    return Sample(sid, patient, adata, px_um, image_path=img, meta={"organ": "Breast"})


@pytest.fixture
def two_sections(tmp_path) -> SampleSet:
    """Two sections with the same pixel coordinates (a 5 x 5 square grid, 50 px = 100 µm apart at 2 µm/px)."""
    xy = square_grid(5, 50.0) + 100
    return SampleSet("toy", [make_sample(tmp_path, "A", xy, px_um=2.0, seed=1),
                             make_sample(tmp_path, "B", xy, patient="P2", px_um=2.0, seed=2)])


def constant_embeddings(samples, values) -> dict[str, np.ndarray]:
    return {s.sample_id: np.full((s.n_spots, 3), v, np.float32) for s, v in zip(samples, values)}


def test_neighbours_never_cross_sections_and_radius_is_in_um(two_sections):
    table = spot_table(two_sections, constant_embeddings(two_sections, [0.0, 1.0]))
    out = apply_context(table, two_sections, {"neighbours": {"radius_um": 100.0}, "section": {}})
    a, b = out.sample == "A", out.sample == "B"
    assert out.x.shape == (50, 9)
    assert (out.x[a] == 0).all() and (out.x[b] == 1).all()  # overlapping coordinates, yet no mixing
    rings = neighbour_rings(two_sections["A"].coords * 2.0, 100.0)
    assert counts(rings)[0][12] == 4  # 50 px at 2 µm/px is the 100 µm pitch


def test_context_is_the_same_whatever_subset_or_order(two_sections):
    rng = np.random.default_rng(0)
    emb = {s.sample_id: rng.normal(size=(s.n_spots, 3)).astype(np.float32) for s in two_sections}
    spec = {"neighbours": {"radius_um": [100.0, 150.0], "weight": "gaussian"}, "section": {"use": "router"}}
    both = apply_context(spot_table(two_sections, emb), two_sections, spec)
    for order in (["B"], ["B", "A"]):
        sub = two_sections.subset(order)
        alone = apply_context(spot_table(sub, emb), sub, spec)
        for sid in order:
            assert np.array_equal(alone.x[alone.sample == sid], both.x[both.sample == sid])
            assert np.array_equal(alone.spatial[alone.sample == sid], both.spatial[both.sample == sid])


def test_uses_route_blocks_to_features_or_router(two_sections):
    table = spot_table(two_sections, constant_embeddings(two_sections, [2.0, 3.0]))
    out = apply_context(table, two_sections, {"neighbours": {"use": "router"}, "section": {"use": "both"}})
    assert out.x.shape == (50, 6) and out.spatial.shape == (50, 6)
    assert apply_context(table, two_sections, {}) is table
    with pytest.raises(HistoMoEError, match="unknown spatial context kind"):
        check_spec({"neighbors": {}})
    with pytest.raises(HistoMoEError, match="use must be"):
        check_spec({"section": {"use": "experts"}})
    with pytest.raises(HistoMoEError, match="increasing"):
        check_spec({"neighbours": {"radius_um": [200, 100]}})


# ------------------------------------------------------------------------------------------------ wide patches
def test_wide_patches_are_clipped_at_borders_like_spot_patches(tmp_path):
    s = make_sample(tmp_path, "W", np.array([[10.0, 10.0], [300.0, 250.0]]), shape=(500, 600))
    img = np.asarray(Image.open(s.image_path))
    for size in (112, 336):
        idx, patches = next(iter_patches(s, PatchSpec(size_um=size, out_px=size), batch_size=8))
        assert patches.shape == (2, size, size, 3)
        half = size // 2
        corner = patches[0]
        assert (corner[: half - 10] == 255).all() and (corner[:, : half - 10] == 255).all()  # white glass
        assert np.array_equal(corner[half - 10:, half - 10:], img[: size - half + 10, : size - half + 10])
        assert np.array_equal(patches[1], img[250 - half: 250 + size - half, 300 - half: 300 + size - half])


def test_wide_embeddings_are_cached_and_batch_invariant(tmp_path, monkeypatch):
    from histomoe_core.embed import run_embedding
    from histomoe_core.spatial_context import wide_patch

    monkeypatch.setenv("HISTOMOE_CACHE_DIR", str(tmp_path / "cache"))
    samples = SampleSet("toy", [make_sample(tmp_path, "W", square_grid(4, 60.0) + 60)])
    spec = wide_patch({"size_um": 336, "out_px": 64})
    one, st1 = run_embedding(samples, "tiny", spec=spec, batch_size=1, progress=False)
    monkeypatch.setenv("HISTOMOE_CACHE_DIR", str(tmp_path / "cache2"))
    many, _ = run_embedding(samples, "tiny", spec=spec, batch_size=16, progress=False)
    np.testing.assert_allclose(one["W"], many["W"], atol=1e-5)
    again, st2 = run_embedding(samples, "tiny", spec=spec, batch_size=16, progress=False)
    assert st2.cached == ["W"] and np.array_equal(again["W"], many["W"])
    spot, _ = run_embedding(samples, "tiny", spec=PatchSpec(out_px=64), progress=False)
    assert not np.allclose(spot["W"], many["W"])  # another field of view, another cache entry

    table = spot_table(samples, spot)
    out = apply_context(table, samples, {"wide": {"size_um": 336, "out_px": 64}},
                        embed=lambda spec: run_embedding(samples, "tiny", spec=spec, progress=False)[0])
    assert np.array_equal(out.x[:, spot["W"].shape[1]:], many["W"])


# ------------------------------------------------------------------------------------------------ the router
def test_router_reading_spatial_context_routes_by_it():
    import torch

    from histomoe_core.moe import HistoMoE, MoEConfig

    with pytest.raises(ValueError, match="spatial_dim"):
        MoEConfig(in_dim=4, n_genes=2, router_input="spatial")
    m = HistoMoE(MoEConfig(in_dim=4, n_genes=2, n_experts=3, spatial_dim=5, router_input="spatial")).eval()
    m.fit_input(torch.randn(50, 4), torch.randn(50, 5))
    with torch.no_grad():
        m.router.net.weight.normal_()
        x, s = torch.randn(8, 4), torch.randn(8, 5)
        g = m(x, spatial_emb=s).gates
        assert torch.allclose(m(torch.randn(8, 4), spatial_emb=s).gates, g)  # the image does not route
        assert not torch.allclose(m(x, spatial_emb=torch.randn(8, 5)).gates, g)
    with pytest.raises(ValueError, match="needs spatial features"):
        m(x)


def test_moe_regressor_fits_with_router_only_context(tmp_path):
    from histomoe_core.data.splits import Fold
    from histomoe_core.features import fold_arrays
    from histomoe_core.train import MoERegressor

    xy = square_grid(5, 50.0) + 100
    samples = SampleSet("toy", [make_sample(tmp_path, k, xy, patient=f"P{i}", seed=i) for i, k in enumerate("ABC")])
    rng = np.random.default_rng(0)
    emb = {s.sample_id: rng.normal(size=(s.n_spots, 3)).astype(np.float32) for s in samples}
    table = apply_context(spot_table(samples, emb), samples, {"neighbours": {"use": "router"}})
    tr, te = fold_arrays(table, samples, Fold("C", ("A", "B"), ("C",)), genes=["g0", "g1"])
    assert tr.x.shape[1] == 3 and tr.spatial.shape == (50, 3) and te.take(np.arange(5)).spatial.shape == (5, 3)
    est = MoERegressor(n_experts=2, hidden=8, router_input="image+spatial", train={"epochs": 2}).fit(tr)
    assert est.model.cfg.spatial_dim == 3 and est.predict(te).shape == (25, 2)
    plain = MoERegressor(n_experts=2, hidden=8, train={"epochs": 2}).fit(tr)
    assert plain.model.cfg.spatial_dim == 0  # an image router ignores router-only context


def test_benchmark_config_keys_only_change_with_a_context_stage():
    from histomoe_core.benchmark.config import make_config

    plain = make_config("synthetic")
    assert "spatial_context" not in plain.as_dict()  # runs without context keep their cache keys
    ctx = make_config("synthetic", spatial_context={"neighbours": {"radius_um": 250}})
    assert ctx.as_dict()["spatial_context"] == {"neighbours": {"radius_um": 250}}


def test_benchmark_plan_applies_the_stage_and_keys_its_features(tmp_path, monkeypatch):
    from histomoe_core.benchmark.config import make_config
    from histomoe_core.benchmark.inputs import input_digests, load_inputs
    from histomoe_core.benchmark.units import Plan

    monkeypatch.setenv("HISTOMOE_CACHE_DIR", str(tmp_path / "cache"))
    opts = {"n_organs": 2, "patients_per_organ": 3, "spots_per_section": 30, "n_genes": 30, "patch_px": 32}
    plain = make_config("synthetic", dataset_options=opts, models=["ridge_cv_raw"], n_genes=10)
    samples, folds, img, meta, fixed = load_inputs(plain, progress=False)
    digests = input_digests(samples, img, meta)
    base = Plan(plain, samples, folds, img, meta, fixed, digests)
    ctx = make_config(plain, spatial_context={"neighbours": {"radius_um": 300}, "section": {"use": "router"}},
                      models=["ridge_cv_raw", "histomoe_route_image_spatial"])
    work = Plan(ctx, samples, folds, img, meta, fixed, digests)
    d = img[samples.ids[0]].shape[1]
    assert base.table.x.shape[1] == d and base.table.spatial is None
    assert work.table.x.shape[1] == 2 * d and work.table.spatial.shape[1] == d
    assert work.inputs != base.inputs
    tr, te = work.data("log1p", folds[0])
    assert tr.spatial is not None and len(te.spatial) == len(te)


def test_neighbourhood_figure_shows_the_rings_of_one_spot(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from histomoe_core import pl

    s = make_sample(tmp_path, "F", square_grid(5, 100.0) + 50, px_um=2.0, shape=(600, 600))
    fig = pl.spatial_context.neighbourhood(s, "F_12", radius_um=[200, 300], wide_um=336)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["ring 1: 4 spots <= 200 µm", "ring 2: 4 spots <= 300 µm", "spot patch 112 µm", "wide patch 336 µm"]
    corner = pl.spatial_context.neighbourhood(s, 0, radius_um=200, wide_um=None)  # clipped at the image corner
    assert [t.get_text() for t in corner.axes[0].get_legend().get_texts()][0] == "ring 1: 2 spots <= 200 µm"


def test_cli_refuses_a_bad_spatial_context_before_loading(capsys):
    from histomoe_core.cli import main

    assert main(["benchmark", "synthetic", "--spatial-context", '{"neighbors": {}}']) == 2
    assert "unknown spatial context kind 'neighbors'" in capsys.readouterr().err
    assert main(["benchmark", "synthetic", "--spatial-context", "{not json"]) == 2
    assert "not JSON" in capsys.readouterr().err


def test_combined_runs_refuse_other_panels(tmp_path):
    from histomoe_core.benchmark.context_runs import CombinedRuns

    class Fake:
        def __init__(self, genes):
            self.config = {"config": {"targets": ["log1p"]}, "folds": [{"name": "f"}]}
            self.genes = genes

        def panel(self, target, fold):
            import pandas as pd

            return pd.DataFrame(index=self.genes)

    CombinedRuns({"none": Fake(["a", "b"]), "nbr": Fake(["a", "b"])})
    with pytest.raises(HistoMoEError, match="panel"):
        CombinedRuns({"none": Fake(["a", "b"]), "nbr": Fake(["a", "c"])})
