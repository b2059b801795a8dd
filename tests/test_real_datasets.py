"""The issue-10 readers on small real copies of the mirrors (ffpe_analysis, spacest, murine_colon_explorer) and on
broken copies: each problem a one-line error naming the file and the fix, nothing half-written in any cache."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from histomoe_core import paths
from histomoe_core.data.sample import Sample, species_gene_ids, require_one_species
from histomoe_core.errors import DataError, FetchError

KIDNEY = "data/kidneyorganoid/V19D02-085_B1"


def mirror(name: str) -> Path:
    for m in paths.mirrors():
        if (m / name).is_dir():
            return m / name
    pytest.skip(f"{name} mirror not found; set HISTOMOE_MIRRORS to a folder holding {name}/")


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty HistoMoE home (data, cache, registry) for one test."""
    monkeypatch.setenv("HISTOMOE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def outs(tmp_path) -> Path:
    """A copy of one real Space Ranger outs/ subset (kidney organoid section V19D02-085_B1)."""
    dst = tmp_path / "V19D02-085_B1"
    shutil.copytree(mirror("ffpe_analysis") / KIDNEY, dst)
    return dst


def positions(outs: Path) -> pd.DataFrame:
    return pd.read_csv(outs / "spatial" / "tissue_positions_list.csv", header=None, index_col=0)


def one_line(exc: pytest.ExceptionInfo, *names: str) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    for n in names:
        assert n in msg, msg
    return msg


# ------------------------------------------------------------------------------------------------ Space Ranger
def test_spaceranger_reads_spots_under_tissue_in_hires_pixels(outs):
    from histomoe_core.data.spaceranger import read_spaceranger, spacing_pixel_size

    s = read_spaceranger(outs)
    pos = positions(outs)
    under = pos[pos[1] == 1]
    assert s.n_spots == len(under) and set(s.adata.obs_names) == set(under.index)
    scale = json.loads((outs / "spatial" / "scalefactors_json.json").read_text())["tissue_hires_scalef"]
    np.testing.assert_allclose(s.coords, under.loc[s.adata.obs_names, [5, 4]].to_numpy(float) * scale)
    assert s.image_path == outs / "spatial" / "tissue_hires_image.png"
    assert s.species == "human" and set(s.adata.var["species"]) == {"human"}
    assert not any(g.startswith("GRCh38") for g in s.adata.var_names) and s.adata.var_names.is_unique
    assert species_gene_ids(s.adata)[0].startswith("human:")
    assert s.pixel_size_um == pytest.approx(spacing_pixel_size(s.coords))
    data = s.adata.X.data
    assert np.array_equal(data, np.round(data)) and data.min() > 0


def test_spaceranger_new_positions_file_with_header(outs):
    from histomoe_core.data.spaceranger import POSITION_COLUMNS, read_spaceranger

    old = outs / "spatial" / "tissue_positions_list.csv"
    pd.read_csv(old, header=None).set_axis(POSITION_COLUMNS, axis=1).to_csv(outs / "spatial" / "tissue_positions.csv", index=False)
    ref = read_spaceranger(outs)
    old.unlink()
    s = read_spaceranger(outs)
    np.testing.assert_array_equal(s.coords, ref.coords)


def test_spaceranger_full_resolution_image_keeps_fullres_pixels(outs, tmp_path):
    from histomoe_core.data.spaceranger import read_spaceranger

    fullres = tmp_path / "fullres.png"  # stands in for the image Space Ranger was run on (not in the mirror)
    shutil.copyfile(outs / "spatial" / "tissue_hires_image.png", fullres)
    s = read_spaceranger(outs, image=fullres)
    pos = positions(outs).loc[s.adata.obs_names]
    np.testing.assert_array_equal(s.coords, pos[[5, 4]].to_numpy(float))
    assert s.image_path == fullres and s.meta["scalefactor"] == 1.0
    with pytest.raises(DataError) as exc:
        read_spaceranger(outs, image=tmp_path / "nope.tif")
    one_line(exc, "nope.tif", "full-resolution")


@pytest.mark.parametrize("broken, named", [
    ("filtered_feature_bc_matrix.h5", "filtered_feature_bc_matrix.h5"),
    ("spatial/scalefactors_json.json", "scalefactors_json.json"),
    ("spatial/tissue_hires_image.png", "tissue_hires_image.png"),
    ("spatial/tissue_positions_list.csv", "tissue_positions"),
])
def test_spaceranger_missing_file(outs, broken, named):
    from histomoe_core.data.spaceranger import read_spaceranger

    (outs / broken).unlink()
    with pytest.raises(DataError) as exc:
        read_spaceranger(outs)
    assert "copy" in one_line(exc, named)


def test_spaceranger_barcodes_absent_from_positions(outs):
    from histomoe_core.data.spaceranger import read_spaceranger

    pos = positions(outs)
    pos.drop(index=pos.index[pos[1] == 1][:3]).to_csv(outs / "spatial" / "tissue_positions_list.csv", header=False)
    with pytest.raises(DataError) as exc:
        read_spaceranger(outs)
    one_line(exc, "tissue_positions_list.csv", "3 barcodes", "same Space Ranger")


def test_spaceranger_corrupt_matrix(outs):
    from histomoe_core.data.spaceranger import read_spaceranger

    (outs / "filtered_feature_bc_matrix.h5").write_bytes(b"not hdf5")
    with pytest.raises(DataError) as exc:
        read_spaceranger(outs)
    one_line(exc, "filtered_feature_bc_matrix.h5")


def test_mixed_species_refused(outs):
    from histomoe_core.data.spaceranger import read_matrix, split_genomes

    a = read_matrix(outs / "filtered_feature_bc_matrix.h5")
    genome = a.var["genome"].to_numpy().copy()
    genome[: a.n_vars // 2] = "mm10"  # a barnyard reference: human and mouse features in one matrix
    a.var["genome"] = genome
    with pytest.raises(DataError) as exc:
        split_genomes(a, where=outs / "filtered_feature_bc_matrix.h5")
    one_line(exc, "filtered_feature_bc_matrix.h5", "several species", "split")
    b = ad.AnnData(sp.csr_matrix(np.ones((2, 2), np.float32)), var=pd.DataFrame({"species": ["human", "mouse"]}, index=["ACTB", "Actb"]))
    b.obsm["spatial"] = np.zeros((2, 2))
    with pytest.raises(DataError) as exc:
        Sample("mixed", "p", b, 1.0)
    one_line(exc, "mixed", "several species")


# ------------------------------------------------------------------------------------------------ adapters
def test_ffpe_organoids_and_pathogen_counts():
    from histomoe_core.data import load_dataset

    root = mirror("ffpe_analysis")
    ss = load_dataset("ffpe_analysis", sections=["V19D02-085_B1", "V10F24-110_C1"])
    kid, lung = ss
    lines = (root / "data/kidneyorganoid/organoid_selection.txt").read_text().split()
    listed = [b[:-2] for b in lines if b.endswith("-1_1")]
    assert (kid.adata.obs["organoid"] != "unassigned").sum() == len(set(listed) & set(kid.adata.obs_names))
    assert "sars_cov_2_counts" in lung.adata.obs and lung.adata.obs["sars_cov_2_counts"].sum() >= 0
    assert not any(g.startswith("wuhCor1") for g in lung.adata.var_names)
    assert lung.meta["disease_state"] == "COVID-19" and kid.meta["preservation"] == "FFPE"
    assert "FFPE" in kid.metadata_text() and kid.patient == kid.sample_id


def test_ffpe_species_filter_and_pooling_guard():
    from histomoe_core.data import load_dataset

    mouse = load_dataset("ffpe_analysis", species="mouse", sections=["V10F24-078_A1", "V19D02-085_B1"])
    assert mouse.ids == ["V10F24-078_A1"] and "mouse" in mouse[0].metadata_text()
    both = load_dataset("ffpe_analysis", sections=["V10F24-078_A1", "V19D02-085_B1"])
    with pytest.raises(DataError) as exc:
        require_one_species(list(both))
    one_line(exc, "human", "mouse")


def test_spacest_replicate_from_the_r_workspace():
    from histomoe_core.data import load_dataset
    from histomoe_core.data.patches import image_size

    (s,) = load_dataset("spacest", sections=["MOB2"])
    w, h = image_size(s.image_path)
    assert s.n_spots > 0 and s.adata.n_vars > 0 and s.species == "mouse"
    assert (s.coords >= 0).all() and (s.coords[:, 0] < w).all() and (s.coords[:, 1] < h).all()
    assert np.array_equal(s.adata.X.data, np.round(s.adata.X.data))


@pytest.fixture
def colon(tmp_path) -> Path:
    """murine_colon_explorer with only its zoom-1 tiles (4 of them)."""
    src, dst = mirror("murine_colon_explorer"), tmp_path / "colon"
    shutil.copytree(src / "data", dst / "data")
    shutil.copytree(src / "www/map1/tiles/1", dst / "www/map1/tiles/1")
    return dst


def test_colon_counts_and_stitched_tiles(colon, home):
    from histomoe_core.data.murine_colon import load_murine_colon, read_rds
    from histomoe_core.data.patches import image_size

    (s,) = load_murine_colon(root=colon, zoom=1)
    assert image_size(s.image_path) == (512, 512) and str(s.image_path).startswith(str(home))
    raw = read_rds(colon / "data/expr.data1")
    np.testing.assert_allclose(np.sort(np.log1p(s.adata.X.data)), np.sort(np.asarray(raw.x)), rtol=1e-6)
    assert np.array_equal(s.adata.X.data, np.round(s.adata.X.data)) and s.species == "mouse"
    again = load_murine_colon(root=colon, zoom=1)[0]
    assert again.image_path == s.image_path  # stitched once, then read from the cache


def test_colon_missing_tile_leaves_no_cache(colon, home):
    from histomoe_core.data.murine_colon import load_murine_colon

    (colon / "www/map1/tiles/1/1/0.png").unlink()
    with pytest.raises(DataError) as exc:
        load_murine_colon(root=colon, zoom=1)
    one_line(exc, "1/1/0.png", "fetch")
    assert not (home / "cache").exists() or not any((home / "cache").rglob("*.png"))


def test_colon_non_integer_counts(colon):
    from histomoe_core.data.murine_colon import log1p_counts, read_rds

    raw = read_rds(colon / "data/expr.data1")
    normalised = SimpleNamespace(**{**vars(raw), "x": np.asarray(raw.x) * 1.1})
    with pytest.raises(DataError) as exc:
        log1p_counts(normalised, where=colon / "data/expr.data1")
    one_line(exc, "expr.data1", "not integer")


# ------------------------------------------------------------------------------------------------ manifests, fetch
def test_manifests_list_every_mirror_file():
    from histomoe_core.data.manifests import load_manifest

    for name in ("ffpe_analysis", "spacest", "murine_colon_explorer"):
        sums = dict(reversed(line.split(None, 1)) for line in (mirror(name) / "SHA256SUMS").read_text().splitlines())
        m = load_manifest(name)
        assert {f.path: f.sha256 for f in m.files} == {p.strip().removeprefix("./"): h for p, h in sums.items()}
        assert m.source["commit"] in m.source["base_url"] and m.license and m.citation


def test_fetch_subset_and_wrong_sha256(tmp_path, home, monkeypatch):
    from histomoe_core.data.fetch import fetch
    from histomoe_core.data.manifests import load_manifest

    m = load_manifest("spacest")
    assert {f.path for f in m.files_of(["MOB1"])} == {f.path for f in m.files} - {"inst/extdata/HE_Rep2.jpg"}
    bad = tmp_path / "mirror" / "spacest"
    shutil.copytree(mirror("spacest"), bad)
    (bad / "DESCRIPTION").write_text("tampered\n")
    monkeypatch.setenv("HISTOMOE_MIRRORS", str(tmp_path / "mirror"))
    with pytest.raises(FetchError) as exc:
        fetch("spacest", progress=False, sections=["MOB1"])
    assert "DESCRIPTION: sha256 mismatch" in str(exc.value) and "HISTOMOE_MIRRORS" in str(exc.value)
    data = home / "data" / "spacest"
    assert not (data / "DESCRIPTION").exists() and not list(data.rglob("*.part"))
    assert (data / "data/MOB.RData").is_file() and not (data / "inst/extdata/HE_Rep2.jpg").exists()


# ------------------------------------------------------------------------------------------------ your own data
def test_register_spaceranger_then_load_by_name(outs, home):
    from histomoe_core.data import load_dataset, userdata

    ss = userdata.register_spaceranger("mykidney", [outs], species="human", organ="Kidney", preservation="FFPE")
    assert userdata.registered() == ["mykidney"]
    again = load_dataset("mykidney")
    assert again.ids == ss.ids and again[0].n_spots == ss[0].n_spots and again[0].meta["organ"] == "Kidney"
    (outs / "spatial" / "scalefactors_json.json").write_text('{"tissue_hires_scalef": 1.0}')
    with pytest.raises(DataError) as exc:
        load_dataset("mykidney")
    one_line(exc, "scalefactors_json.json", "sha256", "register")
    with pytest.raises(DataError) as exc:
        userdata.register_spaceranger("her2st", [outs], species="human")
    one_line(exc, "built-in")


def test_register_anndata_refuses_non_integer_counts(outs, home):
    from histomoe_core.data import userdata
    from histomoe_core.data.spaceranger import read_spaceranger

    s = read_spaceranger(outs)
    h5ad = outs / "mine.h5ad"
    s.adata.write_h5ad(h5ad)
    ss = userdata.register_anndata("mine", h5ad, image=s.image_path, um_per_px=s.pixel_size_um, species="human", organ="Kidney")
    assert ss[0].n_spots == s.n_spots and (home / "datasets" / "mine" / "mine.h5ad").is_file()
    norm = s.adata.copy()
    norm.X = norm.X.multiply(1.0 / np.asarray(norm.X.sum(axis=1))).tocsr()
    with pytest.raises(DataError) as exc:
        userdata.register_anndata("normed", norm, image=s.image_path, um_per_px=1.0, species="human")
    one_line(exc, "non-integer", "raw counts")
    assert "normed" not in userdata.registered() and not (home / "datasets" / "normed").exists()


def test_cli_add_and_summary(outs, home, capsys):
    from histomoe_core.cli import main

    assert main(["data", "add", "cliset", "--spaceranger", str(outs), "--species", "human", "--organ", "Kidney"]) == 0
    assert "registered 'cliset'" in capsys.readouterr().out
    assert main(["data", "summary", "cliset"]) == 0 and "patch_px" in capsys.readouterr().out
    (outs / "filtered_feature_bc_matrix.h5").unlink()
    assert main(["data", "add", "broken", "--spaceranger", str(outs), "--species", "human"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "filtered_feature_bc_matrix.h5" in err[0] and "copy" in err[0]
