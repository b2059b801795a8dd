"""Values at spots drawn over the H&E image of a sample."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.collections import EllipseCollection
from matplotlib.colors import Normalize
from matplotlib.lines import Line2D
from PIL import Image, UnidentifiedImageError

from histomoe_core.pl import style
from histomoe_core.data.patches import load_image
from histomoe_core.data.sample import Sample

#: longest side of the image thumbnail drawn under spots
THUMB_PX = 1200


def thumbnail(sample: Sample, *, max_px: int = THUMB_PX) -> tuple[np.ndarray, float]:
    """A downscaled RGB image of the sample (read-only, memoised per image file) and the factor from image
    pixels to thumbnail pixels. JPEGs are decoded directly at a reduced scale, which is much faster for slides."""
    path = Path(sample.image_path)
    if not path.exists():
        load_image(path)  # raises the clear missing-file error
    return _thumbnail(str(path), path.stat().st_mtime_ns, max_px)


@lru_cache(maxsize=16)
def _thumbnail(path: str, mtime_ns: int, max_px: int) -> tuple[np.ndarray, float]:
    if Path(path).suffix.lower() in (".jpg", ".jpeg"):
        try:
            with Image.open(path) as im:
                w, h = im.size
                f = min(1.0, max_px / max(w, h))
                size = (int(w * f), int(h * f))
                im.draft("RGB", size)  # let the JPEG decoder skip detail (1/2, 1/4 or 1/8 scale)
                img = np.asarray(im.convert("RGB").resize(size, Image.BILINEAR))
        except (UnidentifiedImageError, OSError, ValueError):
            img, f = _resized(load_image(Path(path)), max_px)  # load_image raises the clear error
    else:
        img, f = _resized(load_image(Path(path)), max_px)
    img.flags.writeable = False
    return img, f


def _resized(img: np.ndarray, max_px: int) -> tuple[np.ndarray, float]:
    f = min(1.0, max_px / max(img.shape[:2]))
    if f < 1.0:
        img = np.asarray(Image.fromarray(img).resize((int(img.shape[1] * f), int(img.shape[0] * f)), Image.BILINEAR))
    return img, f


def category_palette(levels: Sequence) -> dict[str, tuple]:
    """One fixed colour per category, in order (tab10, or tab20 beyond ten), shared by every figure."""
    cmap = plt.get_cmap("tab10" if len(levels) <= 10 else "tab20")
    return {str(c): cmap(i % cmap.N) for i, c in enumerate(levels)}


def grid_spot_um(sample: Sample, *, fill: float = 0.85) -> float:
    """A drawn spot diameter (µm) that fills ``fill`` of the spot grid pitch (median nearest-neighbour distance),
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
        _, ax = style.subplots(figsize=(5, 5))
    img, f = image if image is not None else thumbnail(sample)
    xy = sample.coords * f
    ax.imshow(img, alpha=image_alpha)
    diameter_px = spot_um / sample.pixel_size_um * f
    if values is None:
        _spots(ax, xy, diameter_px, facecolors="none", edgecolors="black", linewidths=0.6)
    elif categorical:
        cats = np.asarray(values).astype(str)
        declared = getattr(getattr(values, "cat", values), "categories", None)
        levels = [str(c) for c in declared if str(c) in set(cats)] if declared is not None else sorted(set(cats))
        colors = {**category_palette(levels), **(palette or {})}
        handles = []
        for lev in levels:
            m = cats == lev
            color = colors[lev]
            _spots(ax, xy[m], diameter_px, facecolors=color, alpha=alpha, linewidths=0)
            handles.append(Line2D([], [], ls="", marker="o", color=color, label=lev))
        if legend:
            ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, fontsize=8)
    else:
        v = np.asarray(values, dtype=float)
        sc = _spots(ax, xy, diameter_px, alpha=alpha, linewidths=0)
        sc.set_array(v)
        sc.set_cmap(cmap)
        sc.set_norm(Normalize(vmin=np.nanmin(v) if vmin is None else vmin, vmax=np.nanmax(v) if vmax is None else vmax))
        if colorbar:
            ax.figure.colorbar(sc, ax=ax, fraction=0.046, pad=0.02)
    if crop:
        pad = diameter_px * 2
        ax.set_xlim(max(xy[:, 0].min() - pad, 0), min(xy[:, 0].max() + pad, img.shape[1]))
        ax.set_ylim(min(xy[:, 1].max() + pad, img.shape[0]), max(xy[:, 1].min() - pad, 0))
    ax.set_axis_off()
    ax.set_title(title if title is not None else sample.sample_id, fontsize=10)
    return ax


def _spots(ax: plt.Axes, xy: np.ndarray, diameter_px: float, **style) -> EllipseCollection:
    """Circles of ``diameter_px`` image pixels at ``xy``, sized in data units, so they keep their size on the
    tissue whatever the final figure layout (colorbars, tight_layout, saving at another dpi)."""
    d = np.full(len(xy), diameter_px)
    coll = EllipseCollection(d, d, np.zeros(len(xy)), units="xy", offsets=xy, offset_transform=ax.transData, **style)
    ax.add_collection(coll)
    return coll
