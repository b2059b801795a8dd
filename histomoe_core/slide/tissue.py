"""Tissue detection on a slide thumbnail and the grid of spots over it.

:func:`tissue_mask`: Otsu's threshold (scikit-image) on the thumbnail's saturation separates stained tissue from
glass; pixels darker than ``dark`` (pen marks, slide edges) are dropped; then small objects are removed, gaps
closed and small holes filled, each size given in micrometres so the result does not depend on the thumbnail
scale. :func:`grid_spots` lays spot centres at the patch spacing and keeps those over tissue.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from histomoe_core.errors import DataError


@dataclass(frozen=True)
class TissueParams:
    """Tissue detection settings (all exposed on the command line)."""

    thumb_px: int = 2048  #: longest side of the thumbnail the mask is computed on
    min_saturation: float = 0.05  #: the Otsu threshold is never below this (blank glass has noise)
    dark: float = 0.1  #: value (HSV) below which a pixel is not tissue (ink, edges)
    min_object_um2: float = 50_000.0  #: tissue pieces smaller than this are dropped
    hole_um2: float = 50_000.0  #: holes smaller than this are filled
    closing_um: float = 50.0  #: radius of the closing that joins nearby tissue
    min_tissue: float = 0.5  #: a grid spot is kept when this share of its patch is tissue

    def as_dict(self) -> dict:
        return asdict(self)


def tissue_mask(thumb: np.ndarray, um_per_thumb_px: float, params: TissueParams = TissueParams()) -> np.ndarray:
    """Boolean tissue mask of an RGB uint8 thumbnail whose pixels are ``um_per_thumb_px`` wide.

    The morphology runs on blocks of the thumbnail about an eighth of the closing radius wide (fast at any
    thumbnail size), and the mask is returned at the thumbnail's own size."""
    from skimage import filters, morphology

    sat, val = saturation_value(thumb)
    if float(sat.max() - sat.min()) < 1e-3:
        return np.zeros(sat.shape, bool)
    thr = max(float(filters.threshold_otsu(sat)), params.min_saturation)
    fine = (sat > thr) & (val > params.dark)
    f = max(1, int(params.closing_um / 8 / um_per_thumb_px))
    mask = _block_mean(fine, f) > 0.5
    um = um_per_thumb_px * f
    radius = int(round(params.closing_um / um))
    if radius >= 1:
        mask = morphology.closing(mask, morphology.disk(radius, decomposition="sequence")).astype(bool)
    mask = morphology.remove_small_objects(mask, max_size=max(int(params.min_object_um2 / um**2), 1))
    mask = morphology.remove_small_holes(mask, max_size=max(int(params.hole_um2 / um**2), 1))
    return mask.repeat(f, 0).repeat(f, 1)[: fine.shape[0], : fine.shape[1]] if f > 1 else mask


def saturation_value(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HSV saturation and value (float32 in [0, 1]) of an RGB uint8 image, as ``skimage.color.rgb2hsv`` computes
    them, without its float64 copy of every channel."""
    mx = rgb.max(axis=2).astype(np.float32)
    mn = rgb.min(axis=2).astype(np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        sat = np.where(mx > 0, (mx - mn) / mx, 0.0).astype(np.float32)
    return sat, mx / 255.0


def _block_mean(a: np.ndarray, f: int) -> np.ndarray:
    """Mean over ``f`` x ``f`` blocks (edge blocks padded with zeros)."""
    if f == 1:
        return a.astype(float)
    h, w = -(-a.shape[0] // f) * f, -(-a.shape[1] // f) * f
    p = np.zeros((h, w), float)
    p[: a.shape[0], : a.shape[1]] = a
    return p.reshape(h // f, f, w // f, f).mean((1, 3))


def grid_spots(mask: np.ndarray, downsample: float, size: tuple[int, int], step_px: float, *,
               min_tissue: float = 0.5) -> pd.DataFrame:
    """Spot centres (level-0 px) every ``step_px`` over the slide of ``size`` whose patch is at least
    ``min_tissue`` tissue in ``mask`` (a thumbnail mask at ``downsample``); index ``r{row}_c{col}``."""
    w, h = size
    nx, ny = int(w // step_px), int(h // step_px)
    if nx < 1 or ny < 1:
        raise DataError(f"the slide ({w}x{h} px) is smaller than one patch ({step_px:.0f} px); check --um-per-px")
    cx = (np.arange(nx) + 0.5) * step_px
    cy = (np.arange(ny) + 0.5) * step_px
    frac = _cell_fraction(mask, downsample, step_px, nx, ny)
    rows, cols = np.nonzero(frac >= min_tissue)
    return pd.DataFrame({"x": cx[cols], "y": cy[rows], "grid_row": rows, "grid_col": cols,
                         "tissue_frac": frac[rows, cols]},
                        index=pd.Index([f"r{r}_c{c}" for r, c in zip(rows, cols)], name="spot"))


def _cell_fraction(mask: np.ndarray, downsample: float, step_px: float, nx: int, ny: int) -> np.ndarray:
    """Share of tissue in each grid cell (mean of the mask pixels whose centre falls in the cell)."""
    my, mx = mask.shape
    row_cell = np.minimum(((np.arange(my) + 0.5) * downsample // step_px).astype(int), ny)
    col_cell = np.minimum(((np.arange(mx) + 0.5) * downsample // step_px).astype(int), nx)
    tot = np.zeros((ny + 1, nx + 1))
    cnt = np.zeros((ny + 1, nx + 1))
    rr, cc = np.meshgrid(row_cell, col_cell, indexing="ij")
    np.add.at(tot, (rr.ravel(), cc.ravel()), mask.ravel().astype(float))
    np.add.at(cnt, (rr.ravel(), cc.ravel()), 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(cnt > 0, tot / cnt, 0.0)
    if (cnt[:ny, :nx] == 0).any():  # cells smaller than a thumbnail pixel: read the pixel under the centre
        cy = np.minimum(((np.arange(ny) + 0.5) * step_px / downsample).astype(int), my - 1)
        cx = np.minimum(((np.arange(nx) + 0.5) * step_px / downsample).astype(int), mx - 1)
        centre = mask[np.ix_(cy, cx)].astype(float)
        frac[:ny, :nx] = np.where(cnt[:ny, :nx] > 0, frac[:ny, :nx], centre)
    return frac[:ny, :nx]
