"""Pathologist region labels of her2st sections (``data/ST-pat/lbl/<section>_labeled_coordinates.tsv``)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from histomoe_core.data.sample import Sample
from histomoe_core.errors import DataError

LABEL_DIR = Path("data") / "ST-pat" / "lbl"


def her2st_root(sample: Sample) -> Path:
    """The her2st repository folder a sample was loaded from (its image path minus the manifest's relative path)."""
    from histomoe_core.data.manifests import load_manifest

    rel = load_manifest("her2st").extra["sections"][sample.sample_id]["image"]
    img = str(sample.image_path)
    if sample.image_path is None or not img.endswith(rel):
        raise DataError(f"{sample.sample_id}: not a her2st section loaded with load_dataset('her2st')")
    return Path(img[: -len(rel)])


def _label_path(sample: Sample) -> Path:
    return her2st_root(sample) / LABEL_DIR / f"{sample.sample_id}_labeled_coordinates.tsv"


def has_region_labels(sample: Sample) -> bool:
    """Whether a her2st section comes with a pathologist label file (A1 in the public data)."""
    return sample.meta.get("dataset") == "her2st" and _label_path(sample).is_file()


def read_region_labels(sample: Sample) -> pd.Series:
    """Pathologist region label per spot of a her2st section, indexed like ``sample.adata.obs_names``.

    The label file names spots by full-resolution pixel position and gives array positions with sub-spot
    offsets; it is joined on the array grid (``obs.array_x / array_y`` = rounded label ``x / y``). Spots the
    pathologist did not label are NaN. Only sections with a label file have labels (A1 in the public data).
    """
    path = _label_path(sample)
    if not path.is_file():
        raise DataError(f"{sample.sample_id}: no pathologist labels ({path} does not exist; her2st labels A1 only)")
    table = pd.read_csv(path, sep="\t")
    if not {"x", "y", "label"} <= set(table.columns):
        raise DataError(f"{path}: expected columns x, y, label; found {list(table.columns)}")
    table = table.dropna(subset=["x", "y"])
    key = pd.Index([f"{x}x{y}" for x, y in zip(np.rint(table["x"]).astype(int), np.rint(table["y"]).astype(int))])
    if key.has_duplicates:
        raise DataError(f"{path}: two labelled spots round to the same array position {key[key.duplicated()][0]}")
    labels = pd.Series(table["label"].astype(str).str.strip().to_numpy(), index=key)
    obs = sample.adata.obs
    spot = pd.Index([f"{int(x)}x{int(y)}" for x, y in zip(obs["array_x"], obs["array_y"])])
    out = pd.Series(labels.reindex(spot).to_numpy(), index=obs.index.copy(), name="region")
    return out.astype("category")


def _per_section(adata, samples, fn, name: str) -> pd.Series:
    """Concatenate ``fn(sample) -> Series indexed by spot id`` over the sections of a multi-section AnnData."""
    out = pd.Series(np.full(adata.n_obs, None, dtype=object), index=adata.obs_names.copy(), name=name)
    ids = adata.obs["sample_id"].astype(str).to_numpy()
    spots = adata.obs["spot_id"].astype(str).to_numpy()
    for s in samples:
        rows = np.flatnonzero(ids == s.sample_id)
        if not len(rows):
            continue
        values = fn(s)
        if values is None:
            continue
        out.iloc[rows] = values.reindex(spots[rows]).to_numpy()
    return out.astype("category")


def region_labels(adata, samples) -> pd.Series:
    """Pathologist region labels for the spots of an AnnData built by :func:`~histomoe_core.tl.spot_adata`
    (NaN for sections without a label file)."""

    def one(s: Sample):
        return read_region_labels(s) if has_region_labels(s) else None

    return _per_section(adata, samples, one, "region")


def true_cell_type(adata, samples) -> pd.Series:
    """Synthetic data only: the latent cell type with the largest proportion in each spot (``obsm["z_true"]``),
    named by :data:`histomoe_core.data.synthetic.CELL_TYPES`; NaN for other data."""
    from histomoe_core.data.synthetic import CELL_TYPES

    def one(s: Sample):
        if "z_true" not in s.adata.obsm:
            return None
        z = np.asarray(s.adata.obsm["z_true"])
        return pd.Series(np.asarray(CELL_TYPES)[z.argmax(axis=1)], index=s.adata.obs_names.astype(str))

    return _per_section(adata, samples, one, "cell_type")
