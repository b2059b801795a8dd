"""Issue 14: every bad input a clear one-line error (exit 2), no silent wrong results, no orphaned workers.

On small copies of real her2st sections (files linked from the mirror, the edited one copied) and on the HEST
fixture of ``test_hest.py``.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest

from histomoe_core.cli import main
from histomoe_core.data.hest import load_hest
from histomoe_core.errors import DataError
from test_hest import write_hest_root, write_hest_sample

REPO = Path(__file__).resolve().parents[1]


def cli(*argv: str) -> tuple[int, str, str]:
    """Run ``histomoe ARGV`` in this process: (exit status, stdout, stderr)."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(list(argv))
        except SystemExit as exc:  # argparse errors
            rc = exc.code
    return int(rc or 0), out.getvalue(), err.getvalue()


def one_line_error(rc: int, err: str, *parts: str) -> None:
    assert rc == 2, err
    # argparse prints its (indented, multi-line) usage first; then exactly one error line
    lines = [line for line in err.strip().splitlines() if line.strip() and not line.startswith(("usage:", " "))]
    assert len(lines) == 1 and "error: " in lines[0] and "Traceback" not in err, err
    for p in parts:
        assert p in lines[0], (p, lines[0])


@pytest.fixture(scope="module")
def hest_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("hest_mirror") / "hest1k"
    write_hest_root(root)
    return root


@pytest.fixture
def hest_mirror(hest_root, tmp_path, monkeypatch):
    monkeypatch.setenv("HISTOMOE_MIRRORS", str(hest_root.parent))
    monkeypatch.setenv("HISTOMOE_HOME", str(tmp_path / "home"))
    return hest_root


# ------------------------------------------------------------------------------------------------ CLI options


@pytest.mark.parametrize("argv, parts", [
    (["data", "summary", "her2s"], ["unknown dataset 'her2s'", "her2st", "hest", "synthetic"]),
    (["embed", "her2s"], ["unknown dataset 'her2s'", "her2st"]),
    (["benchmark", "her2s"], ["unknown dataset 'her2s'", "her2st"]),
    (["data", "verify", "her2s"], ["unknown dataset 'her2s'", "her2st", "hest1k"]),
    (["benchmark", "her2st", "--text-encoder", "bert"], ["unknown --text-encoder 'bert'", "minilm", "onehot"]),
    (["embed", "her2st", "--task", "IDC"], ["--task applies to hest only"]),
    (["benchmark", "her2st", "--task", "IDC"], ["--task applies to hest only"]),
])
def test_unknown_names_are_one_line_errors_listing_the_known_ones(argv, parts):
    t0 = time.perf_counter()
    one_line_error(*cli(*argv)[::2], *parts)
    assert time.perf_counter() - t0 < 10  # refused before any data is loaded


@pytest.mark.parametrize("argv, option", [
    (["embed", "her2st", "--size-um", "-5"], "--size-um"),
    (["embed", "her2st", "--batch-size", "0"], "--batch-size"),
    (["embed", "her2st", "--out-px", "0"], "--out-px"),
    (["benchmark", "her2st", "--jobs", "0"], "--jobs"),
    (["benchmark", "her2st", "--n-genes", "0"], "--n-genes"),
    (["benchmark", "her2st", "--threads", "-1"], "--threads"),
    (["inspect", "somerun", "--genes", "0"], "--genes"),
    (["embed", "her2st", "--size-um", "nan"], "--size-um"),
])
def test_numeric_options_are_checked_before_loading_anything(argv, option):
    t0 = time.perf_counter()
    rc, _, err = cli(*argv)
    one_line_error(rc, err, option, "must be")
    assert time.perf_counter() - t0 < 2


@pytest.mark.parametrize("value", ["0", "two"])
def test_bad_histomoe_jobs_is_refused_before_loading(value, monkeypatch):
    monkeypatch.setenv("HISTOMOE_JOBS", value)
    t0 = time.perf_counter()
    one_line_error(*cli("benchmark", "her2st")[::2], "HISTOMOE_JOBS")
    assert time.perf_counter() - t0 < 5


def test_cuda_device_without_a_gpu_is_a_one_line_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    one_line_error(*cli("embed", "her2st", "--device", "cuda")[::2], "--device cuda", "--device cpu")
    one_line_error(*cli("embed", "her2st", "--device", "gpu")[::2], "--device 'gpu' is not a device")


def test_every_subcommand_has_a_description_an_example_and_help_on_every_option():
    from histomoe_core.cli import build_parser

    parser = build_parser()

    def walk(p, name):
        sub = [a for a in p._actions if a.__class__.__name__ == "_SubParsersAction"]
        if sub:
            for verb, child in sub[0].choices.items():
                yield from walk(child, f"{name} {verb}")
        else:
            yield name, p

    leaves = dict(walk(parser, "histomoe"))
    assert {"histomoe data list", "histomoe data summary", "histomoe embed", "histomoe benchmark",
            "histomoe inspect", "histomoe book"} <= set(leaves)
    for name, p in leaves.items():
        assert p.description, name
        assert "examples:" in (p.epilog or "") and name in p.epilog, name
        for a in p._actions:
            assert a.help, (name, a.dest)
    rc, out, _ = cli("embed", "nope", "--no-progress")
    assert rc == 2 and "TQDM_DISABLE" not in os.environ  # the option's environment ends with the command
    rc, out, _ = cli("data", "--help")
    names = out.split("dataset names:", 1)[1].split("\n\n")[0] if "dataset names:" in out else ""
    assert rc == 0 and all(n in names for n in ("her2st", "hest1k", "synthetic", "ffpe_analysis", "tissues"))


def test_no_progress_silences_every_bar(tmp_path):
    """Subprocesses, as a user runs them: synthetic data generated, embedded and loaded; with --no-progress no bar."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("TQDM_DISABLE", None)
    cmd = [sys.executable, "-m", "histomoe_core.cli", "embed", "synthetic", "--encoder", "tiny"]

    def run(*extra: str, home: str) -> subprocess.CompletedProcess:
        out = subprocess.run(cmd + list(extra), env=env | {"HISTOMOE_HOME": str(tmp_path / home)},
                             capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stderr
        return out

    assert "patch/s" in run(home="loud").stderr  # the embedding bar, shown by default
    quiet = run("--no-progress", home="quiet")
    assert "it/s" not in quiet.stderr and "%|" not in quiet.stderr and "/s]" not in quiet.stderr, quiet.stderr
    assert "computed: 9" in quiet.stdout


def test_unknown_sample_id_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HISTOMOE_HOME", str(tmp_path / "home"))
    one_line_error(*cli("embed", "synthetic", "--samples", "nope", "--encoder", "tiny")[::2], "no sample 'nope'")
    one_line_error(*cli("data", "summary", "her2st", "--samples", "Z9")[::2], "her2st has no section ['Z9']")


# ------------------------------------------------------------------------------------------------ data verify / HEST CLI


def test_verify_with_nothing_to_check_does_not_succeed(tmp_path, monkeypatch):
    monkeypatch.setenv("HISTOMOE_MIRRORS", str(tmp_path / "empty"))
    monkeypatch.setenv("HISTOMOE_HOME", str(tmp_path / "home"))
    rc, out, err = cli("data", "verify", "hest1k")
    assert rc == 1 and "0/216 files ok" in out and "missing" in out  # every file of every task sample
    one_line_error(*cli("data", "verify", "synthetic")[::2], "no files to verify")


def test_hest_commands_take_task_and_samples(hest_mirror):
    rc, out, err = cli("data", "summary", "hest")
    one_line_error(rc, err, "--task", "--samples")
    rc, out, err = cli("data", "summary", "hest1k", "--task", "LUNG")
    assert rc == 0, err
    assert "2 sections" in out and "TENX118" in out and "MISC7" not in out
    rc, out, err = cli("data", "summary", "hest", "--samples", "MISC7")
    assert rc == 0 and "1 sections" in out, err
    one_line_error(*cli("data", "summary", "hest", "--task", "GLIOMA")[::2], "unknown HEST-Bench task 'GLIOMA'")
    rc, out, err = cli("data", "fetch", "hest1k", "--samples", "TENX118")
    assert rc == 0 and out.strip() == str(hest_mirror), err
    rc, out, err = cli("data", "verify", "hest", "--samples", "TENX118", "TENX141")
    assert rc == 0 and "6/6 files ok" in out, out
    rc, out, err = cli("data", "verify", "hest1k", "--task", "LUNG", "--samples", "TENX118")
    assert rc == 0 and "3/3 files ok" in out
    one_line_error(*cli("data", "fetch", "hest1k", "--task", "LUNG", "--samples", "MISC7")[::2],
                   "samples ['MISC7'] are not part of HEST-Bench task LUNG")
    rc, out, err = cli("embed", "hest", "--task", "LUNG", "--encoder", "tiny", "--no-progress")
    assert rc == 0 and "hest: 2 samples, 54 spots" in out, err


# ------------------------------------------------------------------------------------------------ HEST data


def test_hest_patients_are_study_plus_patient(tmp_path):
    """HEST's labels recur across studies: "patient 2" of two studies are two patients, of one study one."""
    root = tmp_path / "hest1k"
    for seed, (sid, title) in enumerate([("TENX1", "Visium prostate"), ("TENX2", "Xenium breast"),
                                         ("TENX3", "Xenium breast")]):
        write_hest_sample(root, sid, 12, "patient 2", seed)
        meta_path = root / "metadata" / f"{sid}.json"
        meta = pd.read_json(meta_path, typ="series").to_dict() | {"dataset_title": title}
        meta_path.write_text(pd.Series(meta).to_json())
    ss = load_hest(root=root)
    assert ss["TENX1"].patient != ss["TENX2"].patient
    assert ss["TENX2"].patient == ss["TENX3"].patient == "Xenium breast - patient 2"
    assert ss["TENX1"].meta["study"] == "Visium prostate" and len(ss.patients) == 2
    from histomoe_core.data.splits import make_folds

    for f in make_folds(ss, "lopo"):  # the two studies never share a fold
        assert not ({"TENX1"} <= set(f.test) and {"TENX2"} <= set(f.test))


def test_hest_sample_without_spots_is_a_clear_error(tmp_path):
    root = tmp_path / "hest1k"
    write_hest_sample(root, "EMPTY1", 5, "p", 0)
    a = ad.read_h5ad(root / "st" / "EMPTY1.h5ad")[:0].copy()
    a.write_h5ad(root / "st" / "EMPTY1.h5ad")
    with pytest.raises(DataError, match=r"st/EMPTY1.h5ad: no spots"):
        load_hest(root=root)
    write_hest_sample(root, "EMPTY1", 5, "p", 0)
    with h5py.File(root / "patches" / "EMPTY1.h5", "r+") as f:
        for k in ("img", "barcode", "coords"):
            data = f[k][:0]
            del f[k]
            f.create_dataset(k, data=data)
    with pytest.warns(UserWarning, match="dropping 5 spots"), pytest.raises(DataError, match="no patches"):
        load_hest(root=root)


def test_hest_spots_off_the_array_grid_are_flagged(tmp_path):
    """A HEST sample with a Visium-like array grid: a moved spot or permuted spot ids are flagged."""
    root = tmp_path / "hest1k"
    write_hest_sample(root, "GRID1", 40, "p", 0)
    st = root / "st" / "GRID1.h5ad"
    a = ad.read_h5ad(st)
    row, col = np.divmod(np.arange(a.n_obs), 8)
    a.obs["array_row"], a.obs["array_col"] = row, 2 * col + row % 2  # hex lattice, as Visium numbers it
    a.obsm["spatial"] = np.c_[300 + 50 * a.obs["array_col"], 400 + 86.6 * row].astype(float)
    a.write_h5ad(st)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_hest(root=root)["GRID1"].meta["n_off_grid"] == 0
    moved = a.copy()
    moved.obsm["spatial"][7] += [120.0, 0.0]  # 1.2 pitches right, still on the image
    moved.write_h5ad(st)
    with pytest.warns(UserWarning, match=r"GRID1: 1 spots lie off the array grid"):
        assert load_hest(root=root)["GRID1"].meta["n_off_grid"] == 1
    permuted = a.copy()  # pixel positions permuted among three spots (ids and array positions kept)
    permuted.obsm["spatial"][[3, 11, 20]] = a.obsm["spatial"][[11, 20, 3]]
    permuted.write_h5ad(st)
    with pytest.warns(UserWarning, match=r"GRID1: 3 spots lie off the array grid"):
        load_hest(root=root)


def test_hest_embedding_key_follows_the_patch_file_it_reads(tmp_path):
    """With a slide (wsis/) and patches, 112 µm patches come from patches/<id>.h5: the key must follow that file."""
    import tifffile

    from histomoe_core.data.patches import PatchSpec, patch_source
    from histomoe_core.embed_cache import sample_content_key

    root = tmp_path / "hest1k"
    write_hest_sample(root, "TENX9", 6, "p", 0)
    (root / "wsis").mkdir()
    tifffile.imwrite(root / "wsis" / "TENX9.tif", np.zeros((64, 64, 3), np.uint8))
    s = load_hest(root=root)["TENX9"]
    assert s.image_path is not None and patch_source(s, PatchSpec()) == s.patches_path
    before = sample_content_key(s, PatchSpec())
    with h5py.File(s.patches_path, "r+") as f:
        f["img"][0] = 255 - f["img"][0]
    os.utime(s.patches_path, ns=(time.time_ns() + 10**9,) * 2)
    assert sample_content_key(s, PatchSpec()) != before  # new patch bytes: new key, never the old vectors
    other = PatchSpec(size_um=56)  # other sizes are cropped from the slide: its bytes decide
    assert patch_source(s, other) == s.image_path


# ------------------------------------------------------------------------------------------------ her2st data

MIRRORS = [Path(m) for m in os.environ.get("HISTOMOE_MIRRORS", "").split(os.pathsep) if m]


def her2st_root(tmp_path: Path, section: str = "C2") -> Path:
    """A her2st root holding one real section (files linked from the mirror)."""
    src = next((m / "her2st" for m in MIRRORS if (m / "her2st").is_dir()), None)
    if src is None:
        pytest.skip("her2st mirror not found")
    root = tmp_path / "her2st"
    from histomoe_core.data.manifests import load_manifest

    info = load_manifest("her2st").extra
    for rel in (f"data/ST-cnts/{section}.tsv.gz", f"data/ST-spotfiles/{section}_selection.tsv",
                info["sections"][section]["image"], info["clinical"]["sheet"]):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).symlink_to(src / rel)
    return root


def edit(root: Path, rel: str) -> Path:
    """Replace the link ``root/rel`` by a copy that can be edited."""
    p = root / rel
    target = p.resolve()
    p.unlink()
    shutil.copyfile(target, p)
    return p


def load_c2(root: Path):
    from histomoe_core.data.her2st import load_her2st

    return load_her2st(sections=["C2"], root=root)["C2"]


def test_header_only_counts_file_says_no_spots(tmp_path):
    root = her2st_root(tmp_path)
    p = edit(root, "data/ST-cnts/C2.tsv.gz")
    header = pd.read_csv(p, sep="\t", index_col=0, nrows=0)
    header.to_csv(p, sep="\t", compression="gzip")
    with pytest.raises(DataError, match=r"C2.tsv.gz: no spots \(a header and no count rows\)"):
        load_c2(root)


def test_moved_spot_and_permuted_spot_ids_are_refused(tmp_path):
    root = her2st_root(tmp_path)
    good = load_c2(root)
    p = edit(root, "data/ST-spotfiles/C2_selection.tsv")
    spots = pd.read_csv(p, sep="\t")
    # a spot moved by 1.5 spot pitches, still on the image: silently changed the pixel size before
    moved = spots.copy()
    moved.loc[5, "pixel_x"] += 1.5 * 290
    moved.to_csv(p, sep="\t", index=False)
    from histomoe_core.data.her2st import grid_pixel_size, read_spots

    assert grid_pixel_size(read_spots(p), good.meta["coord_scale"]) != pytest.approx(good.pixel_size_um, rel=1e-4)
    with pytest.raises(DataError, match=r"C2_selection.tsv: 1 spot\(s\) lie off the array grid .* 1.50 pitch off"):
        load_c2(root)
    # permuted spot ids (x, y): the ids no longer name their array positions
    rng = np.random.default_rng(0)
    perm = spots.copy()
    idx = rng.permutation(len(perm))[:6]
    perm.loc[idx, ["x", "y"]] = perm.loc[np.roll(idx, 1), ["x", "y"]].to_numpy()
    perm.to_csv(p, sep="\t", index=False)
    with pytest.raises(DataError, match=r"spot id\(s\) x, y are not their array position"):
        load_c2(root)
    # permuted coordinates (ids and array positions kept): off the grid
    swap = spots.copy()
    swap.loc[idx, ["pixel_x", "pixel_y"]] = swap.loc[np.roll(idx, 1), ["pixel_x", "pixel_y"]].to_numpy()
    swap.to_csv(p, sep="\t", index=False)
    with pytest.raises(DataError, match="lie off the array grid"):
        load_c2(root)


def test_summary_of_an_image_that_is_not_an_image(tmp_path):
    from histomoe_core.data.manifests import load_manifest
    from histomoe_core.data.summary import summary_table

    root = her2st_root(tmp_path)
    img = root / load_manifest("her2st").extra["sections"]["C2"]["image"]
    img.unlink()
    img.write_text("not an image")
    from histomoe_core.data import SampleSet

    with pytest.raises(DataError, match=r"C2.*is corrupt or not an image .* fetch it again"):
        summary_table(SampleSet("her2st", [load_c2(root)]))


# ------------------------------------------------------------------------------------------------ embedding cache


def test_embedding_threads_are_fixed_and_part_of_the_key(tmp_path, monkeypatch):
    """`embed` (2 threads) and `benchmark` (1 thread per fit) once stored different values under one key."""
    import torch

    from histomoe_core.embed import run_embedding
    from test_embed import make_sample

    s = make_sample(tmp_path / "img", seed=1)
    monkeypatch.delenv("HISTOMOE_EMBED_THREADS", raising=False)
    old = torch.get_num_threads()
    got = {}
    try:
        for n in (1, 2):  # the caller's thread limit, as `benchmark --threads 1` and `embed` set it
            monkeypatch.setenv("HISTOMOE_CACHE_DIR", str(tmp_path / f"cache{n}"))
            torch.set_num_threads(n)
            emb, st = run_embedding([s], "tiny", device="cpu", progress=False)
            assert st.computed == ["S1"] and torch.get_num_threads() == n  # the caller's limit is restored
            got[n] = emb["S1"], st.key
    finally:
        torch.set_num_threads(old)
    assert got[1][1] == got[2][1]
    np.testing.assert_array_equal(got[1][0], got[2][0])
    keys = set()
    for n in ("1", "2"):  # the threads the encoder runs with decide the key
        monkeypatch.setenv("HISTOMOE_EMBED_THREADS", n)
        keys.add(run_embedding([s], "tiny", device="cpu", progress=False)[1].key)
    assert len(keys) == 2


def test_a_second_embed_on_one_cache_waits_and_reuses(tmp_path, monkeypatch):
    """While one run holds a sample's lock, a second waits; it then reads the first one's file, computing nothing."""
    from histomoe_core.embed import run_embedding
    from histomoe_core.embed_cache import embeddings_root, locked
    from test_embed import make_sample

    s = make_sample(tmp_path / "img", seed=2)
    monkeypatch.setenv("HISTOMOE_CACHE_DIR", str(tmp_path / "first"))
    ref, st = run_embedding([s], "tiny", device="cpu", progress=False)
    [(finished, rel)] = [(p, p.relative_to(embeddings_root())) for p in embeddings_root().rglob("S1-*.npz")]
    monkeypatch.setenv("HISTOMOE_CACHE_DIR", str(tmp_path / "shared"))
    from histomoe_core.embed_cache import CacheEntry

    entry = CacheEntry(s.sample_id, "", embeddings_root() / rel, embeddings_root() / rel.with_suffix(".part"))
    second: dict = {}
    with locked([entry]):  # "the first run", computing S1
        t = threading.Thread(target=lambda: second.update(zip(("emb", "stats"), run_embedding(
            [s], "tiny", device="cpu", progress=False))))
        t.start()
        time.sleep(2.0)
        assert t.is_alive()  # waiting for the lock, not computing
        shutil.copyfile(finished, entry.final)  # the first run finishes S1
    t.join(60)
    assert second["stats"].cached == ["S1"] and second["stats"].computed == [] and second["stats"].n_patches == 0
    np.testing.assert_array_equal(second["emb"]["S1"], ref["S1"])


# ------------------------------------------------------------------------------------------------ benchmark units

SYN = dict(n_organs=3, patients_per_organ=3, spots_per_section=30, n_genes=30, patch_px=16)


def test_corrupt_cached_units_are_recomputed_with_a_warning(tmp_path, monkeypatch):
    import histomoe_core.benchmark as bm
    from histomoe_core import paths
    from histomoe_core.cache import CorruptArtifactWarning

    monkeypatch.setenv("HISTOMOE_HOME", str(tmp_path / "home"))
    kw = dict(dataset_options=SYN, text_encoder="onehot", seeds=(0,), targets=("log1p",), n_genes=8,
              models={"ridge_cv": {"kind": "ridge_cv"}, "knn": {"kind": "knn"}}, progress=False)
    first = bm.run_benchmark("synthetic", **kw)
    units = sorted(p for p in (paths.cache_dir() / "benchmark_units").iterdir() if not p.name.startswith("."))
    assert len(units) == 6 and all((u / "SHA256SUMS").is_file() for u in units)
    pred = units[0] / "pred.npz"
    raw = bytearray(pred.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # flipped bytes: BadZipFile when the run folder was read
    pred.write_bytes(bytes(raw))
    metrics = units[1] / "metrics.json"
    metrics.write_text(metrics.read_text()[:10])  # truncated: JSONDecodeError with --force
    with pytest.warns(CorruptArtifactWarning, match="benchmark unit .* is corrupt") as caught:
        again = bm.run_benchmark("synthetic", force=True, **kw)
    assert len([w for w in caught if issubclass(w.category, CorruptArtifactWarning)]) == 2
    pd.testing.assert_frame_equal(again.results.drop(columns="fit_seconds"), first.results.drop(columns="fit_seconds"))
    for fold in again.config["folds"]:
        for model in ("ridge_cv", "knn"):
            assert again.predictions(model, fold["name"])["pred"].shape[1] == 8
    from histomoe_core.benchmark.results import _check_unit
    from histomoe_core.errors import HistoMoEError

    (units[2] / "per_gene.csv").write_text("changed after planning")
    with pytest.raises(HistoMoEError, match="per_gene.csv changed"):
        _check_unit(units[2])


# ------------------------------------------------------------------------------------------------ orphaned workers


def _children(pid: int) -> dict[int, str]:
    """Processes whose parent is ``pid``: {pid: command line}."""
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    out[int(d.name)] = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except (OSError, ValueError, IndexError):
                pass
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_benchmark_leaves_no_worker(sig, tmp_path_factory, tmp_path):
    home = tmp_path_factory.getbasetemp() / "orphans_home"  # shared: the second run reuses data and embeddings
    env = {**os.environ, "HISTOMOE_HOME": str(home), "PYTHONPATH": str(REPO)}
    seeds = ["0", "1", "2"] if sig == signal.SIGKILL else ["3", "4", "5"]  # nothing cached by the other run
    cmd = [sys.executable, "-m", "histomoe_core.cli", "benchmark", "synthetic", "--models", "mlp", "--targets",
           "log1p", "--text-encoder", "onehot", "--jobs", "2", "--no-progress", "--seeds", *seeds]
    log = tmp_path / "stderr.txt"  # a file, not a pipe: orphaned workers would hold a pipe open
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"), start_new_session=True)
    kids: dict[int, str] = {}
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            kids = _children(proc.pid)
            if sum("spawn_main" in c for c in kids.values()) >= 2:
                break
            time.sleep(0.2)
        assert sum("spawn_main" in c for c in kids.values()) >= 2, (kids, proc.poll())
        time.sleep(1.0)  # the workers are fitting
        kids = _children(proc.pid)
        os.kill(proc.pid, sig)
        rc = proc.wait(30)
        assert rc == (-sig if sig == signal.SIGKILL else 143), log.read_text()[-2000:]
        deadline = time.time() + 15
        while time.time() < deadline and any(_alive(p) for p in kids):
            time.sleep(0.2)
        assert not [c for p, c in kids.items() if _alive(p)]  # workers and the resource tracker
        if sig == signal.SIGTERM:
            assert "Traceback" not in log.read_text()
    finally:
        for p in [proc.pid, *kids]:
            if _alive(p):
                os.kill(p, signal.SIGKILL)


def _pid(_: int = 0) -> int:
    return os.getpid()


def test_kept_pool_is_reused_and_an_error_kills_it():
    from histomoe_core.workers import _KEPT, worker_pool

    with worker_pool(1, keep=True) as first:
        pid = first.submit(_pid).result()
    with worker_pool(1, keep=True) as again:  # the same workers, not started again
        assert again is first and again.submit(_pid).result() == pid
    with pytest.raises(RuntimeError, match="boom"):
        with worker_pool(1, keep=True) as pool:
            pool.submit(_pid).result()
            raise RuntimeError("boom")
    assert not _KEPT  # the failed pool is not kept ...
    deadline = time.time() + 10
    while time.time() < deadline and _alive(pid):
        time.sleep(0.1)
    assert not _alive(pid)  # ... and its worker is gone
    with worker_pool(1, keep=True) as fresh:
        assert fresh is not first and fresh.submit(_pid).result() != pid
    with worker_pool(1) as plain:  # without keep: a pool of its own, shut down on exit
        assert plain is not fresh
    assert list(_KEPT.values()) == [fresh]


def test_idle_kept_worker_ignores_sigint():
    """A Jupyter kernel's shutdown or a terminal's Ctrl-C reaches the whole process group: an idle kept worker
    must not die with a traceback from its queue read; the parent decides."""
    from histomoe_core.workers import close_kept_pools, worker_pool

    with worker_pool(1, keep=True) as pool:
        pid = pool.submit(_pid).result()
    os.kill(pid, signal.SIGINT)
    time.sleep(0.5)
    try:
        with worker_pool(1, keep=True) as again:
            assert again.submit(_pid).result(timeout=30) == pid and _alive(pid)
    finally:
        close_kept_pools()


def test_ctrl_c_exits_130_without_a_traceback(monkeypatch, capsys):
    from histomoe_core import cli

    def interrupted(args):
        raise KeyboardInterrupt

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    args = parser.parse_args(["data", "list"])
    monkeypatch.setattr(parser, "parse_args", lambda argv=None: args)
    monkeypatch.setattr(args, "func", interrupted)
    assert cli.main(["data", "list"]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "histomoe: interrupted"
