"""Dataset figures and the tables behind them (histomoe_core.pl.data), on small made-up samples."""
from __future__ import annotations

import anndata as ad
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import scipy.sparse as sp  # noqa: E402
from PIL import Image  # noqa: E402

from histomoe_core.data.sample import Sample  # noqa: E402
from histomoe_core.pl import data as pld  # noqa: E402
from histomoe_core.pl.spatial import thumbnail  # noqa: E402


def make_sample(tmp_path, sid: str, patient: str, depth: float, *, seed: int = 0) -> Sample:
    """A 6 x 6 spot grid over a 2400 x 2000 px JPEG; gene A follows library size, gene B a left/right pattern."""
    rng = np.random.default_rng(seed)
    xs, ys = np.meshgrid(np.arange(6), np.arange(6))
    xy = np.stack([300 + xs.ravel() * 300, 250 + ys.ravel() * 300], axis=1).astype(float)
    n = len(xy)
    lib = rng.uniform(0.5, 1.5, n) * depth
    b = np.where(xs.ravel() < 3, 5.0, 50.0)
    counts = np.stack([np.round(lib * 0.1), np.round(b * depth / 100), rng.poisson(3, n), rng.poisson(5, n)], axis=1)
    counts[:, 2:] += 1
    adata = ad.AnnData(sp.csr_matrix(counts.astype(np.float32)), obs=pd.DataFrame(index=[f"s{i}" for i in range(n)]),
                       var=pd.DataFrame(index=["A", "B", "C", "D"]))
    adata.obsm["spatial"] = xy
    img = np.full((2000, 2400, 3), 240, np.uint8)
    img[200:1900, 200:1650] = (150, 90, 160)  # tissue; the right column of spots (x = 1800) lies on glass
    path = tmp_path / f"{sid}.jpg"
    Image.fromarray(img).save(path, quality=90)
    return Sample(sid, patient, adata, pixel_size_um=0.5, image_path=path, meta={"organ": "x"})


@pytest.fixture
def samples(tmp_path):
    return [make_sample(tmp_path, "S1", "P1", 100.0), make_sample(tmp_path, "S2", "P2", 2000.0, seed=1)]


def test_spot_qc_summary_reports_depth_ratio(samples):
    qc = pld.spot_qc(samples)
    assert list(qc["section"].cat.categories) == ["S1", "S2"] and len(qc) == 72
    summary = pld.spot_qc_summary(qc)
    medians = qc.groupby("section", observed=True)["total_counts"].median()
    assert summary.loc["S2", "counts_vs_lowest"] == pytest.approx(medians["S2"] / medians["S1"], abs=0.06)
    assert summary.loc["S1", "counts_vs_lowest"] == 1.0
    assert (summary["median_genes"] <= 4).all()


def test_library_confounding_separates_target_kinds(samples):
    conf = pld.library_confounding(samples, ["A", "B"]).set_index(["gene", "kind"])["r_library"]
    assert conf["A", "log1p"] > 0.9  # gene A is a fixed share of the library: its raw counts track depth
    assert abs(conf["A", "log1p_norm"]) < conf["A", "log1p"] - 0.3


def test_patch_qc_flags_glass(samples):
    qc = pld.patch_qc_table(samples)
    summary = pld.patch_qc_summary(qc)
    assert summary["total"].tolist() == [36, 36] and summary["out of image"].sum() == 0
    assert summary.loc["S1", "background"] == 6 and summary.loc["S1", "ok"] == 30
    assert set(qc["status"].cat.categories) == set(pld.QC_COLOURS)


def test_thumbnail_decodes_jpeg_at_reduced_scale_and_memoises(samples):
    from histomoe_core.data.patches import load_image

    img, f = thumbnail(samples[0], max_px=600)
    full = load_image(samples[0].image_path)
    assert f == 600 / max(full.shape[:2]) and img.shape[:2] == (int(full.shape[0] * f), int(full.shape[1] * f))
    ref = np.asarray(Image.fromarray(full).resize(img.shape[1::-1], Image.BILINEAR))
    assert np.abs(img.astype(int) - ref).mean() < 4  # the draft decode is the same picture
    again, _ = thumbnail(samples[0], max_px=600)
    assert again is img and not img.flags.writeable  # memoised and shared, so read-only


def test_spots_keep_their_size_on_the_tissue_whatever_the_layout(samples):
    from matplotlib.collections import EllipseCollection

    from histomoe_core.pl.spatial import spatial_scatter

    s = samples[0]
    fig, ax = plt.subplots(figsize=(3, 3))
    spatial_scatter(s, np.arange(s.n_spots), ax=ax, spot_um=100.0)  # adds a colour bar, shrinking the axes
    fig.tight_layout()
    coll = [c for c in ax.collections if isinstance(c, EllipseCollection)][0]
    _, f = thumbnail(s)
    # spot diameter in thumbnail pixels (data units), fixed by the tissue, not by the axes size
    assert np.allclose(coll.get_widths(), 100.0 / s.pixel_size_um * f)
    assert len(coll.get_offsets()) == s.n_spots
    plt.close(fig)


def test_figures_draw(samples):
    qc = pld.patch_qc_table(samples)
    figs = [
        pld.sections(samples), pld.spot_qc_distributions(pld.spot_qc(samples)), pld.example_patches(samples[0], qc, n=3),
        pld.target_kinds(samples, "B"), pld.library_confounding_plot(pld.library_confounding(samples, ["A", "B"])),
        pld.patch_qc_map(samples[0], qc).figure,
    ]
    assert all(isinstance(f, plt.Figure) and f.axes for f in figs)
    assert len(figs[3].axes) >= 4  # 2 target kinds x 2 sections (+ colour bars)
    plt.close("all")
