"""HEST-1k adapter: a tiny fixture in HEST's exact on-disk layout, fetch from mirrors / cache / offline, tasks."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from histomoe_core.data import load_dataset
from histomoe_core.data.fetch import fetch
from histomoe_core.data.hest import fetch_hest, hest_task, load_hest, read_hest_bench
from histomoe_core.data.manifests import load_manifest
from histomoe_core.data.patches import PatchSpec, iter_patches
from histomoe_core.errors import DataError, FetchError

REFERENCE_TASKS = Path(__file__).resolve().parents[2] / "shared" / "reference" / "hest_bench_tasks"
PX = 224
#: id -> (spots, patient); TENX118 and TENX141 form HEST-Bench task LUNG; TENX141 has no patient in its metadata
SAMPLES = {"TENX118": (30, "lung_p1"), "TENX141": (24, None), "MISC7": (20, None)}


def _barcodes(n: int, rng: np.random.Generator) -> list[str]:
    return ["".join(rng.choice(list("ACGT"), 16)) + "-1" for _ in range(n)]


def write_hest_sample(root: Path, sid: str, n: int, patient: str | None, seed: int) -> dict:
    """One sample in HEST's layout; returns what was written (spot order of st; the patch file is shuffled)."""
    rng = np.random.default_rng(seed)
    genes = [f"GENE{i}" for i in range(12)]
    counts = rng.poisson(3.0, (n, len(genes))).astype(np.int64)
    bc = _barcodes(n, rng)
    xy = rng.uniform(300, 5000, (n, 2))
    adata = ad.AnnData(X=sp.csr_matrix(counts), obs=pd.DataFrame({"in_tissue": 1}, index=bc), var=pd.DataFrame(index=genes))
    adata.obsm["spatial"] = xy
    for d in ("st", "patches", "metadata"):
        (root / d).mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(root / "st" / f"{sid}.h5ad")
    img = rng.integers(0, 256, (n, PX, PX, 3), dtype=np.uint8)
    order = rng.permutation(n)
    with h5py.File(root / "patches" / f"{sid}.h5", "w") as f:
        f.create_dataset("img", data=img[order])
        f.create_dataset("barcode", data=np.array(bc, dtype="S")[order][:, None])
        f.create_dataset("coords", data=np.round(xy[order] - PX / 2).astype(np.int64))
    meta = {"id": sid, "dataset_title": "fixture", "organ": "Lung", "oncotree_code": "LUAD", "species": "Homo sapiens",
            "patient": patient, "st_technology": "Visium", "pixel_size_um_estimated": 0.2738, "magnification": "40x",
            "disease_state": "Cancer", "license": "CC BY 4.0", "spots_under_tissue": n}
    (root / "metadata" / f"{sid}.json").write_text(json.dumps(meta))
    return {"counts": counts, "barcodes": bc, "xy": xy, "img": img, "meta": meta}


def write_hest_root(root: Path) -> dict:
    written = {sid: write_hest_sample(root, sid, n, p, seed) for seed, (sid, (n, p)) in enumerate(SAMPLES.items())}
    pd.DataFrame([w["meta"] for w in written.values()]).to_csv(root / "HEST_v1_1_0.csv", index=False)
    return written


@pytest.fixture(scope="module")
def hest_fixture(tmp_path_factory):
    root = tmp_path_factory.mktemp("hest") / "hest1k"
    return root, write_hest_root(root)


def test_round_trip(hest_fixture):
    root, written = hest_fixture
    ss = load_hest(root=root)
    assert ss.ids == ["MISC7", "TENX118", "TENX141"]
    for s in ss:
        w = written[s.sample_id]
        assert list(s.adata.obs_names) == w["barcodes"]
        np.testing.assert_array_equal(s.adata.X.toarray(), w["counts"])
        np.testing.assert_allclose(s.coords, w["xy"])
        assert s.image_path is None and s.patches_path == root / "patches" / f"{s.sample_id}.h5"
        assert s.pixel_size_um == pytest.approx(0.2738)
        assert s.meta["organ"] == "Lung" and s.meta["cancer_type"] == "lung adenocarcinoma"
        assert s.meta["dataset"] == "hest1k" and s.meta["technology"] == "Visium" and s.meta["patch_size_um"] == 112
        assert s.metadata_text() == "Lung, lung adenocarcinoma"
        got = np.concatenate([b for _, b in iter_patches(s, PatchSpec(out_px=PX), batch_size=7)])
        np.testing.assert_array_equal(got, w["img"])  # patches come back in st order although the h5 is shuffled
    idx, batch = next(iter_patches(ss["TENX118"], PatchSpec(out_px=PX), indices=np.array([5, 2])))
    np.testing.assert_array_equal(batch, written["TENX118"]["img"][[5, 2]])
    # patients: from metadata, else the HEST-Bench fold group, else the sample id
    assert ss["TENX118"].patient == "fixture - lung_p1"  # study + patient: HEST labels recur across studies
    assert ss["TENX141"].patient == "LUNG-fold0" and ss["TENX141"].meta["patient_source"] == "HEST-Bench fold"
    assert ss["MISC7"].patient == "MISC7"


def test_task_selects_samples_and_folds_never_share_a_patient(hest_fixture):
    root, _ = hest_fixture
    ss = load_hest(task="lung", root=root)
    assert ss.ids == ["TENX118", "TENX141"]
    task = hest_task("LUNG")
    assert len(task["folds"]) == 2 and len(task["genes"]) == 50
    patient = {s.sample_id: s.patient for s in ss}
    for f in task["folds"]:
        assert {patient[i] for i in f.train}.isdisjoint({patient[i] for i in f.test})
    with pytest.raises(DataError, match="not part of HEST-Bench task LUNG"):
        load_hest(task="LUNG", sample_ids=["MISC7"], root=root)
    with pytest.raises(DataError, match="unknown HEST-Bench task"):
        hest_task("GLIOMA")


def test_manifest_tasks_are_patient_folds_and_match_the_reference():
    tasks = load_manifest("hest1k").extra["tasks"]
    expected_folds = {"IDC": 4, "PRAD": 2, "PAAD": 3, "SKCM": 2, "COAD": 2, "READ": 2, "CCRCC": 6, "LUNG": 2, "LYMPH_IDC": 4}
    assert {t: len(v["folds"]) for t, v in tasks.items() if t != "HCC"} == expected_folds
    for name in tasks:
        t = hest_task(name)
        tests = [set(f.test) for f in t["folds"]]
        assert set().union(*tests) == set(t["samples"]) and sum(map(len, tests)) == len(t["samples"])  # a partition
        for f in t["folds"]:
            assert set(f.train) == set(t["samples"]) - set(f.test)
        assert len(set(t["genes"])) == 50
    assert len(tasks["PRAD"]["samples"]) == 23 and "MEND155" not in tasks["PRAD"]["samples"]
    if REFERENCE_TASKS.is_dir():
        assert read_hest_bench(REFERENCE_TASKS) == tasks


def test_load_dataset_uses_mirror(hest_fixture, tmp_path, monkeypatch):
    root, written = hest_fixture
    mirror = tmp_path / "mirror"
    shutil.copytree(root, mirror / "hest1k")
    monkeypatch.setenv("HISTOMOE_MIRRORS", str(mirror))
    monkeypatch.setenv("HISTOMOE_DATA_DIR", str(tmp_path / "data"))
    ss = load_dataset("hest", sample_ids=["TENX118"])
    assert ss["TENX118"].patches_path == mirror / "hest1k" / "patches" / "TENX118.h5"
    np.testing.assert_array_equal(ss["TENX118"].adata.X.toarray(), written["TENX118"]["counts"])
    assert not (mirror / "hest1k" / "SHA256SUMS").exists()  # mirrors are read, never written
    # a sample missing everywhere: offline, it fails at once, before anything is copied
    with pytest.raises(FetchError, match="NCBI783"):
        load_dataset("hest", sample_ids=["TENX118", "NCBI783"])
    assert not (tmp_path / "data" / "hest1k").exists()
    # samples spread over a mirror and the cache are gathered into the cache
    shutil.copytree(root, tmp_path / "data" / "hest1k", ignore=shutil.ignore_patterns("TENX118*"))
    shutil.rmtree(mirror / "hest1k" / "st")
    (mirror / "hest1k" / "st").mkdir()
    shutil.copy(root / "st" / "TENX118.h5ad", mirror / "hest1k" / "st")
    assert fetch_hest(None, ["TENX118", "MISC7"]) == tmp_path / "data" / "hest1k"
    assert (tmp_path / "data" / "hest1k" / "st" / "TENX118.h5ad").is_file()


def test_unreachable_hub_gives_a_fetch_error(tmp_path):
    """Online path: snapshot_download against a closed local port; the error names the gated dataset's terms."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HISTOMOE_OFFLINE", "HISTOMOE_MIRRORS")}
    env |= {"HISTOMOE_DATA_DIR": str(tmp_path / "data"), "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_ETAG_TIMEOUT": "2"}
    code = (
        "from histomoe_core.data.hest import fetch_hest\n"
        "from histomoe_core.errors import FetchError\n"
        "try:\n    fetch_hest(None, ['TENX95'])\nexcept FetchError as e:\n    print('FETCHERROR', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert "FETCHERROR download of HEST-1k sample(s) TENX95 from MahmoodLab/hest failed" in out.stdout, out.stderr
    assert "accept its terms" in out.stdout


def test_offline_fetch_fails_fast_with_a_useful_message(tmp_path, monkeypatch):
    monkeypatch.setenv("HISTOMOE_MIRRORS", str(tmp_path / "empty_mirror"))
    monkeypatch.setenv("HISTOMOE_DATA_DIR", str(tmp_path / "data"))
    t0 = time.perf_counter()
    with pytest.raises(FetchError) as err:
        fetch_hest(load_manifest("hest1k"), ["TENX95"])
    assert time.perf_counter() - t0 < 5
    msg = str(err.value)
    for part in ("TENX95", "st/TENX95.h5ad", "patches/TENX95.h5", "HISTOMOE_MIRRORS", "HF_HUB_OFFLINE",
                 "huggingface.co/datasets/MahmoodLab/hest", str(tmp_path / "empty_mirror" / "hest1k")):
        assert part in msg, part
    t0 = time.perf_counter()
    with pytest.raises(FetchError, match=r"INT1, INT2, .* \(72 samples\) not found locally"):
        fetch("hest1k")  # data/fetch.py hands kind huggingface to fetch_hest: every task sample
    assert time.perf_counter() - t0 < 5


def test_cache_records_and_checks_sha256(hest_fixture, tmp_path, monkeypatch):
    root, _ = hest_fixture
    data = tmp_path / "data"
    shutil.copytree(root, data / "hest1k")
    monkeypatch.setenv("HISTOMOE_MIRRORS", "")
    monkeypatch.setenv("HISTOMOE_DATA_DIR", str(data))
    assert fetch_hest(None, ["TENX118"]) == data / "hest1k"
    sums = (data / "hest1k" / "SHA256SUMS").read_text().splitlines()
    assert sorted(line.split()[1] for line in sums) == ["metadata/TENX118.json", "patches/TENX118.h5", "st/TENX118.h5ad"]
    fetch_hest(None, ["TENX118"])  # checked again, nothing new recorded
    assert len((data / "hest1k" / "SHA256SUMS").read_text().splitlines()) == 3
    with open(data / "hest1k" / "metadata" / "TENX118.json", "a") as f:
        f.write(" ")
    with pytest.raises(FetchError, match="metadata/TENX118.json: sha256 .* differs"):
        fetch_hest(None, ["TENX118"])


def test_mismatched_patch_file_is_refused(hest_fixture, tmp_path):
    root, _ = hest_fixture
    bad = tmp_path / "hest1k"
    shutil.copytree(root, bad)
    shutil.copy(root / "patches" / "TENX141.h5", bad / "patches" / "TENX118.h5")
    with pytest.raises(DataError, match=r"patches/TENX118.h5: 24 of 24 patch barcodes are not spots of TENX118.h5ad"):
        load_hest(root=bad, sample_ids=["TENX118"])
    # a patch file covering only some spots: dropped with a warning (as HEST-Bench does) or refused
    with h5py.File(root / "patches" / "MISC7.h5") as src, h5py.File(bad / "patches" / "MISC7.h5", "w") as dst:
        for k in ("img", "barcode", "coords"):
            dst.create_dataset(k, data=src[k][:15])
    with pytest.warns(UserWarning, match="dropping 5 spots"):
        s = load_hest(root=bad, sample_ids=["MISC7"])["MISC7"]
    assert s.n_spots == 15 and s.meta["n_unpatched_dropped"] == 5
    assert len(np.concatenate([b for _, b in iter_patches(s, PatchSpec(out_px=32))])) == 15
    with pytest.raises(DataError, match="5 spots of MISC7.h5ad have no patch"):
        load_hest(root=bad, sample_ids=["MISC7"], unpatched="error")
    # img and barcode counts disagree
    with h5py.File(bad / "patches" / "MISC7.h5", "a") as f:
        del f["barcode"]
        f.create_dataset("barcode", data=np.array(["x"] * 3, dtype="S")[:, None])
    with pytest.raises(DataError, match="MISC7.h5: img .* 3 barcodes"):
        load_hest(root=bad, sample_ids=["MISC7"])


def test_bad_expression_files_are_refused(hest_fixture, tmp_path):
    root, _ = hest_fixture
    bad = tmp_path / "hest1k"
    shutil.copytree(root, bad)
    st = bad / "st" / "TENX118.h5ad"
    with h5py.File(st, "a") as f:  # coordinates for fewer spots than counts
        xy = f["obsm/spatial"][:-2]
        del f["obsm/spatial"]
        f["obsm"].create_dataset("spatial", data=xy).attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
    with pytest.raises(DataError, match="st/TENX118.h5ad: cannot read"):
        load_hest(root=bad, sample_ids=["TENX118"])
    a = ad.read_h5ad(root / "st" / "TENX141.h5ad")
    a.X = a.X.astype(np.float32)
    a.X[0, 0] = -1
    a.write_h5ad(bad / "st" / "TENX141.h5ad")
    with pytest.raises(DataError, match="TENX141.h5ad: counts contain negative"):
        load_hest(root=bad, sample_ids=["TENX141"])
    (bad / "metadata" / "MISC7.json").write_text("{not json")
    with pytest.raises(DataError, match="metadata/MISC7.json: cannot read"):
        load_hest(root=bad, sample_ids=["MISC7"])
