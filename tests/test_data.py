"""Data layer on real her2st files and on deliberately broken copies of them."""
from __future__ import annotations

import gzip
import os
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from histomoe_core.data import Sample
from histomoe_core.data.fetch import fetch, verify
from histomoe_core.data.genes import expressed_fraction, select_panel
from histomoe_core.data.her2st import load_her2st
from histomoe_core.data.manifests import load_manifest
from histomoe_core.data.patches import PatchSpec, iter_patches, patch_qc
from histomoe_core.data.splits import make_folds
from histomoe_core.data.targets import make_targets
from histomoe_core.errors import DataError, FetchError

from conftest import DEFAULT_MIRROR

MIRROR = Path(os.environ.get("HISTOMOE_MIRRORS", str(DEFAULT_MIRROR)).split(os.pathsep)[0]) / "her2st"


def _source_rows(section: str) -> int:
    with gzip.open(MIRROR / "data" / "ST-cnts" / f"{section}.tsv.gz", "rt") as f:
        return sum(1 for _ in f) - 1  # header line


def _linked_copy(tmp: Path, *, skip: str | None = None) -> Path:
    """A mirror holding symlinks to the real her2st files (optionally without one)."""
    root = tmp / "mirror" / "her2st"
    for entry in load_manifest("her2st").files:
        if entry.path == skip:
            continue
        dst = root / entry.path
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.symlink_to(MIRROR / entry.path)
    return root


def test_her2st_has_8_sections_with_source_spot_counts(her2st):
    assert her2st.ids == ["A1", "A2", "B4", "C2", "C3", "C4", "C5", "C6"]
    assert her2st.patients == ["A", "B", "C"]
    for s in her2st:
        assert s.n_spots == _source_rows(s.sample_id)
        assert s.coords.shape == (s.n_spots, 2)
    assert sum(s.n_spots for s in her2st) == 1864


def test_her2st_pixel_size_and_metadata(her2st):
    full = [s.pixel_size_um for s in her2st if s.patient != "A"]
    low = [s.pixel_size_um for s in her2st if s.patient == "A"]
    assert all(0.6 < p < 0.8 for p in full) and all(2.8 < p < 3.6 for p in low)
    b4 = her2st["B4"]
    assert b4.meta["pgr"] == "+" and b4.meta["er"] == "-" and b4.meta["grade"] == "3"
    assert her2st["C2"].meta["node_status"] == "+"
    assert "PgR+" in b4.metadata_text() and b4.metadata_text().startswith("Breast")


def test_manifest_matches_mirror_checksums():
    sums = dict(reversed(line.split(None, 1)) for line in (MIRROR / "SHA256SUMS").read_text().splitlines() if line)
    manifest = {f.path: f.sha256 for f in load_manifest("her2st").files}
    assert {p.removeprefix("./"): h for p, h in sums.items()} == manifest
    assert all(status == "ok" for _, status in verify("her2st"))


def test_fetch_prefers_a_complete_mirror(tmp_path, monkeypatch):
    broken = _linked_copy(tmp_path / "a", skip="data/ST-cnts/A1.tsv.gz")
    monkeypatch.setenv("HISTOMOE_MIRRORS", os.pathsep.join([str(broken.parent), str(MIRROR.parent)]))
    assert fetch("her2st", progress=False) == MIRROR


def test_fetch_missing_file_fails_fast_and_names_it(tmp_path, monkeypatch):
    mirror = _linked_copy(tmp_path, skip="data/ST-cnts/B4.tsv.gz")
    monkeypatch.setenv("HISTOMOE_MIRRORS", str(mirror.parent))
    monkeypatch.setenv("HISTOMOE_DATA_DIR", str(tmp_path / "cache"))
    t0 = time.perf_counter()
    with pytest.raises(FetchError) as err:
        fetch("her2st", progress=False)
    assert time.perf_counter() - t0 < 10
    msg = str(err.value)
    assert "data/ST-cnts/B4.tsv.gz" in msg and "HISTOMOE_MIRRORS" in msg
    cache = tmp_path / "cache" / "her2st"
    assert not (cache / "data/ST-cnts/B4.tsv.gz").exists()
    assert not [p for p in cache.rglob("*") if p.name.endswith(".part")]
    # the files that were available were copied and verified, so a later fetch needs only the missing one
    assert (cache / "data/ST-cnts/A1.tsv.gz").is_file()


def test_sha256_mismatch_is_refused(tmp_path, monkeypatch):
    mirror = _linked_copy(tmp_path, skip="data/ST-spotfiles/C3_selection.tsv")
    bad = mirror / "data/ST-spotfiles/C3_selection.tsv"
    bad.write_text((MIRROR / "data/ST-spotfiles/C3_selection.tsv").read_text().replace("\t1\n", "\t0\n", 1))
    monkeypatch.setenv("HISTOMOE_MIRRORS", str(mirror.parent))
    monkeypatch.setenv("HISTOMOE_DATA_DIR", str(tmp_path / "cache"))
    with pytest.raises(FetchError, match="C3_selection.tsv: sha256 mismatch"):
        fetch("her2st", progress=False)
    assert not (tmp_path / "cache" / "her2st" / "data/ST-spotfiles/C3_selection.tsv").exists()


def test_counts_without_coordinates_are_refused(tmp_path):
    root = _linked_copy(tmp_path, skip="data/ST-spotfiles/B4_selection.tsv")
    lines = (MIRROR / "data/ST-spotfiles/B4_selection.tsv").read_text().splitlines()
    (root / "data/ST-spotfiles/B4_selection.tsv").write_text("\n".join(lines[:-5]) + "\n")
    with pytest.raises(DataError, match=r"B4_selection.tsv: \d+ count rows have no coordinates"):
        load_her2st(root=root, sections=["B4"])


def _toy_adata(x: np.ndarray) -> ad.AnnData:
    a = ad.AnnData(X=sp.csr_matrix(x.astype(np.float32)))
    a.obsm["spatial"] = np.zeros((x.shape[0], 2))
    return a


@pytest.mark.parametrize("value,word", [(np.nan, "NaN"), (-1.0, "negative")])
def test_bad_counts_are_refused(value, word):
    x = np.ones((4, 3))
    x[1, 2] = value
    with pytest.raises(DataError, match=word):
        Sample("toy", "p", _toy_adata(x), pixel_size_um=0.5)


def test_corrupt_image_is_refused(tmp_path, her2st):
    a1 = her2st["A1"]
    broken = tmp_path / "A1.png"
    broken.write_bytes(Path(a1.image_path).read_bytes()[:50_000])
    sample = Sample("A1", "A", a1.adata.copy(), a1.pixel_size_um, image_path=broken, meta=a1.meta)
    with pytest.raises(DataError, match="corrupt or not an image"):
        next(iter_patches(sample, PatchSpec(out_px=32)))


def test_coordinates_outside_the_image_are_refused(her2st):
    a1 = her2st["A1"]
    adata = a1.adata.copy()
    adata.obsm["spatial"] = a1.coords + np.array([5000.0, 0.0])
    sample = Sample("A1", "A", adata, a1.pixel_size_um, image_path=a1.image_path, meta=a1.meta)
    with pytest.raises(DataError, match="spot centres lie outside"):
        next(iter_patches(sample, PatchSpec(out_px=32)))


def test_patches_have_the_physical_size(her2st):
    b4 = her2st["B4"]
    spec = PatchSpec()
    assert 150 <= spec.crop_px(b4.pixel_size_um) <= 175  # 112 µm at ~0.69 µm/px
    idx, batch = next(iter_patches(b4, spec, batch_size=4))
    assert batch.shape == (4, 224, 224, 3) and batch.dtype == np.uint8
    assert list(idx) == [0, 1, 2, 3]
    assert batch.std() > 10  # real tissue, not padding


def _her2st_crops(sample, crop_px: int, n: int = 12) -> np.ndarray:
    from histomoe_core.data.patches import crop_boxes, open_slide, pil_patches

    with open_slide(sample) as im:
        return pil_patches(im, crop_boxes(sample.coords[:n], crop_px), None)


@pytest.mark.parametrize("sid, crop_px", [("A1", 35), ("B4", 163), ("B4", 448), ("B4", 224)])
def test_resize_patches_is_pils_bicubic(her2st, sid, crop_px):
    """Upsampled (35 px at 3.2 µm/px, 163 px at 0.69), downsampled (448) or kept: PIL's bicubic within 2 levels."""
    from PIL import Image

    from histomoe_core.data.patches import resize_patches

    crops = _her2st_crops(her2st[sid], crop_px)
    got = resize_patches(crops, 224)
    want = np.stack([np.asarray(Image.fromarray(c).resize((224, 224), Image.BICUBIC)) for c in crops])
    diff = np.abs(got.astype(int) - want)
    assert got.shape == (len(crops), 224, 224, 3) and got.dtype == np.uint8
    assert diff.max() <= 2 and (diff == 0).mean() > 0.99, (diff.max(), (diff == 0).mean())
    if crop_px == 224:
        assert got is crops  # nothing to resize


def test_a_patch_is_resized_alike_in_any_batch_and_thread_count(her2st):
    from histomoe_core.data.patches import resize_patches
    from histomoe_core.embed import fixed_threads

    crops = _her2st_crops(her2st["B4"], 163)
    alone = np.stack([resize_patches(c[None], 224)[0] for c in crops])
    with fixed_threads(1):
        one = resize_patches(crops, 224)
    with fixed_threads(2):
        two = resize_patches(list(crops[::-1]), 224)[::-1]
    assert np.array_equal(one, alone) and np.array_equal(two, alone)
    mixed = resize_patches([crops[0], crops[1, :100, :100]], 224)  # sizes differ: each on its own
    assert np.array_equal(mixed[0], alone[0]) and mixed.shape == (2, 224, 224, 3)
    assert np.array_equal(mixed[1], resize_patches(crops[1:2, :100, :100], 224)[0])
    assert resize_patches(crops[:0], 224).shape == (0, 224, 224, 3)


def test_patch_qc_flags_a2_background(her2st):
    qc = patch_qc(her2st["A2"])
    assert qc["in_image"].all()
    # the README: 59 of A2's 325 spot centres land on the masked black background
    assert 30 <= qc["is_background"].sum() <= 120
    assert patch_qc(her2st["A1"])["is_background"].sum() < qc["is_background"].sum()


def test_targets(her2st):
    s = her2st["C2"]
    genes = list(s.adata.var_names[:20])
    raw = s.adata[:, genes].X.toarray()
    np.testing.assert_allclose(make_targets(s.adata, genes, kind="log1p"), np.log1p(raw), rtol=1e-6)
    norm = make_targets(s.adata, list(s.adata.var_names), kind="log1p_norm")
    np.testing.assert_allclose(np.expm1(norm).sum(axis=1), 1e4, rtol=1e-3)
    with pytest.raises(ValueError, match="unknown target kind"):
        make_targets(s.adata, genes, kind="zscore")


def test_lopo_folds_never_share_a_patient(her2st):
    folds = make_folds(her2st, "lopo")
    assert [f.name for f in folds] == ["test_A", "test_B", "test_C"]
    patient = {s.sample_id: s.patient for s in her2st}
    for f in folds:
        assert not {patient[i] for i in f.train} & {patient[i] for i in f.test}
        assert sorted(f.train + f.test) == sorted(her2st.ids)
    k2 = make_folds(her2st, "kfold", k=2, seed=3)
    assert sorted(sum((f.test for f in k2), ())) == sorted(her2st.ids)
    with pytest.raises(ValueError, match="k must be"):
        make_folds(her2st, "kfold", k=5)


def test_panel_is_chosen_on_the_training_fold(her2st):
    folds = make_folds(her2st, "lopo")
    everything = set(select_panel(list(her2st), n_genes=50).index)
    panels = {}
    for fold in folds:
        train = [her2st[i] for i in fold.train]
        panel = select_panel(train, n_genes=50)
        assert len(panel) == 50 and panel["score"].is_monotonic_decreasing and (panel["rule"] == "hest").all()
        assert (expressed_fraction(train, panel.index).min(axis=1) >= 0.1).all()
        panels[fold.name] = set(panel.index)
    # leaving a patient out changes the panel: a panel picked on all sections would leak the test fold
    assert any(p != everything for p in panels.values())
    assert len({frozenset(p) for p in panels.values()}) > 1


def test_cli_summary(capsys):
    from histomoe_core.cli import main

    assert main(["data", "summary", "her2st"]) == 0
    out = capsys.readouterr().out
    assert "8 sections, 3 patients (A, B, C), 1864 spots" in out
    for section, spots in {"B4": 283, "C6": 178, "A1": 346}.items():
        assert any(line.startswith(section) and f" {spots} " in line for line in out.splitlines())
    assert main(["data", "verify", "her2st"]) == 0


def test_max_spots_keeps_a_seeded_subset_in_order():
    from histomoe_core.data import load_dataset

    opts = dict(n_organs=2, patients_per_organ=1, spots_per_section=36, n_genes=8, patch_px=16)
    full = load_dataset("synthetic", **opts)
    capped, again = load_dataset("synthetic", max_spots=20, **opts), load_dataset("synthetic", max_spots=20, **opts)
    for f, c, a in zip(full, capped, again):
        assert c.n_spots == 20 and c.meta["n_spots_total"] == f.n_spots == 36
        assert list(c.adata.obs_names) == list(a.adata.obs_names)  # the same subset on every load
        pos = f.adata.obs_names.get_indexer(c.adata.obs_names)
        assert (pos >= 0).all() and (np.diff(pos) > 0).all()  # a subset, in the section's order
        np.testing.assert_array_equal(c.coords, f.coords[pos])
        np.testing.assert_array_equal(c.adata.X.toarray() if sp.issparse(c.adata.X) else c.adata.X,
                                      (f.adata.X.toarray() if sp.issparse(f.adata.X) else f.adata.X)[pos])
    # sections of different ids draw different subsets; a cap above the size keeps the section as it is
    drawn = [f.adata.obs_names.get_indexer(c.adata.obs_names) for f, c in zip(full, capped)]
    assert not np.array_equal(drawn[0], drawn[1])
    whole = load_dataset("synthetic", max_spots=36, **opts)[0]
    assert whole.n_spots == 36 and "n_spots_total" not in whole.meta
    with pytest.raises(DataError, match="max_spots must be a positive whole number"):
        load_dataset("synthetic", max_spots=0, **opts)


def test_a_dataset_of_files_is_parsed_once_until_one_of_its_files_changes(tmp_path, monkeypatch):
    """Loads of a downloaded dataset after the first are copies from memory; a changed file (size or time) or
    another copy of the data parses again."""
    import shutil

    from histomoe_core.data import load_dataset, sources

    mirror = tmp_path / "mirror"
    shutil.copytree(DEFAULT_MIRROR / "spacest", mirror / "spacest")
    monkeypatch.setenv("HISTOMOE_MIRRORS", str(mirror))
    monkeypatch.setattr(sources, "_LOADED", type(sources._LOADED)())
    parsed = []
    loader = sources.SOURCES.get("spacest")
    monkeypatch.setitem(sources.SOURCES._factories, "spacest", lambda **kw: parsed.append(kw) or loader(**kw))
    a, b = load_dataset("spacest"), load_dataset("spacest")
    c = load_dataset("spacest", max_spots=50)
    assert len(parsed) == 1 and c[0].n_spots == 50
    assert a[0].adata is not b[0].adata and (a[0].adata.X != b[0].adata.X).nnz == 0
    a[0].adata.obs["edited"] = 1
    a[0].meta["edited"] = 1
    d = load_dataset("spacest")  # a caller's edits never reach the next caller
    assert "edited" not in d[0].adata.obs and "edited" not in d[0].meta
    first = mirror / "spacest" / load_manifest("spacest").files_of(None)[0].path
    os.utime(first, ns=(first.stat().st_atime_ns, first.stat().st_mtime_ns + 10**9))
    load_dataset("spacest")
    assert len(parsed) == 2
