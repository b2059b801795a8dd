"""Routing figures: expert usage per context, gate entropy, agreement with labels, expert maps over the H&E,
and the genes each expert predicts differently. Every function reads the slots written by ``tl.predict``
and returns a matplotlib Figure."""
from __future__ import annotations

from typing import Sequence

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from histomoe_core.pl import style
from histomoe_core.data.sample import Sample
from histomoe_core.pl.spatial import category_palette, grid_spot_um, spatial_scatter, thumbnail
from histomoe_core.tl import routing as rt
from histomoe_core.tl.slots import section_index, slot_names


#: H&E opacity under coloured spots (faded so the colours read)
IMAGE_ALPHA = 0.55


def map_style(sample: Sample) -> dict:
    """Keyword arguments for ``spatial_scatter`` value maps: spots drawn at 85% of the grid pitch over a faded H&E."""
    return {"spot_um": grid_spot_um(sample), "image_alpha": IMAGE_ALPHA, "alpha": 0.95}


#: experts get their own palette, never the one of tissue regions / cell types (``category_palette``, tab10), so
#: an expert map and a label map side by side do not suggest a match by colour
EXPERT_CMAP = "Dark2"


def expert_palette(experts: Sequence[str]) -> dict[str, tuple]:
    """One fixed colour per expert (Dark2 order; tab20b beyond 8), shared by every routing figure."""
    cmap = plt.get_cmap(EXPERT_CMAP if len(experts) <= 8 else "tab20b")
    return {str(e): cmap(i % cmap.N) for i, e in enumerate(experts)}


def _experts(adata: ad.AnnData, key: str) -> list[str]:
    return [str(e) for e in adata.uns[key]["experts"]]


def _label_in(labels) -> float:
    """Inches taken by the longest tick label (7 pt characters)."""
    return 0.07 * max((len(str(v)) for v in labels), default=0)


def _heatmap(ax: plt.Axes, table: pd.DataFrame, *, cmap: str, fmt: str, vmin=None, vmax=None, label: str = "") -> None:
    im = ax.imshow(table.to_numpy(float), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(table.shape[1]), [str(c) for c in table.columns], rotation=45, ha="right")
    ax.set_yticks(range(table.shape[0]), [str(i) for i in table.index])
    ax.set_xlabel(table.columns.name or "")
    ax.set_ylabel(table.index.name or "")
    if fmt and table.size <= 400:
        for (i, j), v in np.ndenumerate(table.to_numpy(float)):
            if np.isfinite(v):
                ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=style.SMALL_PT,
                        color=style.text_colour(im.cmap(im.norm(v))))
    ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.02, label=label)


def expert_usage(adata: ad.AnnData, *, groupby: str = "sample_id", key: str = "histomoe", kind: str = "mean_gate",
                 title: str | None = None) -> Figure:
    """Heatmap of expert usage (mean gate weight, or share of dominated spots) per ``obs[groupby]`` value."""
    table = rt.expert_usage(adata, groupby=groupby, key=key, kind=kind)
    table.index.name = groupby
    fig, ax = style.subplots(figsize=(_label_in(table.index) + 1.6 + 0.75 * table.shape[1], 1.2 + 0.4 * table.shape[0]),
                           constrained_layout=True)
    _heatmap(ax, table, cmap="viridis", fmt=".2f", vmin=0, vmax=1,
             label="mean gate weight" if kind == "mean_gate" else "share of spots dominated")
    ax.set_title(title or f"Expert usage per {groupby}", fontsize=10)
    return fig


def gate_entropy(adata: ad.AnnData, *, groupby: str | None = "sample_id", key: str = "histomoe", bins: int = 20) -> Figure:
    """Distribution of the normalised gate entropy (0 = one expert per spot, 1 = uniform), per group."""
    h = adata.obs[slot_names(key)["entropy"]].to_numpy(float)
    groups = adata.obs[groupby].astype(str).to_numpy() if groupby else np.full(len(h), "all spots")
    levels = sorted(set(groups))
    fig, ax = style.subplots(figsize=(max(4.0, 0.7 * len(levels) + 2), 3.2), constrained_layout=True)
    data = [h[groups == g] for g in levels]
    parts = ax.violinplot(data, showmedians=True, widths=0.8)
    for body in parts["bodies"]:
        body.set_alpha(0.5)
    rotate = len(levels) > 6 or max(len(v) for v in levels) > 8
    ax.set_xticks(range(1, len(levels) + 1), levels, rotation=30 if rotate else 0, ha="right" if rotate else "center")
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("gate entropy / log(E)")
    ax.set_xlabel(groupby or "")
    n_exp = len(_experts(adata, key))
    ax.set_title(f"Gate entropy ({n_exp} experts): 0 = one expert, 1 = uniform; median {np.median(h):.2f}", fontsize=10)
    return fig


def contingency(adata: ad.AnnData, labels: str, *, key: str = "histomoe", normalize: bool = True,
                title: str | None = None) -> Figure:
    """Labels x dominant expert table (row-normalised when ``normalize``), with NMI and ARI in the title."""
    agr = rt.routing_agreement(adata, labels, key=key)
    table = agr.table.reindex(columns=[e for e in _experts(adata, key) if e in agr.table.columns])
    counts = table.sum(axis=1)
    shown = table.div(counts.replace(0, 1), axis=0) if normalize else table
    shown.index = [f"{i} (n={int(c)})" for i, c in zip(table.index, counts)]
    shown.index.name, shown.columns.name = labels, "dominant expert"
    width = max(_label_in(shown.index) + 1.6 + 0.75 * shown.shape[1], 5.5)
    fig, ax = style.subplots(figsize=(width, 1.4 + 0.4 * shown.shape[0]), constrained_layout=True)
    _heatmap(ax, shown, cmap="Blues", fmt=".2f" if normalize else "d", vmin=0, vmax=1 if normalize else None,
             label="share of the label's spots" if normalize else "spots")
    ax.set_title((title + "\n" if title else "") + f"dominant expert vs {labels}\nNMI {agr.nmi:.2f}, ARI {agr.ari:.2f}",
                 fontsize=10)
    return fig


def expert_map(adata: ad.AnnData, sample: Sample, *, key: str = "histomoe", labels: str | None = None,
               image: tuple[np.ndarray, float] | None = None) -> Figure:
    """Dominant expert per spot over the H&E (beside the H&E alone and, with ``labels``, the label map)."""
    rows = section_index(adata, sample)
    image = image or thumbnail(sample)
    experts = _experts(adata, key)
    dom = pd.Categorical(adata.obs[slot_names(key)["expert"]].astype(str).to_numpy()[rows], categories=experts)
    n = 3 if labels else 2
    fig, axes = style.subplots(1, n, figsize=(3.3 * n, 3.4), constrained_layout=True)
    spatial_scatter(sample, None, ax=axes[0], image=image, title=f"{sample.sample_id}: H&E")
    spatial_scatter(sample, dom, ax=axes[1], categorical=True, image=image, palette=expert_palette(experts),
                    title="dominant expert", **map_style(sample))
    if labels:
        lab = adata.obs[labels].astype(object).to_numpy()[rows]
        lab = np.where(pd.isna(lab), "unlabelled", lab).astype(str)
        spatial_scatter(sample, lab, ax=axes[2], categorical=True, image=image, title=labels, **map_style(sample))
    return fig


def gate_maps(adata: ad.AnnData, sample: Sample, *, key: str = "histomoe", experts: Sequence[str] | None = None,
              image: tuple[np.ndarray, float] | None = None, ncols: int = 4,
              limits: tuple[float, float] | None = None) -> Figure:
    """One panel per expert: its gate weight at every spot over the H&E, on one colour scale shared by all
    panels: ``limits`` (e.g. ``(0, 1)``), or by default the range of the gate weights shown."""
    rows = section_index(adata, sample)
    names = _experts(adata, key)
    chosen = list(experts) if experts is not None else names
    gates = np.asarray(adata.obsm[slot_names(key)["gates"]])[rows]
    image = image or thumbnail(sample)
    ncols = min(ncols, len(chosen))
    nrows = int(np.ceil(len(chosen) / ncols))
    fig, axes = style.subplots(nrows, ncols, figsize=(3.6 * ncols, 3.5 * nrows), constrained_layout=True, squeeze=False)
    cols = [names.index(e) for e in chosen]
    lo, hi = limits if limits is not None else (float(gates[:, cols].min()), float(gates[:, cols].max()))
    hi = hi if hi > lo else lo + 1e-6
    for ax, e in zip(axes.flat, chosen):
        g = gates[:, names.index(e)]
        spatial_scatter(sample, g, ax=ax, image=image, cmap="magma", vmin=lo, vmax=hi, colorbar=False,
                        title=f"{e}: gate weight (mean {g.mean():.2f})", **map_style(sample))
    for ax in axes.flat[len(chosen):]:
        ax.set_axis_off()
    sm = plt.cm.ScalarMappable(norm=plt.Normalize(lo, hi), cmap="magma")
    fig.colorbar(sm, ax=axes, fraction=0.02, pad=0.01, label="gate weight")
    fig.suptitle(f"{sample.sample_id}: where each expert is used", fontsize=11)
    return fig


def expert_genes(adata: ad.AnnData, *, key: str = "histomoe", n_top: int = 15, title: str | None = None) -> Figure:
    """Genes x experts heatmap of how each expert's prediction differs from the other experts' (in s.d. of the
    gene's prediction), for the ``n_top`` genes with the largest difference."""
    table = rt.expert_genes(adata, key=key, n_top=n_top)
    lim = float(np.nanmax(np.abs(table.to_numpy()))) or 1.0
    fig, ax = style.subplots(figsize=(_label_in(table.index) + 1.6 + 0.75 * table.shape[1], 1.2 + 0.32 * table.shape[0]),
                           constrained_layout=True)
    _heatmap(ax, table, cmap="RdBu_r", fmt=".1f", vmin=-lim, vmax=lim, label="expert - others (s.d.)")
    ax.set_title(title or "Genes each expert predicts differently", fontsize=10)
    return fig


def expert_montage(samples, picks: pd.DataFrame, *, size_um: float = 112.0, out_px: int = 96) -> Figure:
    """One row per expert: the patches of the spots that pick it most strongly (``picks`` from
    :func:`histomoe_core.benchmark.routing.top_spots`: expert, sample, spot, context, gate), titled by context."""
    from histomoe_core.data.patches import PatchSpec, iter_patches

    spec = PatchSpec(size_um=size_um, out_px=out_px)
    experts = sorted(picks["expert"].unique())
    ncols = int(picks.groupby("expert").size().max())
    fig, axes = style.subplots(len(experts), ncols, figsize=(1.25 * ncols + 0.8, 1.45 * len(experts)), squeeze=False)
    images = {}
    for sid, part in picks.groupby("sample"):
        s = samples[sid]
        idx = np.flatnonzero(np.isin(np.asarray(s.adata.obs_names, dtype=str), part["spot"].to_numpy()))
        for i, batch in iter_patches(s, spec, indices=idx):
            images.update({(sid, str(s.adata.obs_names[j])): im for j, im in zip(i.tolist(), batch)})
    for r, e in enumerate(experts):
        rows = picks[picks["expert"] == e].reset_index(drop=True)
        for c in range(ncols):
            ax = axes[r, c]
            ax.set_axis_off()
            if c < len(rows) and (rows.loc[c, "sample"], rows.loc[c, "spot"]) in images:
                ax.imshow(images[(rows.loc[c, "sample"], rows.loc[c, "spot"])])
                ax.set_title(f"{rows.loc[c, 'context']}\ngate {rows.loc[c, 'gate']:.2f}", fontsize=style.SMALL_PT)
        axes[r, 0].text(-0.1, 0.5, f"expert {e}", transform=axes[r, 0].transAxes, ha="right", va="center", fontsize=9)
    fig.tight_layout()
    return fig
