"""Adapter for the her2st repository layout (Andersson et al. 2021): counts, spot files, images, clinical sheet."""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from histomoe_core.data.fetch import fetch
from histomoe_core.data.manifests import load_manifest
from histomoe_core.data.sample import GRID_TOLERANCE, Sample, SampleSet, grid_offsets, tag_species
from histomoe_core.data.sources import SOURCES
from histomoe_core.errors import DataError

#: centre-to-centre distance of legacy ST spots, used to estimate the pixel size from the spot grid
ST_PITCH_UM = 200.0


def read_counts(path: Path) -> pd.DataFrame:
    """Spots x genes raw counts from ``ST-cnts/<section>.tsv.gz``."""
    try:
        df = pd.read_csv(path, sep="\t", index_col=0, low_memory=False)  # one pass over ~15k columns: 2x faster
    except (OSError, EOFError, ValueError, pd.errors.ParserError) as exc:
        raise DataError(f"{path}: cannot read counts ({exc}); fetch the file again") from exc
    df.index = df.index.astype(str)
    if df.empty:
        raise DataError(f"{path}: no spots (a header and no count rows); fetch the file again")
    non_numeric = [c for c, t in df.dtypes.items() if not np.issubdtype(t, np.number)]
    if non_numeric:
        raise DataError(f"{path}: non-numeric count columns {non_numeric[:3]}")
    return df


def read_spots(path: Path) -> pd.DataFrame:
    """Spot table from ``ST-spotfiles/<section>_selection.tsv`` indexed by ``f"{x}x{y}"``."""
    try:
        df = pd.read_csv(path, sep="\t")
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise DataError(f"{path}: cannot read spot file ({exc})") from exc
    need = {"x", "y", "new_x", "new_y", "pixel_x", "pixel_y"}
    if not need <= set(df.columns):
        raise DataError(f"{path}: missing columns {sorted(need - set(df.columns))}")
    df.index = [f"{x}x{y}" for x, y in zip(df["x"], df["y"])]
    return df


def check_spot_grid(spots: pd.DataFrame, path: Path) -> None:
    """Refuse spot ids ``x, y`` that are not the spot's array position ``new_x, new_y`` (permuted ids), and pixel
    positions off the affine map from array positions to pixels (moved spots, permuted coordinates)."""
    bad_id = ((spots["x"] - spots["new_x"]).abs() > 0.5) | ((spots["y"] - spots["new_y"]).abs() > 0.5)
    if bad_id.any():
        raise DataError(f"{path}: {int(bad_id.sum())} spot id(s) x, y are not their array position new_x, new_y "
                        f"(e.g. {list(spots.index[bad_id][:3])}); the ids were permuted or edited - fetch the file again")
    off = grid_offsets(spots[["new_x", "new_y"]].to_numpy(float), spots[["pixel_x", "pixel_y"]].to_numpy(float))
    moved = off > GRID_TOLERANCE
    if moved.any():
        worst = int(np.argmax(off))
        raise DataError(f"{path}: {int(moved.sum())} spot(s) lie off the array grid (pixel_x, pixel_y more than "
                        f"{GRID_TOLERANCE:g} spot pitch from where new_x, new_y put them; {spots.index[worst]} is "
                        f"{off[worst]:.2f} pitch off); their pixel positions were moved - fetch the file again")


def grid_pixel_size(spots: pd.DataFrame, scale: float) -> float:
    """µm/px of the image, from the least-squares pitch of spot pixels against array positions."""
    pitches = []
    for a, p in (("new_x", "pixel_x"), ("new_y", "pixel_y")):
        slope = np.polyfit(spots[a].to_numpy(float), spots[p].to_numpy(float), 1)[0]
        pitches.append(abs(slope) * scale)
    return ST_PITCH_UM / float(np.mean(pitches))


#: clinical sheet columns -> metadata keys
CLINICAL_COLUMNS = {"ER": "er", "PgR": "pgr", "Hist_Grade": "grade", "NodeStatus": "node_status"}


def read_clinical(path: Path) -> dict[str, dict]:
    """Per-patient ER / PgR / histological grade / node status from the clinical sheet, keyed by patient letter."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # openpyxl warns about an unsupported sheet extension
            table = pd.read_excel(path, dtype=str)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read the clinical sheet ({exc}); fetch it again") from exc
    missing = [c for c in ["Sample", *CLINICAL_COLUMNS] if c not in table.columns]
    if missing:
        raise DataError(f"{path}: clinical sheet lacks columns {missing}")
    out: dict[str, dict] = {}
    for _, row in table.iterrows():
        rec = {}
        for col, key in CLINICAL_COLUMNS.items():
            v = str(row[col]).strip()
            rec[key] = None if v in ("", "nan", "Na") else v
        out[str(row["Sample"]).strip()] = rec
    return out


def load_section(root: Path, section: str, info: dict, base_meta: dict, clinical: dict) -> Sample:
    counts = read_counts(root / "data" / "ST-cnts" / f"{section}.tsv.gz")
    spots_path = root / "data" / "ST-spotfiles" / f"{section}_selection.tsv"
    spots = read_spots(spots_path)
    missing = counts.index.difference(spots.index)
    if len(missing):
        raise DataError(
            f"{spots_path}: {len(missing)} count rows have no coordinates (e.g. {list(missing[:3])}); "
            "counts and coordinates do not match"
        )
    check_spot_grid(spots, spots_path)
    spots = spots.loc[counts.index]
    scale = float(Fraction(str(info.get("coord_scale", "1"))))
    xy = spots[["pixel_x", "pixel_y"]].to_numpy(float) * scale
    adata = ad.AnnData(
        X=sp.csr_matrix(counts.to_numpy(np.float32)),
        obs=pd.DataFrame({"array_x": spots["x"].to_numpy(), "array_y": spots["y"].to_numpy()}, index=counts.index),
        var=pd.DataFrame(index=counts.columns.astype(str)),
    )
    adata.obsm["spatial"] = xy
    tag_species(adata, base_meta["species"])
    patient = str(info["patient"])
    meta = base_meta | {"section": section, "quality": info.get("quality", "ok"), "coord_scale": scale}
    meta |= clinical.get(patient, {})
    return Sample(
        sample_id=section, patient=patient, adata=adata, pixel_size_um=grid_pixel_size(spots, scale),
        image_path=root / info["image"], meta=meta,
    )


@SOURCES.register("her2st")
def load_her2st(*, sections: Sequence[str] | None = None, root: Path | None = None, exclude_low_quality: bool = False) -> SampleSet:
    """The 8 her2st sections as a :class:`SampleSet` (fetched and verified unless ``root`` is given)."""
    manifest = load_manifest("her2st")
    root = Path(root) if root is not None else fetch("her2st", progress=False)
    x = manifest.extra
    base_meta = {
        "organ": x["organ"], "cancer_type": x["cancer_type"], "oncotree_code": x["oncotree_code"],
        "technology": "ST", "dataset": "her2st", "species": x["species"], "disease_state": x["disease_state"],
        "preservation": x["preservation"], "group_kind": "patient", "spot_um": 100.0,
    }
    clinical = read_clinical(root / x["clinical"]["sheet"])
    names = list(sections) if sections is not None else list(x["sections"])
    unknown = sorted(set(names) - set(x["sections"]))
    if unknown:
        raise DataError(f"her2st has no section {unknown}; sections: {', '.join(x['sections'])}")
    if exclude_low_quality:
        names = [n for n in names if x["sections"][n].get("quality", "ok") != "low"]
    return SampleSet("her2st", [load_section(root, n, x["sections"][n], base_meta, clinical) for n in names])
