"""Embedding cache: keys, hits, corrupt files, resume after a kill, and 2-rank torchrun sharding."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from PIL import Image

from histomoe_core.data.patches import PatchSpec, iter_patches
from histomoe_core.data.sample import Sample, SampleSet
from histomoe_core.embed import embed_metadata, embed_samples, run_embedding, shard, slide_batches
from histomoe_core.embed_cache import CorruptCacheWarning, embeddings_root, encoder_key, sample_content_key
from histomoe_core.encoders import create_encoder

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ fixtures
def make_sample(folder: Path, sample_id: str = "S1", *, n: int = 30, seed: int = 0, shift: float = 0.0) -> Sample:
    """A 400 x 300 px noise image at 1 µm/px with ``n`` spots on a grid (two of them near the right edge)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    img = folder / f"{sample_id}.png"
    if not img.exists():
        Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(img)
    xs = np.linspace(60, 340, 10)
    ys = np.linspace(60, 240, max(1, n // 10))
    xy = np.array([(x, y) for y in ys for x in xs])[:n] + shift
    xy[:2, 0] = 395  # crops of these two leave the image
    adata = ad.AnnData(X=sp.csr_matrix(rng.poisson(2.0, (n, 5)).astype(np.float32)))
    adata.obs_names = [f"{sample_id}_{i}" for i in range(n)]
    adata.var_names = [f"g{i}" for i in range(5)]
    adata.obsm["spatial"] = xy
    return Sample(sample_id, "P1", adata, 1.0, image_path=img,
                  meta={"organ": "Kidney", "cancer_type": "ccRCC", "oncotree_code": "CCRCC", "technology": "Visium",
                        "dataset": "toy"})


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HISTOMOE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def toy(tmp_path) -> SampleSet:
    return SampleSet("toy", [make_sample(tmp_path / "data", "S1", seed=1), make_sample(tmp_path / "data", "S2", n=20, seed=2)])


def direct(sample: Sample, enc, spec=PatchSpec(), indices=None) -> np.ndarray:
    """Embeddings computed without the cache, straight from iter_patches."""
    out = np.full((sample.n_spots, enc.embed_dim), np.nan, np.float32)
    with torch.inference_mode():
        for idx, batch in iter_patches(sample, spec, batch_size=7, indices=indices):
            out[idx] = enc(enc.preprocess(batch)).numpy()
    return out


# ------------------------------------------------------------------------------------------------ patches
def _all(batches):
    out = [(i, p) for i, p in batches]
    return np.concatenate([i for i, _ in out]), np.concatenate([p for _, p in out])


@pytest.mark.parametrize("mode", ["pad", "drop"])
def test_slide_batches_are_the_data_layer_patches(toy, mode):
    spec = PatchSpec(out_of_image=mode)
    s = toy["S1"]
    i1, p1 = _all(slide_batches(s, spec, batch_size=8))
    i2, p2 = _all(iter_patches(s, spec, batch_size=8))
    assert np.array_equal(i1, i2) and np.array_equal(p1, p2)
    assert len(i1) == (30 if mode == "pad" else 28)


def test_slide_batches_match_on_her2st(her2st):
    for sid, idx in (("B4", np.arange(0, 283, 40)), ("A1", np.array([0, 5, 200]))):
        i1, p1 = _all(slide_batches(her2st[sid], indices=idx, batch_size=4))
        i2, p2 = _all(iter_patches(her2st[sid], indices=idx, batch_size=4))
        assert np.array_equal(i1, idx) and np.array_equal(i1, i2) and np.array_equal(p1, p2), sid


@pytest.mark.parametrize("route", [slide_batches, iter_patches])
def test_unresized_patches_are_the_cut_pixels_the_resize_makes_the_patches(her2st, route):
    """``resize=False`` (what the pipeline hands over on a CPU): cut size, and resized later they are the patches."""
    from histomoe_core.data.patches import resize_patches

    idx = np.array([0, 7, 300])
    _, want = _all(route(her2st["A1"], indices=idx, batch_size=2))
    _, cut = _all(route(her2st["A1"], indices=idx, batch_size=2, resize=False))
    assert cut.shape == (3, 35, 35, 3) and want.shape == (3, 224, 224, 3)
    assert np.array_equal(resize_patches(cut, 224), want)


# ------------------------------------------------------------------------------------------------ results
def serial(samples, enc, batch_size: int = 64) -> dict[str, np.ndarray]:
    """The loop the pipeline overlaps, run in one thread: crop a batch (batches run across slides), normalise it,
    embed it, next batch. It regroups with ``full_batches`` as the pipeline does; rows reaching the wrong spot are
    caught by ``test_embeddings_match_direct_computation_in_obs_order``, which embeds each sample on its own."""
    from histomoe_core.embed import embed_threads, fixed_threads
    from histomoe_core.embed_pipeline import full_batches

    samples = list(samples)
    enc = enc.eval().to(memory_format=torch.channels_last)
    out = {s.sample_id: np.full((s.n_spots, enc.embed_dim), np.nan, np.float32) for s in samples}

    def pieces():
        for j, s in enumerate(samples):
            for idx, batch in slide_batches(s, batch_size=batch_size):
                yield j, idx, batch
            yield j, None, None

    with torch.inference_mode(), fixed_threads(embed_threads(torch.device("cpu"))):
        for segments, parts in full_batches(pieces(), batch_size):
            z, start = (enc(enc.preprocess(np.concatenate(parts))).numpy() if parts is not None else None), 0
            for seg in segments:
                out[samples[seg.job].sample_id][seg.idx] = z[start : start + len(seg.idx)]
                start += len(seg.idx)
    return out


def _regrouped(sizes: list[int], piece: int, batch_size: int):
    """full_batches over jobs of ``sizes`` spots cut into pieces of ``piece``; a patch's channels 0 and 1 hold its
    job and spot, its value at channel 2 is 10 * job + spot."""
    from histomoe_core.embed_pipeline import full_batches

    def pieces():
        for j, n in enumerate(sizes):
            for start in range(0, n, piece):
                idx = np.arange(start, min(start + piece, n))
                yield j, idx, np.stack([np.full((2, 2, 3), (j, i, 10 * j + i), np.uint8) for i in idx])
            yield j, None, None

    return [(segs, None if parts is None else np.concatenate(parts)) for segs, parts in
            full_batches(pieces(), batch_size)]


def test_full_batches_keep_patches_of_different_sizes_apart():
    """Slides cut at different pixel sizes share a batch as separate parts, each of one size, in row order."""
    from histomoe_core.embed_pipeline import full_batches

    pieces = [(0, np.arange(3), np.zeros((3, 35, 35, 3), np.uint8)), (0, None, None),
              (1, np.arange(5), np.ones((5, 163, 163, 3), np.uint8)), (1, None, None)]
    (segs, parts), (_, parts2), (end, none) = full_batches(pieces, 4)
    assert [(g.job, len(g.idx), g.last) for g in segs] == [(0, 3, True), (1, 1, False)]
    assert [p.shape[:2] for p in parts] == [(3, 35), (1, 163)] and [p.shape[:2] for p in parts2] == [(4, 163)]
    assert [(g.job, len(g.idx), g.last) for g in end] == [(1, 0, True)] and none is None


def test_full_batches_run_across_jobs():
    got = _regrouped([5, 4, 0, 2], piece=3, batch_size=4)
    shown = [[(g.job, g.idx.tolist(), g.last) for g in segs] for segs, _ in got]
    assert shown == [
        [(0, [0, 1, 2, 3], False)],
        [(0, [4], True), (1, [0, 1, 2], False)],
        [(1, [3], True), (2, [], True), (3, [0, 1], True)],
    ]
    assert [None if p is None else p[:, 0, 0, 2].tolist() for _, p in got] == [
        [0, 1, 2, 3], [4, 10, 11, 12], [13, 30, 31]]


def test_full_batches_end_a_job_whose_patches_filled_a_batch_at_once():
    got = _regrouped([4, 3], piece=2, batch_size=4)
    assert [([(g.job, len(g.idx), g.last) for g in segs], p is None) for segs, p in got] == [
        ([(0, 4, False)], False), ([(0, 0, True)], True), ([(1, 3, True)], False)]


@pytest.mark.parametrize("seed", range(5))
def test_full_batches_keep_every_patch_in_order_in_full_batches(seed):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(0, 20, 6).tolist()
    batch_size = int(rng.integers(1, 9))
    got = _regrouped(sizes, piece=int(rng.integers(1, 7)), batch_size=batch_size)
    for segs, p in got:  # each batch's rows are its segments' spots, in order
        rows = [(g.job, i) for g in segs for i in g.idx]
        assert (p is None and rows == []) or p[:, 0, 0, :2].tolist() == [list(r) for r in rows]
        assert len({g.job for g in segs}) == len(segs)
    counts = [0 if p is None else len(p) for _, p in got]
    assert all(c == batch_size for c in [c for c in counts if c][:-1])  # only the final batch may be short
    assert max(counts, default=0) <= batch_size
    rows = [tuple(r) for _, p in got if p is not None for r in p[:, 0, 0, :2].tolist()]
    assert rows == [(j, i) for j, n in enumerate(sizes) for i in range(n)]
    for j, n in enumerate(sizes):
        mine = [g for segs, _ in got for g in segs if g.job == j]
        assert np.concatenate([g.idx for g in mine]).tolist() == list(range(n))
        assert [g.last for g in mine] == [False] * (len(mine) - 1) + [True]


@pytest.mark.parametrize("threads, in_producer", [("0", False), ("1", False), ("2", False), ("0", True), ("2", True)])
def test_overlapped_pipeline_gives_exactly_the_serial_embeddings(her2st, tmp_path, monkeypatch, threads, in_producer):
    """Helper threads or not; patches resized and normalised by the producer (as on a GPU) or the consumer."""
    import histomoe_core.embed_pipeline as ep

    samples = her2st.subset(["A1", "B4", "C3"])  # a PNG (35 px crops) and two JPEG slides (163 px)
    enc = create_encoder("tiny")
    monkeypatch.setattr(ep, "torch_in_producer", lambda device: in_producer)
    monkeypatch.setenv("HISTOMOE_PATCH_THREADS", threads)
    monkeypatch.setenv("HISTOMOE_CACHE_DIR", str(tmp_path / threads))
    got = embed_samples(samples, enc, batch_size=64, progress=False)  # A1's last patches share B4's first batch
    want = serial(samples, enc)
    assert all(np.array_equal(got[k], want[k]) for k in want)


def test_overlapped_pipeline_is_bit_identical_with_the_pretrained_encoder(toy, cache_home, monkeypatch):
    enc = create_encoder("efficientnet_lite0")  # oneDNN convolutions, whose sums depend on the thread count
    for threads in ("0", "1"):
        monkeypatch.setenv("HISTOMOE_PATCH_THREADS", threads)
        monkeypatch.setenv("HISTOMOE_CACHE_DIR", str(cache_home / threads))
        got = embed_samples(toy, enc, batch_size=8, progress=False)
        want = serial(toy, enc, batch_size=8)
        assert all(np.array_equal(got[k], want[k]) for k in want), threads


def test_patch_threads_default(monkeypatch):
    import histomoe_core.embed as em

    monkeypatch.delenv("HISTOMOE_PATCH_THREADS", raising=False)
    assert em.patch_threads(torch.device("cpu")) == 0 and em.patch_threads(torch.device("cuda")) >= 1
    monkeypatch.setenv("HISTOMOE_PATCH_THREADS", "3")
    assert em.patch_threads(torch.device("cpu")) == 3


def test_torch_work_runs_in_the_producer_only_on_a_gpu():
    from histomoe_core.embed_pipeline import torch_in_producer

    assert not torch_in_producer(torch.device("cpu")) and torch_in_producer(torch.device("cuda"))


def _pipeline_threads() -> list[str]:
    import threading

    return [t.name for t in threading.enumerate() if t.name.startswith("histomoe-") and t.is_alive()]


@pytest.mark.parametrize("threads", ["0", "2"])
def test_prefetcher_ends_its_threads_when_a_slide_fails(toy, cache_home, monkeypatch, threads):
    from histomoe_core.errors import DataError

    monkeypatch.setenv("HISTOMOE_PATCH_THREADS", threads)
    toy["S2"].image_path.write_bytes(b"not an image")
    with pytest.raises(DataError, match="corrupt or not an image"):
        embed_samples(toy, "tiny", batch_size=8, progress=False)
    assert _pipeline_threads() == []


@pytest.mark.parametrize("threads", ["0", "2"])
def test_prefetcher_ends_its_threads_when_the_encoder_fails(toy, cache_home, monkeypatch, threads):
    monkeypatch.setenv("HISTOMOE_PATCH_THREADS", threads)
    enc = create_encoder("tiny")
    calls = []

    def failing(x):
        calls.append(len(x))
        if len(calls) == 2:
            raise RuntimeError("encoder failed")
        return torch.zeros(len(x), enc.embed_dim)

    enc.forward = failing
    with pytest.raises(RuntimeError, match="encoder failed"):
        embed_samples(toy, enc, batch_size=4, progress=False)
    assert _pipeline_threads() == []


def test_prefetcher_stopped_early_joins_its_threads(toy):
    from histomoe_core.embed_pipeline import Job, Prefetcher

    jobs = [Job(s, None, np.arange(s.n_spots), np.arange(0), np.zeros((0, 16), np.float32)) for s in toy]
    with Prefetcher(jobs, create_encoder("tiny"), PatchSpec(), batch_size=2, threads=2, depth=1) as pf:
        segments, x = next(iter(pf))
        assert [(g.job, len(g.idx), g.last) for g in segments] == [(0, 2, False)] and x.shape == (2, 3, 224, 224)
    assert _pipeline_threads() == []


def test_embeddings_match_direct_computation_in_obs_order(toy, cache_home):
    enc = create_encoder("tiny")
    emb = embed_samples(toy, "tiny", batch_size=8, progress=False)
    assert list(emb) == ["S1", "S2"]
    for s in toy:
        assert emb[s.sample_id].shape == (s.n_spots, 16) and emb[s.sample_id].dtype == np.float32
        np.testing.assert_allclose(emb[s.sample_id], direct(s, enc), atol=1e-5)


def test_rerun_reads_cache(toy, cache_home):
    first, st1 = run_embedding(toy, "tiny", progress=False)
    second, st2 = run_embedding(toy, "tiny", progress=False)
    assert st1.computed == ["S1", "S2"] and st1.n_patches == 50
    assert st2.cached == ["S1", "S2"] and st2.n_patches == 0
    for k in first:
        assert np.array_equal(first[k], second[k])
    files = sorted(p.name for p in embeddings_root().rglob("*.npz"))
    assert len(files) == 2 and not list(embeddings_root().rglob("*.part"))
    with np.load(next(embeddings_root().rglob("S1-*.npz"))) as z:
        assert z["spot_ids"].tolist() == list(toy["S1"].adata.obs_names) and z["emb"].shape == (30, 16)


def test_warm_rerun_does_not_build_the_encoder_and_stale_cards_are_caught(toy, cache_home, monkeypatch):
    import histomoe_core.embed as E
    from histomoe_core.embed_cache import _card_path

    first = embed_samples(toy, "tiny", progress=False)
    built = []
    real = E.create_encoder
    monkeypatch.setattr(E, "create_encoder", lambda *a, **k: built.append(a) or real(*a, **k))
    again, st = run_embedding(toy, "tiny", progress=False)
    assert built == [] and st.cached == ["S1", "S2"]
    # a remembered identity that no longer matches the encoder is replaced once something must be computed
    card = _card_path("tiny")
    card.write_text(card.read_text().replace("tiny-seed0", "tiny-seedX"))
    fresh, st = run_embedding(toy, "tiny", progress=False)
    assert len(built) == 1 and st.cached == ["S1", "S2"] and "tiny-seed0" in card.read_text()
    for k in first:
        assert np.array_equal(first[k], fresh[k])


def test_dropped_spots_get_nan_rows(toy, cache_home):
    emb = embed_samples(toy.subset(["S1"]), "tiny", spec=PatchSpec(out_of_image="drop"), progress=False)["S1"]
    assert np.isnan(emb[:2]).all() and np.isfinite(emb[2:]).all()
    again = embed_samples(toy.subset(["S1"]), "tiny", spec=PatchSpec(out_of_image="drop"), progress=False)["S1"]
    assert np.array_equal(np.isnan(again), np.isnan(emb))


# ------------------------------------------------------------------------------------------------ keys
def test_cache_key_changes_with_what_decides_the_vectors(tmp_path, cache_home):
    s = make_sample(tmp_path / "a", seed=1)
    tiny, tiny1 = create_encoder("tiny"), create_encoder("tiny", seed=1)
    base_enc = encoder_key(tiny, PatchSpec(), "fp32")
    assert encoder_key(tiny, PatchSpec(), "fp32") == base_enc
    assert encoder_key(tiny1, PatchSpec(), "fp32") != base_enc  # other weights
    assert encoder_key(tiny, PatchSpec(size_um=56), "fp32") != base_enc  # other patch size
    assert encoder_key(tiny, PatchSpec(out_px=112), "fp32") != base_enc
    assert encoder_key(tiny, PatchSpec(), "bf16") != base_enc  # other precision

    base = sample_content_key(s)
    assert sample_content_key(make_sample(tmp_path / "a", seed=1)) == base
    assert sample_content_key(make_sample(tmp_path / "a", seed=1, shift=1.0)) != base  # moved spots
    moved = make_sample(tmp_path / "b", seed=1)  # same pixels and spots in another folder: same key
    assert sample_content_key(moved) == base
    other_pixels = make_sample(tmp_path / "c", seed=9)
    assert sample_content_key(other_pixels) != base
    s2 = make_sample(tmp_path / "a", seed=1)
    s2.pixel_size_um = 0.5
    assert sample_content_key(s2) != base
    s3 = make_sample(tmp_path / "a", seed=1)
    s3.adata.obs_names = [f"x{i}" for i in range(s3.n_spots)]
    assert sample_content_key(s3) != base


def test_changed_inputs_never_return_stale_vectors(tmp_path, cache_home):
    s = make_sample(tmp_path / "a", seed=1)
    old = embed_samples([s], "tiny", progress=False)["S1"]
    # rewrite the image in place with other pixels (same path, same spots)
    Image.fromarray(np.zeros((300, 400, 3), np.uint8)).save(s.image_path)
    os.utime(s.image_path, ns=(time.time_ns() + 10**9,) * 2)
    new, st = run_embedding([s], "tiny", progress=False)
    assert st.computed == ["S1"]
    assert not np.allclose(new["S1"], old)
    np.testing.assert_allclose(new["S1"], direct(s, create_encoder("tiny")), atol=1e-5)
    assert len(list(embeddings_root().rglob("S1-*.npz"))) == 2


# ------------------------------------------------------------------------------------------------ corruption
def test_truncated_cache_file_is_detected_and_recomputed(toy, cache_home):
    ref = embed_samples(toy, "tiny", progress=False)
    path = next(embeddings_root().rglob("S1-*.npz"))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.warns(CorruptCacheWarning, match="corrupt"):
        again, st = run_embedding(toy, "tiny", progress=False)
    assert st.computed == ["S1"] and st.cached == ["S2"]
    np.testing.assert_array_equal(again["S1"], ref["S1"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", CorruptCacheWarning)
        assert run_embedding(toy, "tiny", progress=False)[1].cached == ["S1", "S2"]


def test_garbage_and_foreign_files_are_recomputed(toy, cache_home):
    ref = embed_samples(toy, "tiny", progress=False)
    p1 = next(embeddings_root().rglob("S1-*.npz"))
    p2 = next(embeddings_root().rglob("S2-*.npz"))
    p1.write_bytes(b"not a zip file")
    shutil.copy(p2, p1)  # a valid file of another sample under S1's name: wrong key inside
    with pytest.warns(CorruptCacheWarning):
        again, st = run_embedding(toy, "tiny", progress=False)
    assert st.computed == ["S1"]
    np.testing.assert_array_equal(again["S1"], ref["S1"])


# ------------------------------------------------------------------------------------------------ resume
KILLED_RUN = """
import sys, time
from histomoe_core.data import load_dataset
from histomoe_core.embed import embed_samples
from histomoe_core.encoders import create_encoder
enc = create_encoder("tiny")
fast = enc.forward
def slow(x):
    time.sleep(0.4)
    return fast(x)
enc.forward = slow
embed_samples(load_dataset("her2st", sections=["A1"]), enc, batch_size=32, progress=False)
print("FINISHED")
"""


def test_resume_after_kill_recomputes_only_missing_spots(her2st, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    env = os.environ | {"HISTOMOE_CACHE_DIR": str(cache), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    chunks: list[Path] = []
    while time.time() < deadline and proc.poll() is None:
        chunks = list(cache.rglob("chunk-*.npz"))
        if len(chunks) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_spots = her2st["A1"].n_spots
    done = sum(len(np.load(c)["idx"]) for c in cache.rglob("chunk-*.npz"))
    assert 0 < done < n_spots and not list(cache.rglob("A1-*.npz"))
    # a chunk being written at the kill stays a hidden temp file; a truncated chunk is recomputed too
    last = sorted(cache.rglob("chunk-*.npz"))[-1]
    lost = len(np.load(last)["idx"])
    last.write_bytes(last.read_bytes()[:100])

    monkeypatch.setenv("HISTOMOE_CACHE_DIR", str(cache))
    section = her2st.subset(["A1"])
    with pytest.warns(CorruptCacheWarning):
        emb, st = run_embedding(section, "tiny", batch_size=32, progress=False)
    assert st.resumed == ["A1"] and st.n_patches == n_spots - done + lost
    assert not list(cache.rglob("*.part"))
    monkeypatch.setenv("HISTOMOE_CACHE_DIR", str(tmp_path / "fresh"))
    fresh = embed_samples(section, "tiny", batch_size=32, progress=False)
    np.testing.assert_allclose(emb["A1"], fresh["A1"], atol=1e-6)


# ------------------------------------------------------------------------------------------------ sharding
def test_shard_is_disjoint_complete_and_balanced(toy):
    class J:  # stands in for a planned job: a sample and its missing spots
        def __init__(self, sid, n):
            self.sample = type("S", (), {"sample_id": sid})()
            self.missing = np.arange(n)

    jobs = [J(f"s{i}", n) for i, n in enumerate([300, 180, 190, 50, 40, 350])]
    parts = [shard(jobs, r, 2) for r in range(2)]
    ids = [[j.sample.sample_id for j in p] for p in parts]
    assert sorted(ids[0] + ids[1]) == sorted(j.sample.sample_id for j in jobs) and not set(ids[0]) & set(ids[1])
    loads = [sum(len(j.missing) for j in p) for p in parts]
    assert abs(loads[0] - loads[1]) <= 50


def test_torchrun_two_ranks_equal_single_process(her2st, tmp_path):
    sections = ["A1", "A2"]
    common = ["embed", "her2st", "--encoder", "tiny", "--sections", *sections, "--no-progress"]
    base_env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    multi, single = tmp_path / "multi", tmp_path / "single"
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "histomoe_core.cli", *common],
        env=base_env | {"HISTOMOE_CACHE_DIR": str(multi)}, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "(2 ranks)" in run.stdout
    run1 = subprocess.run([sys.executable, "-m", "histomoe_core.cli", *common],
                          env=base_env | {"HISTOMOE_CACHE_DIR": str(single)}, capture_output=True, text=True, timeout=180)
    assert run1.returncode == 0, run1.stderr[-3000:]
    files_m = sorted(p.relative_to(multi) for p in multi.rglob("*.npz"))
    files_s = sorted(p.relative_to(single) for p in single.rglob("*.npz"))
    assert files_m == files_s and len(files_m) == 2
    for rel in files_m:
        with np.load(multi / rel) as a, np.load(single / rel) as b:
            assert a["spot_ids"].tolist() == b["spot_ids"].tolist()
            assert str(a["key"]) == str(b["key"])
            np.testing.assert_allclose(a["emb"], b["emb"], atol=1e-6)


# ------------------------------------------------------------------------------------------------ metadata
def test_embed_metadata(toy):
    meta = embed_metadata(toy)
    assert set(meta) == {"S1", "S2"} and meta["S1"].shape == (384,)
    np.testing.assert_allclose(meta["S1"], meta["S2"], atol=1e-6)  # same organ / cancer type
    onehot = embed_metadata(toy, "onehot", fields=("organ",))
    assert onehot["S1"].tolist() == [1.0]


# ------------------------------------------------------------------------------------------------ embed_eval
def test_reference_vs_others_known_answer():
    import pandas as pd

    from histomoe_core.embed_eval import comparison_summary, reference_vs_others

    r = pd.DataFrame({
        "encoder": ["pre"] * 3 + ["rand_a"] * 3 + ["rand_b"] * 3,
        "pretrained": [True] * 3 + [False] * 6,
        "target": ["log1p"] * 9,
        "fold": ["A", "B", "C"] * 3,
        "pearson": [0.3, 0.1, 0.2, 0.25, 0.15, 0.05, 0.0, 0.0, 0.54],
    })
    v = reference_vs_others(r, "pre").loc["log1p"]
    assert v["best_other"] == "rand_b" and v["other_mean"] == pytest.approx(0.18)
    assert v["gap"] == pytest.approx(0.02) and v["sd_over_patients"] == pytest.approx(np.std([0.3, 0.1, 0.2]))  # ddof 0
    assert v["gap_vs_spread"] == "smaller" and v["reference_wins"] == 1 and v["patients"] == 3
    s = comparison_summary(r)
    assert s.loc[("log1p", "rand_a"), "mean"] == pytest.approx(0.15) and s.loc[("log1p", "pre"), "folds"] == 3


def test_section_mixing_and_marker(toy):
    import anndata as ad
    import pandas as pd

    from histomoe_core.embed_eval import pick_marker, section_mixing

    # two well separated blobs, one per section: every neighbour is from the spot's own section
    x = np.concatenate([np.zeros((20, 3)), np.full((10, 3), 100.0)]) + np.random.default_rng(0).normal(size=(30, 3))
    a = ad.AnnData(X=x.astype(np.float32), obs=pd.DataFrame({"section": ["a"] * 20 + ["b"] * 10}, index=map(str, range(30))))
    a.obsm["X_emb"] = a.X
    m = section_mixing(a, n_neighbors=5)
    assert m["same_neighbours"].tolist() == [1.0, 1.0]
    assert m["chance"].round(3).tolist() == [round(20 / 30, 3), round(10 / 30, 3)]
    assert pick_marker(toy, "g3") == "g3"
    assert pick_marker(toy, "NOT_A_GENE") in {f"g{i}" for i in range(5)}
