"""The spatial context of one spot drawn over the H&E: its patch, the wider field of view and the neighbour
rings the :mod:`~histomoe_core.spatial_context` stage averages."""
from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Circle, Rectangle
from PIL import Image

from histomoe_core.pl import style
from histomoe_core.data.sample import Sample
from histomoe_core.spatial_context import WIDE_UM, neighbour_rings, ring_edges, section_coords_um


def spot_index(sample: Sample, spot: int | str) -> int:
    """Row of ``spot`` (an index or an obs name) in the sample."""
    if isinstance(spot, (int, np.integer)):
        return int(spot)
    return int(sample.adata.obs_names.get_loc(spot))


def _crop_um(sample: Sample, centre_px: np.ndarray, half_um: float) -> tuple[np.ndarray, tuple[float, ...]]:
    """The H&E square of half-width ``half_um`` around ``centre_px`` (white outside the image) and its extent
    in µm relative to the centre (for ``imshow``)."""
    half = int(round(half_um / sample.pixel_size_um))
    x0, y0 = (int(round(c)) - half for c in centre_px)
    with Image.open(sample.image_path) as im:
        crop = Image.new("RGB", (2 * half, 2 * half), (255, 255, 255))
        box = (max(x0, 0), max(y0, 0), min(x0 + 2 * half, im.size[0]), min(y0 + 2 * half, im.size[1]))
        if box[2] > box[0] and box[3] > box[1]:
            crop.paste(im.convert("RGB").crop(box), (box[0] - x0, box[1] - y0))
    s = sample.pixel_size_um
    ext = ((x0 - centre_px[0]) * s, (x0 + 2 * half - centre_px[0]) * s,
           (y0 + 2 * half - centre_px[1]) * s, (y0 - centre_px[1]) * s)
    return np.asarray(crop), ext


def neighbourhood(sample: Sample, spot: int | str, *, radius_um: float | Sequence[float] = 250.0,
                  wide_um: float | None = WIDE_UM, spot_um: float = 112.0, margin_um: float = 60.0,
                  ax: plt.Axes | None = None) -> Figure:
    """The neighbourhood of one spot: H&E around it, its ``spot_um`` patch, the ``wide_um`` field of view
    (None: not drawn), the ring edges of ``radius_um`` and the spots of each ring (coloured by ring; other
    spots as grey outlines), with axes in µm from the spot centre."""
    i = spot_index(sample, spot)
    edges = ring_edges(radius_um)
    xy = section_coords_um(sample)
    rel = xy - xy[i]
    half = max(edges[-1], (wide_um or 0) / 2, spot_um / 2) + margin_um
    img, ext = _crop_um(sample, sample.coords[i], half)
    if ax is None:
        _, ax = style.subplots(figsize=(5, 5))
    ax.imshow(img, extent=ext)
    rings = neighbour_rings(xy, edges)
    colours = plt.get_cmap("tab10")
    handles = []
    near = np.abs(rel).max(1) <= half
    ax.scatter(*rel[near].T, s=30, facecolors="none", edgecolors="0.4", linewidths=0.6)
    for k, w in enumerate(rings):
        members = w[i].indices
        ax.scatter(*rel[members].T, s=40, color=colours(k + 1), edgecolors="white", linewidths=0.5, zorder=3)
        ax.add_patch(Circle((0, 0), edges[k], fill=False, ls="--", lw=1, color=colours(k + 1)))
        handles.append(Line2D([], [], ls="", marker="o", color=colours(k + 1),
                              label=f"ring {k + 1}: {len(members)} spots <= {edges[k]:g} µm"))
    for size, colour, what in ((spot_um, "black", "spot"), (wide_um, colours(0), "wide")):
        if size:
            ax.add_patch(Rectangle((-size / 2, -size / 2), size, size, fill=False, lw=1.5, color=colour))
            handles.append(Line2D([], [], ls="-", color=colour, label=f"{what} patch {size:g} µm"))
    ax.scatter([0], [0], s=50, marker="x", color="black", zorder=4)
    ax.set_xlim(-half, half)
    ax.set_ylim(half, -half)
    ax.set_xlabel("µm")
    ax.set_title(f"{sample.sample_id} {sample.adata.obs_names[i]}", fontsize=10)
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False, fontsize=8)
    return ax.figure
