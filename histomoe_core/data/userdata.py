"""Your own data: register a dataset from Space Ranger folders or an AnnData, then load it by name.

A registered dataset is a small YAML file, ``$HISTOMOE_HOME/datasets/<name>.yaml``, naming each section's
files with their sha256 (and, for an AnnData, a copy written beside it as ``<name>/<section>.h5ad``). It is
validated when registered, exactly as the built-in datasets are loaded (counts, coordinates, image, species),
and re-verified on every load, so ``embed``, ``benchmark`` and the book's ``dataset`` parameter can use it::

    from histomoe_core.data import userdata
    userdata.register_spaceranger("mykidney", ["runs/A1/outs"], species="human", organ="Kidney")
    userdata.register_anndata("mycolon", adata, image="he.png", um_per_px=0.5, species="mouse", organ="Colon")
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Sequence

import anndata as ad
import numpy as np
import scipy.sparse as sp
import yaml

from histomoe_core import paths
from histomoe_core.cache import atomic_dir, file_sha256
from histomoe_core.data.patches import check_centres, image_size
from histomoe_core.data.sample import Sample, SampleSet, tag_species
from histomoe_core.data.spaceranger import read_spaceranger
from histomoe_core.errors import DataError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
#: context fields a user may give (see :data:`histomoe_core.data.sample.CONTEXT_KEYS`)
CONTEXT = ("organ", "tissue", "disease_state", "cancer_type", "preservation", "technology")


def registry_dir() -> Path:
    return paths.home() / "datasets"


def registered() -> list[str]:
    d = registry_dir()
    return sorted(p.stem for p in d.glob("*.yaml")) if d.is_dir() else []


def _check_name(name: str) -> None:
    from histomoe_core.data.sources import SOURCES

    if not NAME_RE.match(name):
        raise DataError(f"dataset name {name!r}: use letters, digits, '_', '-' or '.' (starting with a letter or digit)")
    if name in SOURCES:
        raise DataError(f"dataset name {name!r} is a built-in dataset; choose another name")


def _write_entry(name: str, entry: dict) -> Path:
    """Write the registry YAML atomically (a temporary file renamed into place)."""
    out = registry_dir() / f"{name}.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump(entry, f, sort_keys=False)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _files(*paths_: Path) -> dict[str, str]:
    return {str(Path(p).resolve()): file_sha256(Path(p)) for p in paths_}


def _context(species: str, context: dict) -> dict:
    unknown = sorted(set(context) - set(CONTEXT))
    if unknown:
        raise DataError(f"unknown metadata {unknown}; known: {', '.join(CONTEXT)}")
    return {"species": species, **{k: v for k, v in context.items() if v is not None}}


def register_spaceranger(
    name: str, folders: Sequence[str | Path], *, species: str, patients: Sequence[str] | None = None,
    um_per_px: float | None = None, image: str | Sequence[str] = "hires", **context,
) -> SampleSet:
    """Register Space Ranger ``outs/`` folders (one section each) as dataset ``name``; returns it loaded.

    ``image``: ``"hires"`` (default), ``"lowres"``, or one full-resolution image path per folder."""
    _check_name(name)
    meta = _context(species, context)
    images = [image] * len(folders) if isinstance(image, str) and image in ("hires", "lowres") else list(image)
    if len(images) != len(folders) or (patients and len(patients) != len(folders)):
        raise DataError(f"give one full-resolution image and one patient per Space Ranger folder ({len(folders)} folders)")
    sections, samples = {}, []
    for i, folder in enumerate(folders):
        folder = Path(folder).resolve()
        patient = patients[i] if patients else None
        img = images[i] if images[i] in ("hires", "lowres") else str(Path(images[i]).resolve())
        s = read_spaceranger(folder, species=species, patient=patient, um_per_px=um_per_px, image=img,
                             meta=_sample_meta(name, meta, patient))
        samples.append(s)
        h5, spatial = folder / "filtered_feature_bc_matrix.h5", folder / "spatial"
        kept = [h5, s.image_path, *sorted(spatial.glob("tissue_positions*.csv")), *sorted(spatial.glob("scalefactors_json.json"))]
        sections[s.sample_id] = {"kind": "spaceranger", "path": str(folder), "patient": s.patient,
                                 "um_per_px": um_per_px, "image": img, "files": _files(*kept)}
    _write_entry(name, {"name": name, "meta": meta, "sections": sections})
    return SampleSet(name, samples)


def _sample_meta(name: str, meta: dict, patient: str | None) -> dict:
    return meta | {"dataset": name, "group_kind": "patient" if patient else "section"}


def check_raw_counts(adata: ad.AnnData, *, where: str) -> None:
    """Refuse non-integer counts (normalised or log data)."""
    data = adata.X.data if sp.issparse(adata.X) else np.asarray(adata.X)
    if data.size and not np.array_equal(data, np.round(data)):
        raise DataError(
            f"{where}: X holds non-integer values (e.g. {data[data != np.round(data)][0]:.3g}); give raw counts "
            "(e.g. adata.layers['counts']), not normalised or log data"
        )


def register_anndata(
    name: str, adata: ad.AnnData | str | Path, *, image: str | Path, um_per_px: float, species: str,
    sample_id: str | None = None, patient: str | None = None, **context,
) -> SampleSet:
    """Register one section from an AnnData (raw counts, ``obsm['spatial']`` x, y in pixels of ``image``)."""
    _check_name(name)
    where = str(adata) if isinstance(adata, (str, Path)) else "adata"
    adata = ad.read_h5ad(adata) if isinstance(adata, (str, Path)) else adata.copy()
    sid = sample_id or name
    image = Path(image).resolve()
    if not image.is_file():
        raise DataError(f"{image}: image file does not exist; give the H&E image the spot coordinates refer to")
    check_raw_counts(adata, where=where)
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    tag_species(adata, species)
    meta = _context(species, context)
    s = Sample(sid, patient or sid, adata, float(um_per_px), image_path=image, meta=_sample_meta(name, meta, patient))
    check_centres(s, *image_size(image))
    with atomic_dir(registry_dir() / name) as tmp:
        s.adata.write_h5ad(tmp / f"{sid}.h5ad")
    h5ad = registry_dir() / name / f"{sid}.h5ad"
    section = {"kind": "anndata", "h5ad": str(h5ad), "image": str(image), "patient": s.patient,
               "um_per_px": float(um_per_px), "files": _files(h5ad, image)}
    _write_entry(name, {"name": name, "meta": meta, "sections": {sid: section}})
    return SampleSet(name, [s])


def _verify(name: str, files: dict[str, str]) -> None:
    for path, sha in files.items():
        p = Path(path)
        if not p.is_file():
            raise DataError(f"{p}: missing (registered for dataset {name!r}); restore it or register {name!r} again")
        if file_sha256(p) != sha:
            raise DataError(f"{p}: sha256 differs from when {name!r} was registered; restore the file or register {name!r} again")


def load_registered(name: str, *, sections: Sequence[str] | None = None) -> SampleSet:
    """A registered dataset by name (files re-verified by sha256)."""
    path = registry_dir() / f"{name}.yaml"
    if not path.is_file():
        raise DataError(f"no registered dataset {name!r} ({path} missing); register it with `histomoe data add`")
    entry = yaml.safe_load(path.read_text())
    names = list(sections) if sections is not None else list(entry["sections"])
    unknown = sorted(set(names) - set(entry["sections"]))
    if unknown:
        raise DataError(f"{name} has no section {unknown}; sections: {', '.join(entry['sections'])}")
    return SampleSet(name, [_load_section(name, sid, entry["sections"][sid], entry["meta"]) for sid in names])


def _load_section(name: str, sid: str, sec: dict, meta: dict) -> Sample:
    _verify(name, sec["files"])
    patient = sec.get("patient")
    smeta = _sample_meta(name, meta, patient if patient != sid else None)
    if sec["kind"] == "spaceranger":
        return read_spaceranger(sec["path"], sample_id=sid, species=meta["species"], patient=patient,
                                um_per_px=sec.get("um_per_px"), image=sec.get("image", "hires"), meta=smeta)
    adata = ad.read_h5ad(sec["h5ad"])
    return Sample(sid, patient or sid, adata, float(sec["um_per_px"]), image_path=Path(sec["image"]), meta=smeta)
