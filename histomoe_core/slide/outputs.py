"""Write a slide prediction where users work: ``predictions.h5ad`` (scanpy / squidpy), ``predictions.zarr``
(SpatialData: thumbnail image, spot circles, table) and PNG maps over the thumbnail.

:func:`write_outputs` writes everything into a temporary folder beside ``out`` and renames it into place, so a
failed run leaves nothing half-written.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from histomoe_core.errors import DataError

#: file names inside a prediction folder
H5AD, ZARR, MAPS = "predictions.h5ad", "predictions.zarr", "maps"


def with_scanpy_image(adata, thumb: np.ndarray, downsample: float, spot_px: float, library_id: str):
    """``uns["spatial"][library_id]`` as scanpy's ``pl.spatial`` reads it (thumbnail as the "hires" image)."""
    adata.uns["spatial"] = {library_id: {"images": {"hires": thumb},
                                         "scalefactors": {"tissue_hires_scalef": 1.0 / downsample,
                                                          "spot_diameter_fullres": float(spot_px)}}}
    return adata


def write_spatialdata(adata, thumb: np.ndarray, downsample: float, spot_px: float, path: Path) -> None:
    """A SpatialData zarr: the thumbnail (scaled to slide pixels), the spots as circles, the AnnData as table."""
    import spatialdata as sd
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale

    image = Image2DModel.parse(np.moveaxis(thumb, -1, 0), dims=("c", "y", "x"),
                               transformations={"global": Scale([downsample, downsample], axes=("y", "x"))})
    shapes = ShapesModel.parse(np.asarray(adata.obsm["spatial"], float), geometry=0,
                               radius=np.full(adata.n_obs, spot_px / 2.0), index=np.arange(adata.n_obs),
                               transformations={"global": Identity()})
    table = adata.copy()
    table.uns.pop("spatial", None)
    table.obs["region"] = pd.Categorical(["spots"] * table.n_obs)
    table.obs["instance_id"] = np.arange(table.n_obs)
    table = TableModel.parse(table, region="spots", region_key="region", instance_key="instance_id")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*autosharding.*", category=UserWarning)  # zarr's notice
        sd.SpatialData(images={"slide": image}, shapes={"spots": shapes}, tables={"table": table}).write(path)


def _canvas(thumb: np.ndarray, title: str):
    import matplotlib.pyplot as plt

    h, w = thumb.shape[:2]
    fig, ax = plt.subplots(figsize=(6.0, 6.0 * h / w + 0.4), dpi=110)
    ax.imshow(thumb)
    ax.set_axis_off()
    ax.set_title(title, fontsize=10)
    return fig, ax


def _marker(adata, downsample: float, spot_px: float, ax) -> float:
    """Marker area (points^2) so a square spot covers its patch on the thumbnail."""
    fig = ax.figure
    side_in = spot_px / downsample / ax.get_xlim()[1] * fig.get_size_inches()[0] * ax.get_position().width
    return max((side_in * 72) ** 2, 1.0)


def plot_maps(adata, thumb: np.ndarray, downsample: float, spot_px: float, out: Path, *,
              genes: Sequence[str], key: str = "histomoe") -> list[Path]:
    """PNG maps over the thumbnail: each of ``genes``, the dominant expert, and the uncertainty."""
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    xy = np.asarray(adata.obsm["spatial"]) / downsample
    written = []
    layers = [(g, np.asarray(adata[:, g].X).ravel(), "viridis") for g in genes]
    if adata.obs["uncertainty"].notna().any():
        layers.append(("uncertainty", adata.obs["uncertainty"].to_numpy(), "magma"))
    layers.append(("novelty", adata.obs["novelty"].to_numpy(), "magma"))
    for name, values, cmap in layers:
        fig, ax = _canvas(thumb, f"{name} (predicted)" if name in genes else name)
        sc = ax.scatter(xy[:, 0], xy[:, 1], c=values, s=_marker(adata, downsample, spot_px, ax), marker="s",
                        cmap=cmap, alpha=0.8, linewidths=0)
        fig.colorbar(sc, ax=ax, fraction=0.035)
        written.append(_save(fig, out / f"{_safe(name)}.png"))
        plt.close(fig)
    col = f"{key}_expert"
    if col in adata.obs:
        cats = list(adata.obs[col].cat.categories)
        cmap = plt.get_cmap("tab10")
        fig, ax = _canvas(thumb, "dominant expert")
        codes = adata.obs[col].cat.codes.to_numpy()
        for i, c in enumerate(cats):
            m = codes == i
            if m.any():
                ax.scatter(xy[m, 0], xy[m, 1], color=cmap(i % 10), s=_marker(adata, downsample, spot_px, ax),
                           marker="s", alpha=0.8, linewidths=0, label=c)
        ax.legend(loc="upper right", fontsize=7, markerscale=0.5, frameon=True)
        written.append(_save(fig, out / "dominant_expert.png"))
        plt.close(fig)
    return written


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def _save(fig, path: Path) -> Path:
    fig.savefig(path, bbox_inches="tight")
    return path


def write_outputs(pred, out: Path, *, genes: Sequence[str] | None = None, n_genes: int = 4, zarr: bool = True,
                  maps: bool = True, overwrite: bool = False) -> dict[str, Path]:
    """Write ``predictions.h5ad``, ``predictions.zarr`` and ``maps/*.png`` for a
    :class:`~histomoe_core.slide.predict.SlidePrediction` into the folder ``out`` (atomically)."""
    from histomoe_core import cache

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (overwrite or (out / H5AD).exists()):
        raise DataError(f"{out} exists and is not a prediction folder; choose another --out")
    adata = pred.adata
    genes = list(genes) if genes else list(adata.var_names[:n_genes])
    unknown = [g for g in genes if g not in adata.var_names]
    if unknown:
        raise DataError(f"--genes {unknown} are not in the bundle's panel; e.g. {', '.join(adata.var_names[:8])}")
    spot_px = float(pred.info["crop_px"])
    lib = pred.info["name"]
    with_scanpy_image(adata, pred.thumbnail, pred.downsample, spot_px, lib)
    with cache.atomic_dir(out) as tmp:
        adata.write_h5ad(tmp / H5AD)
        if zarr:
            write_spatialdata(adata, pred.thumbnail, pred.downsample, spot_px, tmp / ZARR)
        if maps:
            plot_maps(adata, pred.thumbnail, pred.downsample, spot_px, tmp / MAPS, genes=genes)
    files = {"h5ad": out / H5AD, "maps": out / MAPS}
    if zarr:
        files["zarr"] = out / ZARR
    return files
