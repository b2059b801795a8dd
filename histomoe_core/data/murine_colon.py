"""Adapter for ludvigla/murine_colon_explorer (Parigi et al. 2022): one mouse colon swiss roll, Visium.

The Shiny app stores ``log1p`` of raw counts as an R ``dgCMatrix`` (``readRDS`` file, read with ``rdata``):
``expm1`` recovers the counts, which must be integers (checked). Spot positions are zoom-0 map units of a
Leaflet tile pyramid (256 px RGBA tiles); the image at a chosen zoom is stitched once, transparent areas
composited onto white glass, and cached atomically under the artifact cache keyed by the tiles' sha256.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from histomoe_core.cache import artifact_dir, atomic_dir, content_key, file_sha256
from histomoe_core.data.fetch import fetch
from histomoe_core.data.manifests import load_manifest
from histomoe_core.data.sample import Sample, SampleSet, tag_species
from histomoe_core.data.sources import SOURCES
from histomoe_core.data.spaceranger import VISIUM_SPOT_UM, spacing_pixel_size
from histomoe_core.errors import DataError

NAME = "murine_colon_explorer"
#: largest |expm1(x) - round(expm1(x))| still taken as an integer (float64 round trip of log1p)
INTEGER_TOL = 1e-3


def read_rds(path: Path):
    import rdata

    if not path.is_file():
        raise DataError(f"{path}: missing; run `histomoe data fetch {NAME}`")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # rdata has no dgCMatrix constructor: the raw slots come back
            return rdata.read_rds(path)
    except Exception as exc:  # rdata raises plain ValueError/NotImplementedError/EOFError on bad input
        raise DataError(f"{path}: not a readable R RDS file ({type(exc).__name__}: {exc}); fetch it again") from exc


def log1p_counts(obj, *, where: Path) -> ad.AnnData:
    """A genes x spots ``dgCMatrix`` of log1p(counts) -> spots x genes AnnData of integer raw counts."""
    try:
        n_genes, n_spots = (int(v) for v in obj.Dim)
        genes, spots = (np.asarray(d).astype(str) for d in obj.Dimnames)
        x = sp.csr_matrix((np.asarray(obj.x, np.float64), np.asarray(obj.i), np.asarray(obj.p)), shape=(n_spots, n_genes))
    except (AttributeError, TypeError, ValueError) as exc:
        raise DataError(f"{where}: not a sparse dgCMatrix genes x spots ({exc})") from exc
    counts = np.expm1(x.data)
    err = np.abs(counts - np.round(counts))
    if err.size and err.max() > INTEGER_TOL:
        raise DataError(
            f"{where}: expm1 of the values is not integer (max deviation {err.max():.3g}); expected log1p of raw "
            "counts, not normalised data"
        )
    x.data = np.round(counts).astype(np.float32)
    return ad.AnnData(X=x.astype(np.float32), obs=pd.DataFrame(index=spots), var=pd.DataFrame(index=genes))


def stitch_tiles(tiles: Path, zoom: int, *, tile_px: int = 256, progress: bool = False) -> np.ndarray:
    """The (256 * 2^zoom)-px square RGB image of one pyramid level; transparent pixels become white."""
    n = 2**zoom
    out = Image.new("RGB", (n * tile_px, n * tile_px), (255, 255, 255))
    for tx in tqdm(range(n), desc=f"stitch zoom {zoom}", disable=not progress, unit="col"):
        for ty in range(n):
            path = tiles / str(zoom) / str(tx) / f"{ty}.png"
            if not path.is_file():
                raise DataError(f"{path}: tile missing from the zoom-{zoom} pyramid; run `histomoe data fetch {NAME}`")
            try:
                with Image.open(path) as im:
                    tile = im.convert("RGBA")
            except (OSError, UnidentifiedImageError) as exc:
                raise DataError(f"{path}: not a readable PNG tile ({exc}); fetch it again") from exc
            out.paste(tile, (tx * tile_px, ty * tile_px), tile)
    return np.asarray(out)


def stitched_image(tiles: Path, zoom: int, tile_files: Sequence[Path], *, progress: bool = False) -> Path:
    """The stitched zoom level as a PNG in the artifact cache (made once, atomically)."""
    key = content_key("tiles", zoom, sorted((str(p.relative_to(tiles)), file_sha256(p)) for p in tile_files))
    final = artifact_dir("tile_images", key)
    image = final / f"zoom{zoom}.png"
    if not image.is_file():
        img = stitch_tiles(tiles, zoom, progress=progress)
        with atomic_dir(final) as tmp:
            Image.fromarray(img).save(tmp / image.name, compress_level=1)
    return image


def load_colon(root: Path, sid: str, x: dict, zoom: int) -> Sample:
    expr_path, coords_path = root / x["counts"], root / x["coords"]
    adata = log1p_counts(read_rds(expr_path), where=expr_path)
    coords = read_rds(coords_path)
    if not isinstance(coords, pd.DataFrame) or not {"pixel_x", "pixel_y"} <= set(coords.columns):
        raise DataError(f"{coords_path}: expected a data frame with pixel_x, pixel_y")
    if len(coords) != adata.n_obs or not np.array_equal(coords.index.astype(str), adata.obs_names):
        raise DataError(f"{coords_path}: its {len(coords)} rows do not match the {adata.n_obs} spots of {expr_path.name}")
    tiles = root / x["tiles"]
    tile_files = [tiles / str(zoom) / str(tx) / f"{ty}.png" for tx in range(2**zoom) for ty in range(2**zoom)]
    missing = [p for p in tile_files if not p.is_file()]
    if missing:
        raise DataError(f"{missing[0]}: tile missing ({len(missing)} of zoom {zoom}); run `histomoe data fetch {NAME}`")
    adata.obsm["spatial"] = coords[["pixel_x", "pixel_y"]].to_numpy(np.float64) * 2**zoom
    tag_species(adata, x["species"])
    meta = {k: x[k] for k in ("species", "organ", "tissue", "disease_state", "technology", "preservation")}
    meta |= {"dataset": NAME, "section": sid, "group_kind": "section", "zoom": zoom, "spot_um": VISIUM_SPOT_UM}
    return Sample(
        sample_id=sid, patient=sid, adata=adata, pixel_size_um=spacing_pixel_size(adata.obsm["spatial"]),
        image_path=stitched_image(tiles, zoom, tile_files), meta=meta,
    )


@SOURCES.register(NAME)
def load_murine_colon(*, sections: Sequence[str] | None = None, zoom: int | None = None, root: Path | None = None) -> SampleSet:
    """The day-0 colon section, its image stitched from the tile pyramid at ``zoom`` (default 4, ~1.9 µm/px)."""
    x = load_manifest(NAME).extra
    names = list(sections) if sections is not None else list(x["sections"])
    unknown = sorted(set(names) - set(x["sections"]))
    if unknown:
        raise DataError(f"{NAME} has no section {unknown}; sections: {', '.join(x['sections'])}")
    root = Path(root) if root is not None else fetch(NAME, progress=False, sections=names)
    return SampleSet(NAME, [load_colon(root, n, x, int(zoom if zoom is not None else x["zoom"])) for n in names])
