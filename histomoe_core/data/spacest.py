"""Adapter for ludvigla/spaceST (Stahl et al. 2016): mouse olfactory bulb, legacy ST, two replicates.

The counts are an R workspace (``data/MOB.RData``, genes x spots integer matrices ``MOB1`` / ``MOB2``) read
with ``rdata`` (pure Python, maintained; no R needed). Spot ids are array positions ``"XxY"``; the H&E images
are cropped to the array frame, so array (1, 1) is the top-left image corner and (33, 35) the bottom-right.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from histomoe_core.data.fetch import fetch
from histomoe_core.data.manifests import load_manifest
from histomoe_core.data.patches import image_size
from histomoe_core.data.sample import Sample, SampleSet, tag_species
from histomoe_core.data.sources import SOURCES
from histomoe_core.errors import DataError

NAME = "spacest"
ST_PITCH_UM = 200.0
ST_SPOT_UM = 100.0


def read_workspace(path: Path) -> dict:
    """The objects of an R workspace (``.RData``) as Python objects (matrices become xarray DataArrays)."""
    import rdata

    if not path.is_file():
        raise DataError(f"{path}: missing; run `histomoe data fetch {NAME}`")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return rdata.conversion.convert(rdata.parser.parse_file(path))
    except Exception as exc:  # rdata raises plain ValueError/NotImplementedError/EOFError on bad input
        raise DataError(f"{path}: not a readable R workspace ({type(exc).__name__}: {exc}); fetch it again") from exc


def array_positions(spot_ids: Sequence[str], *, where: Path) -> np.ndarray:
    """(N, 2) float array positions from ``"XxY"`` spot ids."""
    try:
        return np.array([[float(v) for v in s.split("x")] for s in spot_ids], dtype=np.float64).reshape(-1, 2)
    except ValueError as exc:
        raise DataError(f"{where}: spot ids are not array positions 'XxY' ({exc})") from exc


def matrix_to_adata(obj, *, where: Path) -> ad.AnnData:
    """Genes x spots integer DataArray -> spots x genes AnnData of raw counts."""
    values = np.asarray(obj.values)
    if not np.issubdtype(values.dtype, np.integer) and not np.array_equal(values, np.round(values)):
        raise DataError(f"{where}: the count matrix is not integer; expected raw counts")
    genes, spots = (np.asarray(obj.coords[d].values).astype(str) for d in obj.dims)
    adata = ad.AnnData(
        X=sp.csr_matrix(values.T.astype(np.float32)),
        obs=pd.DataFrame(index=pd.Index(spots)), var=pd.DataFrame(index=pd.Index(genes)),
    )
    adata.var_names_make_unique()
    return adata


def load_replicate(root: Path, sid: str, info: dict, objects: dict, x: dict) -> Sample:
    where = root / x["workspace"]
    if info["object"] not in objects:
        raise DataError(f"{where}: no object {info['object']!r} (has {sorted(objects)}); fetch the workspace again")
    adata = matrix_to_adata(objects[info["object"]], where=where)
    (x0, x1), (y0, y1) = x["array_frame"]["x"], x["array_frame"]["y"]
    image = root / info["image"]
    if not image.is_file():
        raise DataError(f"{image}: missing; run `histomoe data fetch {NAME}`")
    w, h = image_size(image)
    pos = array_positions(adata.obs_names, where=where)
    adata.obs["array_x"], adata.obs["array_y"] = pos[:, 0], pos[:, 1]
    adata.obsm["spatial"] = np.stack([(pos[:, 0] - x0) / (x1 - x0) * w, (pos[:, 1] - y0) / (y1 - y0) * h], axis=1)
    um_per_px = float(np.mean([(x1 - x0) * ST_PITCH_UM / w, (y1 - y0) * ST_PITCH_UM / h]))
    tag_species(adata, x["species"])
    meta = {k: x[k] for k in ("species", "organ", "tissue", "disease_state", "technology", "preservation")}
    meta |= {"dataset": NAME, "section": sid, "group_kind": "section", "spot_um": ST_SPOT_UM}
    return Sample(sample_id=sid, patient=sid, adata=adata, pixel_size_um=um_per_px, image_path=image, meta=meta)


@SOURCES.register(NAME)
def load_spacest(*, sections: Sequence[str] | None = None, root: Path | None = None) -> SampleSet:
    """The two MOB replicates (or ``sections``) as a :class:`SampleSet`."""
    x = load_manifest(NAME).extra
    names = list(sections) if sections is not None else list(x["sections"])
    root = Path(root) if root is not None else fetch(NAME, progress=False, sections=names)
    objects = read_workspace(root / x["workspace"])
    return SampleSet(NAME, [load_replicate(root, n, x["sections"][n], objects, x) for n in names])
