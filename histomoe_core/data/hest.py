"""HEST-1k adapter (Jaume et al., NeurIPS 2024 D&B): fetch samples, read them as :class:`Sample`, HEST-Bench tasks.

A downloaded HEST sample ``<id>`` lives in HEST's own layout, which this module reads as is::

    st/<id>.h5ad          AnnData, spots x genes raw counts, spot pixel coords (x, y) in obsm["spatial"]
    patches/<id>.h5       img (N x 224 x 224 x 3 uint8, 112 µm at 0.5 µm/px), barcode (N x 1), coords (N x 2)
    metadata/<id>.json    pixel_size_um_estimated, organ, oncotree_code, patient, st_technology, ...
    wsis/<id>.tif         the whole-slide image (optional here: the patches suffice for HEST-Bench)
    HEST_v1_1_0.csv       one row per sample (the sample table HEST subsets are chosen from)

Where files come from (:func:`fetch_hest`): every mirror ``<mirror>/hest1k/`` (``HISTOMOE_MIRRORS``), then the
cache ``<data_dir>/hest1k/``, then ``huggingface_hub.snapshot_download`` of the gated dataset ``MahmoodLab/hest``
at the manifest's revision (the hub checks each file against its own etag / sha256). The first successful fetch
records ``sha256  path`` lines in ``<data_dir>/hest1k/SHA256SUMS``; later fetches check files against it.

HEST-Bench tasks (sample ids, patient folds, HEST's 50-gene list) are data in ``data_manifests/hest1k.yaml``;
:func:`hest_task` returns them. HEST chose each gene list on all samples of a task, test folds included: use
:func:`~histomoe_core.data.genes.select_panel` on the training fold for leak-free numbers.

Pan-cancer HEST-Bench: ``load_dataset("hest_pan", tasks=[...])`` (:func:`load_hest_pan`) reads several tasks at
once, each section's task in ``meta["hest_task"]``; :func:`hest_pan_folds` combines HEST's per-task splits.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Literal, Sequence

import anndata as ad
import numpy as np
import scipy.sparse as sp

from histomoe_core import paths
# HEST-Bench's tasks and the pan-cancer collection live in hest_bench; re-exported here, where callers look
from histomoe_core.data.hest_bench import (BENCH_TASKS, MANIFEST, TASK_KEY, _fold_groups, _natural, _task,  # noqa: F401
                                           hest_pan_folds, hest_task, load_hest_pan, pan_tasks,  # noqa: F401
                                           read_hest_bench, shipped_genes, task_names)  # noqa: F401
from histomoe_core.data.manifests import Manifest, load_manifest
from histomoe_core.data.sample import GRID_TOLERANCE, Sample, SampleSet, grid_offsets, validate_counts
from histomoe_core.data.sources import SOURCES
from histomoe_core.errors import DataError, FetchError

#: per-sample files every HEST sample must have, and the optional slide image
SAMPLE_FILES = ("st/{id}.h5ad", "patches/{id}.h5", "metadata/{id}.json")
WSI_FILE = "wsis/{id}.tif"
SUMS = "SHA256SUMS"
#: HEST patches: 224 px at 0.5 µm/px
PATCH_SIZE_UM = 112.0

#: OncoTree codes of the HEST-Bench tasks (and the synthetic organs) -> cancer type written in metadata text
ONCOTREE = {
    "IDC": "invasive ductal carcinoma",
    "ILC": "invasive lobular carcinoma",
    "PRAD": "prostate adenocarcinoma",
    "PAAD": "pancreatic adenocarcinoma",
    "SKCM": "cutaneous melanoma",
    "COAD": "colon adenocarcinoma",
    "READ": "rectal adenocarcinoma",
    "CCRCC": "clear cell renal cell carcinoma",
    "LUAD": "lung adenocarcinoma",
    "LUSC": "lung squamous cell carcinoma",
    "HCC": "hepatocellular carcinoma",
    "CSCC": "cutaneous squamous cell carcinoma",
    "GBM": "glioblastoma",
    "OV": "ovarian cancer",
}


# --- HEST-Bench tasks ---------------------------------------------------------------------------------------


def hest_roots() -> list[Path]:
    """Where a HEST sample is looked for, in order: every ``<mirror>/hest1k``, then ``<data_dir>/hest1k``."""
    return [m / MANIFEST for m in paths.mirrors()] + [paths.data_dir() / MANIFEST]


def sample_files(sample_id: str, *, wsi: bool = False) -> list[str]:
    files = [f.format(id=sample_id) for f in SAMPLE_FILES]
    return files + ([WSI_FILE.format(id=sample_id)] if wsi else [])


def _missing(root: Path, ids: Sequence[str], wsi: bool) -> list[str]:
    return [f for i in ids for f in sample_files(i, wsi=wsi) if not (root / f).is_file()]


def _offline() -> bool:
    from histomoe_core.data.fetch import offline

    return offline()


def fetch_hest(
    manifest: Manifest | None = None, sample_ids: Sequence[str] | None = None, *, include_wsi: bool = False
) -> Path:
    """Make HEST samples available in one folder of HEST's layout and return it.

    ``sample_ids`` defaults to every sample of the manifest's HEST-Bench tasks. A mirror or the cache that
    already holds every file is returned as is; otherwise files are copied from mirrors or downloaded from
    the Hugging Face hub into ``<data_dir>/hest1k``. Offline (``HISTOMOE_OFFLINE`` / ``HF_HUB_OFFLINE``) a
    missing file raises :class:`FetchError` at once, naming the files and how to supply them.
    """
    manifest = manifest or load_manifest(MANIFEST)
    ids = list(dict.fromkeys(sample_ids if sample_ids is not None else
                             [s for t in manifest.extra.get("tasks", {}).values() for s in t["samples"]]))
    if not ids:
        raise DataError("fetch_hest needs at least one sample id")
    for root in hest_roots():
        if root.is_dir() and not _missing(root, ids, include_wsi):
            verify_sums(root, [f for i in ids for f in sample_files(i, wsi=include_wsi)])
            return root
    dest = paths.data_dir() / MANIFEST
    held = {i: next((r for r in hest_roots() if not _missing(r, [i], include_wsi)), None) for i in ids}
    todo = [i for i in ids if held[i] is None]
    if todo and _offline():
        raise FetchError(_offline_message(manifest, todo, include_wsi))
    _copy_into(dest, {i: r for i, r in held.items() if r is not None and r != dest}, include_wsi)
    if todo:
        _download(manifest, todo, dest, include_wsi)
        still = _missing(dest, todo, include_wsi)
        if still:
            raise FetchError(
                f"{manifest.source['repo_id']}@{manifest.source.get('revision', 'main')} has no {still[:6]}; "
                f"check the sample ids against {manifest.extra.get('metadata_csv', 'the HEST metadata table')}"
            )
    verify_sums(dest, [f for i in ids for f in sample_files(i, wsi=include_wsi)])
    return dest


def _copy_into(dest: Path, held: dict[str, Path], wsi: bool) -> None:
    """Copy samples held in mirrors into ``dest`` so that one folder holds every requested sample."""
    from histomoe_core.data.fetch import atomic_copy

    for i, root in held.items():
        verify_sums(root, sample_files(i, wsi=wsi))
        for f in sample_files(i, wsi=wsi):
            if not (dest / f).is_file():
                atomic_copy(root / f, dest / f)


def _offline_message(manifest: Manifest, ids: Sequence[str], wsi: bool) -> str:
    files = _missing(paths.data_dir() / MANIFEST, ids, wsi)
    shown = ", ".join(files[:9]) + (f", ... ({len(files)} files)" if len(files) > 9 else "")
    where = "; ".join(str(r) for r in hest_roots())
    repo = manifest.source["repo_id"]
    return (
        f"HEST-1k sample(s) {_short(ids)} not found locally (missing {shown}).\n"
        f"Looked in: {where}. HISTOMOE_OFFLINE/HF_HUB_OFFLINE is set, so nothing was downloaded.\n"
        f"Fix: copy the files in HEST's layout (st/, patches/, metadata/) under <mirror>/{MANIFEST}/ and list the mirror "
        f"in HISTOMOE_MIRRORS; or go online, accept the dataset terms at https://huggingface.co/datasets/{repo}, "
        f"log in (`huggingface-cli login` or HF_TOKEN), unset HISTOMOE_OFFLINE and HF_HUB_OFFLINE, and run again."
    )


def _short(ids: Sequence[str], n: int = 12) -> str:
    return ", ".join(ids[:n]) + (f", ... ({len(ids)} samples)" if len(ids) > n else "")


def _download(manifest: Manifest, ids: Sequence[str], dest: Path, wsi: bool) -> None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    src = manifest.source
    patterns = [f for i in ids for f in sample_files(i, wsi=wsi)]
    if manifest.extra.get("metadata_csv"):
        patterns.append(manifest.extra["metadata_csv"])
    dest.mkdir(parents=True, exist_ok=True)
    try:
        snapshot_download(
            src["repo_id"], repo_type=src.get("repo_type", "dataset"), revision=str(src.get("revision", "main")),
            allow_patterns=patterns, local_dir=dest,
        )
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as exc:
        raise FetchError(
            f"download of HEST-1k sample(s) {_short(ids)} from {src['repo_id']} failed ({type(exc).__name__}: {exc}).\n"
            f"The dataset is gated: accept its terms at https://huggingface.co/datasets/{src['repo_id']} and log in "
            f"(`huggingface-cli login` or HF_TOKEN); or supply the files through a mirror (<mirror>/{MANIFEST}/)."
        ) from exc


# --- SHA256SUMS: recorded on the first successful fetch, checked afterwards ---------------------------------------


def _read_sums(root: Path) -> dict[str, str]:
    p = root / SUMS
    if not p.is_file():
        return {}
    out = {}
    for line in p.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            digest, rel = line.split(maxsplit=1)
            out[rel.strip().lstrip("*")] = digest
    return out


def verify_sums(root: Path, files: Sequence[str], *, record: bool | None = None) -> None:
    """Check ``files`` against ``root/SHA256SUMS``; record the ones not listed yet when ``record``
    (default: only in the data cache ``<data_dir>/hest1k``; mirrors are checked, never written).

    A file whose size and mtime match the last check is not hashed again (``.SHA256SUMS.stat.json``).
    """
    from histomoe_core.data.fetch import sha256sum

    if record is None:
        record = Path(root).resolve() == (paths.data_dir() / MANIFEST).resolve()
    sums = _read_sums(root)
    if not sums and not record:
        return
    stat_path = root / f".{SUMS}.stat.json"
    try:
        seen = json.loads(stat_path.read_text()) if stat_path.is_file() else {}
    except (OSError, ValueError):
        seen = {}
    new: dict[str, str] = {}
    for rel in files:
        p = root / rel
        st = p.stat()
        stamp = [st.st_size, st.st_mtime_ns]
        if rel in sums and seen.get(rel) == stamp:
            continue
        digest = sha256sum(p)
        if rel in sums and sums[rel] != digest:
            raise FetchError(
                f"{p}: sha256 {digest} differs from {root / SUMS} ({sums[rel]}); the file changed or is corrupt. "
                "Delete it and fetch again."
            )
        if rel not in sums:
            new[rel] = digest
        seen[rel] = stamp
    if not record or not os.access(root, os.W_OK):
        return
    if new:
        with open(root / SUMS, "a") as f:
            f.writelines(f"{d}  {r}\n" for r, d in sorted(new.items()))
    try:
        stat_path.write_text(json.dumps(seen))
    except OSError:
        pass


def verify_hest(sample_ids: Sequence[str] | None = None) -> list[tuple[str, str]]:
    """``(file, status)`` of every file of ``sample_ids`` (default: every HEST-Bench task sample) where it is
    found first: ``ok`` (matches SHA256SUMS), ``present`` (no recorded sha256), ``missing`` or ``sha256 mismatch``."""
    from histomoe_core.data.fetch import sha256sum

    manifest = load_manifest(MANIFEST)
    ids = list(dict.fromkeys(sample_ids if sample_ids is not None else
                             [s for t in manifest.extra.get("tasks", {}).values() for s in t["samples"]]))
    rows = []
    for rel in [f for i in ids for f in sample_files(i)]:
        root = next((r for r in hest_roots() if (r / rel).is_file()), None)
        if root is None:
            rows.append((rel, "missing"))
            continue
        want = _read_sums(root).get(rel)
        status = "present" if want is None else "ok" if sha256sum(root / rel) == want else f"sha256 mismatch ({root / rel})"
        rows.append((rel, status))
    return rows


# --- reading one sample ---------------------------------------------------------------------------------------


def read_metadata(path: Path) -> dict:
    try:
        meta = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read the sample metadata ({exc}); fetch it again") from exc
    if not isinstance(meta, dict):
        raise DataError(f"{path}: expected a JSON object of sample metadata")
    return meta


def read_st(path: Path) -> ad.AnnData:
    """Spots x genes raw counts (csr float32) with coordinates, from ``st/<id>.h5ad``."""
    try:
        adata = ad.read_h5ad(path)
    except Exception as exc:  # anndata raises many types on malformed files (shape mismatches included)
        raise DataError(f"{path}: cannot read the expression file ({type(exc).__name__}: {exc})") from exc
    if "spatial" not in adata.obsm:
        raise DataError(f"{path}: no spot coordinates (obsm['spatial'] is missing)")
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    if xy.ndim != 2 or xy.shape[0] != adata.n_obs or xy.shape[1] < 2:
        raise DataError(f"{path}: obsm['spatial'] has shape {xy.shape} for {adata.n_obs} spots; counts and coordinates do not match")
    adata.obsm["spatial"] = xy[:, :2]
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    adata.obs_names = adata.obs_names.astype(str)
    if adata.var_names.has_duplicates:
        adata.var_names_make_unique()
    return adata


def read_patch_index(path: Path) -> tuple[list[str], tuple[int, ...]]:
    """Barcodes of a HEST patch file and the shape of its ``img`` dataset, checked for consistency."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("img", "barcode") if k not in f]
            if missing:
                raise DataError(f"{path}: patch file lacks dataset(s) {missing}; expected img, barcode, coords")
            raw = np.asarray(f["barcode"]).ravel()
            shape = tuple(f["img"].shape)
            n_coords = f["coords"].shape[0] if "coords" in f else len(raw)
    except OSError as exc:
        raise DataError(f"{path}: cannot read the patch file ({exc}); fetch it again") from exc
    barcodes = [b.decode() if isinstance(b, bytes) else str(b) for b in raw]
    if len(shape) != 4 or shape[3] != 3 or shape[0] != len(barcodes) or n_coords != len(barcodes):
        raise DataError(
            f"{path}: img {shape}, {len(barcodes)} barcodes and {n_coords} coords do not agree; "
            "expected img N x H x W x 3 with one barcode and one coordinate row per patch"
        )
    if len(set(barcodes)) != len(barcodes):
        raise DataError(f"{path}: duplicate barcodes in the patch file")
    return barcodes, shape


def _study(meta: dict) -> str | None:
    """The study a sample belongs to: HEST's ``dataset_title``, else its ``study_link``; None without either."""
    for k in ("dataset_title", "study_link"):
        v = meta.get(k)
        if v is not None and str(v).strip() and str(v).lower() not in ("nan", "none"):
            return str(v).strip()
    return None


def _patient(sample_id: str, meta: dict, groups: dict[str, str]) -> tuple[str, str]:
    """Patient id and where it came from. HEST's patient labels ("patient 2") recur across studies, so a
    metadata patient is qualified by its study: ``"<study> - <patient>"`` (as is where no study is recorded)."""
    p = meta.get("patient")
    if p is not None and str(p).strip() and str(p).lower() not in ("nan", "none"):
        study = _study(meta)
        if study is None:
            return str(p).strip(), "metadata (no study recorded)"
        return f"{study} - {str(p).strip()}", "metadata (study + patient)"
    if sample_id in groups:
        return groups[sample_id], "HEST-Bench fold"
    return sample_id, "sample id (no patient in metadata)"


def _off_grid(adata: ad.AnnData, sample_id: str) -> int:
    """Spots whose pixel position is off the array grid (``array_row`` / ``array_col`` in obs: moved spots or
    permuted ids), flagged with a warning; 0 where there is no grid."""
    if not {"array_row", "array_col"} <= set(adata.obs.columns):
        return 0
    off = grid_offsets(adata.obs[["array_col", "array_row"]].to_numpy(float), adata.obsm["spatial"])
    bad = adata.obs_names[off > GRID_TOLERANCE]
    if len(bad):
        warnings.warn(f"{sample_id}: {len(bad)} spots lie off the array grid (obsm['spatial'] more than "
                      f"{GRID_TOLERANCE:g} spot pitch from where array_row / array_col put them, e.g. {list(bad[:3])}); "
                      "their pixel positions were moved or their ids permuted (meta['n_off_grid'])", stacklevel=4)
    return len(bad)


def load_sample(
    root: Path, sample_id: str, *, unpatched: Literal["drop", "error"] = "drop", groups: dict[str, str] | None = None
) -> Sample:
    """One HEST sample from ``root`` (HEST layout). Spots without a patch are dropped (as HEST-Bench does) or refused."""
    root = Path(root)
    st_path, patch_path, meta_path = (root / f for f in sample_files(sample_id))
    for p in (st_path, patch_path, meta_path):
        if not p.is_file():
            raise DataError(f"{p} does not exist; HEST sample {sample_id!r} is incomplete in {root}")
    info = read_metadata(meta_path)
    adata = read_st(st_path)
    if adata.n_obs == 0:
        raise DataError(f"{st_path}: no spots (0 rows); the sample is empty - fetch it again or leave {sample_id} out")
    validate_counts(adata, where=str(st_path))
    barcodes, shape = read_patch_index(patch_path)
    spots = set(adata.obs_names)
    foreign = [b for b in barcodes if b not in spots]
    if foreign:
        raise DataError(
            f"{patch_path}: {len(foreign)} of {len(barcodes)} patch barcodes are not spots of {st_path.name} "
            f"(e.g. {foreign[:3]}); the patch file does not belong to this expression file"
        )
    patched = set(barcodes)
    lacking = [s for s in adata.obs_names if s not in patched]
    if lacking and unpatched == "error":
        raise DataError(
            f"{patch_path}: {len(lacking)} spots of {st_path.name} have no patch (e.g. {lacking[:3]}); "
            "use unpatched='drop' to keep only spots with a patch"
        )
    if lacking:
        warnings.warn(f"{sample_id}: dropping {len(lacking)} spots without a patch in {patch_path.name}", stacklevel=3)
        adata = adata[adata.obs_names.isin(patched)].copy()
    if adata.n_obs == 0:
        raise DataError(f"{patch_path}: no patches, so sample {sample_id} has no spots left; fetch it again or leave it out")
    n_off_grid = _off_grid(adata, sample_id)
    px = info.get("pixel_size_um_estimated", info.get("pixel_size_um_embedded"))
    try:
        px = float(px)
    except (TypeError, ValueError):
        raise DataError(f"{meta_path}: no usable pixel_size_um_estimated ({px!r})") from None
    patient, patient_source = _patient(sample_id, info, groups or {})
    code = info.get("oncotree_code")
    code = None if code is None or str(code).lower() in ("nan", "none", "") else str(code)
    extras = {k: v for k, v in info.items() if isinstance(v, (str, int, float, bool)) or v is None}
    meta = extras | {
        "organ": info.get("organ"),
        "oncotree_code": code,
        "cancer_type": info.get("cancer_type") or ONCOTREE.get(code or "", code or info.get("disease_state")),
        "technology": info.get("st_technology"),
        "dataset": info.get("dataset", "hest1k"),
        "patch_size_um": float(info.get("patch_size_um", PATCH_SIZE_UM)),
        "patch_px": int(shape[1]),
        "patient_source": patient_source,
        "study": _study(info),
        "n_unpatched_dropped": len(lacking),
        "n_off_grid": n_off_grid,
    }
    wsi = root / WSI_FILE.format(id=sample_id)
    return Sample(
        sample_id=sample_id, patient=patient, adata=adata, pixel_size_um=px,
        image_path=wsi if wsi.is_file() else None, patches_path=patch_path, meta=meta,
    )


@SOURCES.register("hest")
def load_hest(
    *,
    sample_ids: Sequence[str] | None = None,
    task: str | None = None,
    root: Path | None = None,
    unpatched: Literal["drop", "error"] = "drop",
    include_wsi: bool = False,
    progress: bool = False,
) -> SampleSet:
    """HEST-1k samples as a :class:`SampleSet`: ``task="IDC"`` (a HEST-Bench task) or explicit ``sample_ids``.

    Without ``root`` the samples are located or fetched by :func:`fetch_hest`; with ``root`` (a folder in
    HEST's layout) every sample there is read when neither ``task`` nor ``sample_ids`` is given.
    """
    from tqdm.auto import tqdm

    manifest = load_manifest(MANIFEST)
    if task is not None:
        name, t = _task(task, manifest)
        ids = list(t["samples"]) if sample_ids is None else list(sample_ids)
        outside = sorted(set(ids) - set(t["samples"]))
        if outside:
            raise DataError(f"samples {outside} are not part of HEST-Bench task {name}; its samples: {', '.join(t['samples'])}")
    elif sample_ids is not None:
        ids = list(sample_ids)
    elif root is not None:
        ids = sorted((p.stem for p in (Path(root) / "st").glob("*.h5ad")), key=_natural)
        if not ids:
            raise DataError(f"{root}: no st/<id>.h5ad files; is this a folder in HEST's layout?")
    else:
        raise DataError(f"hest needs a task or sample ids: --task (one of {', '.join(manifest.extra['tasks'])}) or "
                        "--samples ID ... on the command line, task= or sample_ids= in Python")
    root = Path(root) if root is not None else fetch_hest(manifest, ids, include_wsi=include_wsi)
    groups = _fold_groups(manifest)
    samples = [
        load_sample(root, i, unpatched=unpatched, groups=groups)
        for i in tqdm(ids, desc="load hest", disable=not progress, unit="sample")
    ]
    return SampleSet("hest1k", samples)


# --- pan-cancer HEST-Bench: several tasks in one benchmark ------------------------------------------------------
