"""Values at spots drawn over the H&E image of a sample."""
from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

from histomoe_core.data.patches import load_image
from histomoe_core.data.sample import Sample

#: longest side of the image thumbnail drawn under spots
THUMB_PX = 1200


def thumbnail(sample: Sample, *, max_px: int = THUMB_PX) -> tuple[np.ndarray, float]:
    """A downscaled RGB image of the sample and the factor from image pixels to thumbnail pixels."""
    img = load_image(sample.image_path)
    f = min(1.0, max_px / max(img.shape[:2]))
    if f < 1.0:
        img = np.asarray(Image.fromarray(img).resize((int(img.shape[1] * f), int(img.shape[0] * f)), Image.BILINEAR))
    return img, f


def grid_spot_um(sample: Sample, *, fill: float = 0.85) -> float:
    """A drawn spot diameter (um) that fills ``fill`` of the spot grid pitch (median nearest-neighbour distance),
    so per-spot colours stay readable at figure size (the measured spot itself may be smaller)."""
    from scipy.spatial import cKDTree

    xy = sample.coords
    if len(xy) < 2:
        return 100.0
    d, _ = cKDTree(xy).query(xy, 2)
    return float(fill * np.median(d[:, 1]) * sample.pixel_size_um)


def spatial_scatter(
    sample: Sample,
    values: Sequence | np.ndarray | None = None,
    *,
    ax: plt.Axes | None = None,
    title: str | None = None,
    cmap: str = "viridis",
    categorical: bool = False,
    spot_um: float = 100.0,
    alpha: float = 0.85,
    image: tuple[np.ndarray, float] | None = None,
    colorbar: bool = True,
    crop: bool = True,
    vmin: float | None = None,
    vmax: float | None = None,
    palette: dict[str, str] | None = None,
    legend: bool = True,
    image_alpha: float = 1.0,
) -> plt.Axes:
    """Draw ``values`` (one per spot; outlines only when None) over the sample's H&E thumbnail.

    ``spot_um`` sets the drawn spot diameter in micrometres; pass ``image=thumbnail(sample)`` to reuse a
    decoded thumbnail across several panels. ``vmin``/``vmax`` fix the colour range of continuous values;
    ``palette`` maps category -> colour so categories keep their colour across panels (category order follows
    a pandas Categorical's categories, else sorted values). ``image_alpha`` < 1 fades the H&E under the spots.
    """
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 5))
    img, f = image if image is not None else thumbnail(sample)
    xy = sample.coords * f
    ax.imshow(img, alpha=image_alpha)
    diameter_px = spot_um / sample.pixel_size_um * f
    size = (diameter_px * 72 / ax.figure.dpi) ** 2 * _axes_scale(ax, img)
    if values is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=size, facecolors="none", edgecolors="black", linewidths=0.6)
    elif categorical:
        cats = np.asarray(values).astype(str)
        declared = getattr(getattr(values, "cat", values), "categories", None)
        levels = [str(c) for c in declared if str(c) in set(cats)] if declared is not None else sorted(set(cats))
        colors = plt.get_cmap("tab10" if len(levels) <= 10 else "tab20")
        for i, lev in enumerate(levels):
            m = cats == lev
            color = palette[lev] if palette is not None and lev in palette else colors(i % colors.N)
            ax.scatter(xy[m, 0], xy[m, 1], s=size, color=color, alpha=alpha, label=lev, linewidths=0)
        if legend:
            ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, fontsize=8, markerscale=0.5)
    else:
        sc = ax.scatter(xy[:, 0], xy[:, 1], c=np.asarray(values, dtype=float), s=size, cmap=cmap, alpha=alpha,
                        linewidths=0, vmin=vmin, vmax=vmax)
        if colorbar:
            ax.figure.colorbar(sc, ax=ax, fraction=0.046, pad=0.02)
    if crop:
        pad = diameter_px * 2
        ax.set_xlim(max(xy[:, 0].min() - pad, 0), min(xy[:, 0].max() + pad, img.shape[1]))
        ax.set_ylim(min(xy[:, 1].max() + pad, img.shape[0]), max(xy[:, 1].min() - pad, 0))
    ax.set_axis_off()
    ax.set_title(title if title is not None else sample.sample_id, fontsize=10)
    return ax


def _axes_scale(ax: plt.Axes, img: np.ndarray) -> float:
    """Rough factor from image pixels to points for the axes' current size (marker areas are in points^2)."""
    bbox = ax.get_window_extent().transformed(ax.figure.dpi_scale_trans.inverted())
    inches_per_px = min(bbox.width / img.shape[1], bbox.height / img.shape[0])
    return (inches_per_px * ax.figure.dpi) ** 2
