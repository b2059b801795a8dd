"""Figures comparing several datasets before anything is pooled: every section with its spots, and a patch
montage per tissue context (what the encoder sees at a fixed physical size, whatever the pixel size)."""
from __future__ import annotations

from typing import Mapping

import matplotlib.pyplot as plt
import numpy as np

from histomoe_core.pl import style
from histomoe_core.data.patches import PatchSpec, iter_patches
from histomoe_core.data.sample import Sample, SampleSet
from histomoe_core.data.summary import context_of
from histomoe_core.pl.spatial import spatial_scatter, thumbnail

#: thumbnails here are small panels: decode slides at this size at most
OVERVIEW_THUMB_PX = 600


def _all(datasets: Mapping[str, SampleSet]) -> list[tuple[str, Sample]]:
    return [(name, s) for name, ss in datasets.items() for s in ss]


def section_grid(datasets: Mapping[str, SampleSet], *, ncols: int = 6, size: float = 2.6,
                 spec: PatchSpec = PatchSpec()) -> plt.Figure:
    """Every section's H&E thumbnail with its spots at their physical size; the title gives dataset, section,
    spots, µm/px and the source pixels across a ``spec.size_um`` patch."""
    items = _all(datasets)
    ncols = max(1, min(ncols, len(items), style.max_columns(size)))
    nrows = int(np.ceil(len(items) / ncols))
    fig, axes = style.subplots(nrows, ncols, figsize=(size * ncols, size * 1.15 * nrows), squeeze=False)
    for ax in axes.ravel()[len(items):]:
        ax.set_axis_off()
    for (name, s), ax in zip(items, axes.ravel()):
        title = (f"{name}\n{s.sample_id}: {s.n_spots} spots\n{s.pixel_size_um:.2f} µm/px, "
                 f"patch {spec.crop_px(s.pixel_size_um)} px")
        spatial_scatter(s, None, ax=ax, spot_um=float(s.meta.get("spot_um", 100.0)),
                        image=thumbnail(s, max_px=OVERVIEW_THUMB_PX), title=title)
        ax.title.set_fontsize(style.SMALL_PT)
    fig.tight_layout()
    return fig


def context_montage(datasets: Mapping[str, SampleSet], *, n: int = 8, spec: PatchSpec = PatchSpec(out_px=96),
                    seed: int = 0) -> plt.Figure:
    """One row per tissue context: ``n`` random ``spec.size_um`` patches from its finest-resolution section."""
    first: dict[str, Sample] = {}
    for _, s in _all(datasets):
        c = context_of(s)
        if c not in first or s.pixel_size_um < first[c].pixel_size_um:
            first[c] = s
    rng = np.random.default_rng(seed)
    fig, axes = style.subplots(len(first), n, figsize=(1.1 * n + 2.6, 1.15 * len(first)), squeeze=False)
    for row, (context, s) in zip(axes, first.items()):
        idx = np.sort(rng.choice(s.n_spots, size=min(n, s.n_spots), replace=False))
        patches = np.concatenate([b for _, b in iter_patches(s, spec, indices=idx)])
        for ax in row:
            ax.set_axis_off()
        for ax, p in zip(row, patches):
            ax.imshow(p)
        row[0].text(-0.1, 0.5, f"{context}\n({s.sample_id}, {spec.crop_px(s.pixel_size_um)} px)", transform=row[0].transAxes,
                    ha="right", va="center", fontsize=style.SMALL_PT)
    fig.suptitle(f"{spec.size_um:g} µm patches per tissue context", fontsize=9)
    fig.tight_layout()
    return fig
