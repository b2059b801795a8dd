"""Read a 10x Visium Space Ranger ``outs/`` folder into a :class:`~histomoe_core.data.sample.Sample`.

Counts come from scanpy's ``sc.read_10x_h5`` (the maintained 10x HDF5 reader). ``sc.read_visium`` is not used:
scanpy 1.11 deprecates it in favour of squidpy / spatialdata-io (not dependencies here), it decodes every image
into ``uns`` and it leaves barcodes missing from the positions file as NaN coordinates without a word. The two
small documented text formats beside the matrix (``tissue_positions[_list].csv`` and
``scalefactors_json.json``) are read with pandas / json so each problem gets a one-line error that names the
file and the fix.

Spot centres are returned in pixels of the image actually read (hires by default); the pixel size is given or
measured from the spot spacing (100 µm centre to centre). ``spot_diameter_fullres`` is not used for it: on the
ffpe_analysis sections it gives ~3.3 µm/px where the spacing and HEST-1k agree on ~4.2.
Multi-genome references (``GRCh38__ACTB``) are split by genome: one host species per sample, pathogen features
(e.g. SARS-CoV-2 ``wuhCor1_*``) leave the matrix and become a per-spot count in ``obs``.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Literal

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from histomoe_core.data.sample import Sample, tag_species
from histomoe_core.errors import DataError

#: Visium v1 geometry
VISIUM_SPOT_UM = 55.0
VISIUM_PITCH_UM = 100.0
#: reference genome -> host species
GENOMES = {"GRCh38": "human", "hg19": "human", "GRCh37": "human", "mm10": "mouse", "GRCm38": "mouse", "GRCm39": "mouse"}
#: reference genome -> pathogen, whose features become an obs column instead of genes
PATHOGENS = {"wuhCor1": "sars_cov_2"}
POSITION_COLUMNS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]
IMAGES = {"hires": "tissue_hires_image.png", "lowres": "tissue_lowres_image.png"}


def read_matrix(path: Path) -> ad.AnnData:
    """Spots x features raw counts from ``filtered_feature_bc_matrix.h5``, var with ``symbol`` and ``genome``."""
    import scanpy as sc

    if not path.is_file():
        raise DataError(f"{path}: missing; a Space Ranger outs/ folder needs filtered_feature_bc_matrix.h5 (copy it from outs/)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # duplicate symbols are made unique below
            adata = sc.read_10x_h5(path, gex_only=True)
    except (OSError, KeyError, ValueError) as exc:
        raise DataError(f"{path}: not a readable 10x HDF5 matrix ({exc}); copy it again from Space Ranger outs/") from exc
    genome = adata.var["genome"].astype(str) if "genome" in adata.var else pd.Series("", index=adata.var_names)
    prefix = [f"{g}__" if g else "" for g in genome]
    adata.var["symbol"] = [n[len(p):] if p and n.startswith(p) else n for n, p in zip(adata.var_names, prefix)]
    adata.var["genome"] = genome.to_numpy()
    adata.var_names_make_unique()
    return adata


def read_positions(spatial: Path) -> tuple[pd.DataFrame, Path]:
    """The positions table (either Space Ranger name, with or without a header) indexed by barcode."""
    for name in ("tissue_positions.csv", "tissue_positions_list.csv"):
        path = spatial / name
        if path.is_file():
            break
    else:
        raise DataError(f"{spatial}: no tissue_positions.csv or tissue_positions_list.csv; copy spatial/ from Space Ranger outs/")
    try:
        first = path.open().readline()
        df = pd.read_csv(path, header=0 if first.startswith("barcode") else None)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise DataError(f"{path}: cannot read the positions table ({exc}); copy it again from Space Ranger outs/") from exc
    if df.shape[1] != len(POSITION_COLUMNS):
        raise DataError(f"{path}: {df.shape[1]} columns, expected {len(POSITION_COLUMNS)} ({', '.join(POSITION_COLUMNS)})")
    df.columns = POSITION_COLUMNS
    return df.set_index(df["barcode"].astype(str)).drop(columns="barcode"), path


def read_scalefactors(spatial: Path) -> dict:
    path = spatial / "scalefactors_json.json"
    if not path.is_file():
        raise DataError(f"{path}: missing; copy spatial/scalefactors_json.json from Space Ranger outs/ (it maps full-resolution to image pixels)")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc}); copy it again from Space Ranger outs/") from exc


def spacing_pixel_size(xy: np.ndarray, pitch_um: float = VISIUM_PITCH_UM) -> float:
    """µm/px from the median nearest-neighbour distance between spot centres (the array pitch)."""
    from scipy.spatial import cKDTree

    if len(xy) < 2:
        raise DataError("fewer than 2 spots: cannot estimate the pixel size from the spot spacing; give um_per_px")
    d, _ = cKDTree(xy).query(xy, k=2)
    return pitch_um / float(np.median(d[:, 1]))


def split_genomes(adata: ad.AnnData, *, where: Path) -> tuple[ad.AnnData, str]:
    """Host-species genes only (symbols as var_names) and the species; pathogen counts move to ``obs``."""
    genomes = pd.unique(adata.var["genome"])
    for g in genomes:
        if g in PATHOGENS:
            mask = (adata.var["genome"] == g).to_numpy()
            adata.obs[f"{PATHOGENS[g]}_counts"] = np.asarray(adata.X[:, mask].sum(axis=1)).ravel()
    host = [g for g in genomes if g not in PATHOGENS]
    species = sorted({GENOMES.get(g, "") for g in host})
    if len(species) > 1 or ("" in species and len(host) > 1):
        raise DataError(
            f"{where}: features of several species in one sample (genomes {', '.join(host)}); split the matrix by "
            "genome (one species per sample) before reading it"
        )
    from anndata.utils import make_index_unique

    out = adata[:, adata.var["genome"].isin(host).to_numpy()].copy()
    out.var["gene_ids"] = out.var_names.to_numpy() if "gene_ids" not in out.var else out.var["gene_ids"]
    out.var_names = make_index_unique(pd.Index(out.var["symbol"].astype(str).to_numpy()))
    return out, species[0] if species and species[0] else ""


def image_scale(spatial: Path, image: str | Path) -> tuple[float, Path]:
    """Factor from full-resolution to ``image`` pixels, and the image file."""
    if str(image) not in IMAGES:
        path = Path(image)
        if not path.is_file():
            raise DataError(f"{path}: full-resolution image missing; give the image Space Ranger was run on, or 'hires'")
        return 1.0, path
    factors = read_scalefactors(spatial)
    key = f"tissue_{image}_scalef"
    if key not in factors:
        raise DataError(f"{spatial / 'scalefactors_json.json'}: no {key!r}; it is needed to map spots onto the {image} image")
    path = spatial / IMAGES[str(image)]
    if not path.is_file():
        raise DataError(f"{path}: missing; copy the {image} image from Space Ranger outs/spatial/")
    return float(factors[key]), path


def read_spaceranger(
    path: str | Path, *, sample_id: str | None = None, image: Literal["hires", "lowres"] | str | Path = "hires",
    um_per_px: float | None = None, species: str | None = None, patient: str | None = None, meta: dict | None = None,
) -> Sample:
    """A Visium ``outs/`` folder as a :class:`Sample`: spots under tissue, centres in ``image`` pixels.

    ``image`` is ``"hires"``, ``"lowres"`` or the path of the full-resolution image given to Space Ranger
    (spot centres are then ``pxl_*_in_fullres`` as they are).
    ``species`` is required when the reference genome does not say (e.g. a custom reference); ``patient`` is the
    split group (default: the sample id).
    """
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder; give a Space Ranger outs/ folder")
    spatial = root / "spatial"
    h5 = root / "filtered_feature_bc_matrix.h5"
    adata = read_matrix(h5)
    positions, pos_path = read_positions(spatial)
    missing = adata.obs_names.difference(positions.index)
    if len(missing):
        raise DataError(
            f"{pos_path}: {len(missing)} barcodes of {h5.name} are absent (e.g. {list(missing[:2])}); the positions "
            "file belongs to another run: copy spatial/ and the matrix from the same Space Ranger outs/"
        )
    pos = positions.loc[adata.obs_names]
    adata = adata[(pos["in_tissue"] == 1).to_numpy()].copy()
    pos = pos.loc[adata.obs_names]
    scale, image_path = image_scale(spatial, image)
    adata, found = split_genomes(adata, where=h5)
    if species and found and species != found:
        raise DataError(f"{h5}: the reference genome is {found}, not {species}; pass species={found!r} (or none)")
    species = species or found
    if not species:
        raise DataError(f"{h5}: the reference genome does not name a species; pass species='human' or 'mouse'")
    xy = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(float) * scale
    adata.obsm["spatial"] = xy
    adata.obs["array_row"] = pos["array_row"].to_numpy()
    adata.obs["array_col"] = pos["array_col"].to_numpy()
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    if um_per_px is None:
        um_per_px = spacing_pixel_size(xy)
    sid = sample_id or root.name
    tag_species(adata, species)
    return Sample(
        sample_id=sid, patient=patient or sid, adata=adata, pixel_size_um=float(um_per_px), image_path=image_path,
        meta={"technology": "Visium", "spot_um": VISIUM_SPOT_UM, "species": species, "image": str(image), "scalefactor": scale, **(meta or {})},
    )
