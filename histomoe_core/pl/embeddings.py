"""Figures for chapter 02: UMAP of spot embeddings, embedding PCs over the tissue, encoders compared."""
from __future__ import annotations

from typing import Sequence

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from histomoe_core.pl import style
from histomoe_core.data.sample import Sample
from histomoe_core.pl.spatial import category_palette


def umap(adata: ad.AnnData, *, color: Sequence[str] = ("section",), size: float = 3.0, point: float = 6.0,
         title: str | None = None) -> Figure:
    """One panel per ``obs`` column in ``color`` over ``obsm["X_umap"]`` (categories get a legend, numbers a colour bar)."""
    if "X_umap" not in adata.obsm:
        raise ValueError("no obsm['X_umap']; run histomoe_core.embed_eval.umap(adata) first")
    xy = adata.obsm["X_umap"]
    ncols = min(len(color), style.max_columns(size + 1.5))  # panels wrap to the text column (legend right of each)
    nrows = -(-len(color) // ncols)
    fig, grid = style.subplots(nrows, ncols, figsize=((size + 1.5) * ncols, (size + 0.3) * nrows), squeeze=False)
    for ax in grid.flat[len(color):]:
        ax.set_axis_off()
    axes = grid.reshape(1, -1)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(xy))  # no group is drawn entirely on top
    for ax, key in zip(axes[0], color):
        v = adata.obs[key]
        if isinstance(v.dtype, pd.CategoricalDtype) or v.dtype == object:
            cats = list(v.astype("category").cat.categories)
            colours = list(category_palette(cats).values())
            codes = v.astype("category").cat.codes.to_numpy()
            ax.scatter(xy[order, 0], xy[order, 1], c=[colours[c] for c in codes[order]], s=point, linewidths=0)
            for c, colour in zip(cats, colours):
                ax.scatter([], [], color=colour, label=str(c), s=20)
            ax.legend(frameon=False, fontsize=style.SMALL_PT, loc="center left", bbox_to_anchor=(1.0, 0.5), markerscale=1.2,
                      ncols=1 if len(cats) <= 12 else 2, columnspacing=0.6, handletextpad=0.2)
        else:
            vals = v.to_numpy(float)
            lo, hi = np.nanpercentile(vals, [1, 99])
            sc = ax.scatter(xy[order, 0], xy[order, 1], c=vals[order], cmap="viridis", vmin=lo, vmax=hi, s=point,
                            linewidths=0)
            fig.colorbar(sc, ax=ax, shrink=0.7, label=adata.uns.get("embedding_targets", {}).get("kind", ""))
        ax.set_title(key)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("UMAP 1")
        ax.set_ylabel("UMAP 2")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def embedding_pcs(samples: Sequence[Sample], adata: ad.AnnData, *, pcs: Sequence[int] = (0, 1),
                  size: float = 2.4) -> Figure:
    """Principal components of each section's own embeddings (``obsm["X_emb"]``) drawn over its H&E.

    The PCA is per section, so the maps show what varies *within* the section, not between sections."""
    from histomoe_core.pl.spatial import grid_spot_um, spatial_scatter, thumbnail

    # sections side by side (as many as fit the column, with their colour bars), one row per PC; more sections wrap
    ncols = min(len(samples), style.max_columns(size + 0.7))
    blocks = -(-len(samples) // ncols)
    fig, grid = style.subplots(len(pcs) * blocks, ncols, figsize=((size + 0.7) * ncols, (size + 0.4) * len(pcs) * blocks),
                               squeeze=False)
    for ax in grid.flat:
        ax.set_axis_off()
    axes = {(r, c): grid[(c // ncols) * len(pcs) + r, c % ncols] for r in range(len(pcs)) for c in range(len(samples))}
    section = adata.obs["section"].astype(str).to_numpy()
    for c, s in enumerate(samples):
        m = section == s.sample_id
        x = adata.obsm["X_emb"][m].astype(np.float64)
        x = (x - x.mean(0)) / np.maximum(x.std(0), 1e-6)
        u, sv, _ = np.linalg.svd(x - x.mean(0), full_matrices=False)
        share = sv**2 / (sv**2).sum()
        names = adata.obs_names[m].str.rsplit("@", n=1).str[0]
        rows = s.adata.obs_names.get_indexer(names)
        image = thumbnail(s)
        for r, k in enumerate(pcs):
            full = np.full(s.n_spots, np.nan)
            full[rows] = u[:, k] * sv[k]
            lo, hi = np.nanpercentile(full, [2, 98])
            spatial_scatter(s, full, ax=axes[r, c], image=image, spot_um=grid_spot_um(s), vmin=lo, vmax=hi,
                            cmap="coolwarm", colorbar=True, image_alpha=0.5,
                            title=f"{s.sample_id}\nPC{k + 1} ({share[k]:.0%} of variance)")
            axes[r, c].title.set_fontsize(9)
    fig.tight_layout()
    return fig


def encoder_comparison(results: pd.DataFrame, *, metric: str = "pearson", size: float = 3.6) -> Figure:
    """Per target kind: the mean ``metric`` over folds per encoder (bar) with each fold (dot)."""
    kinds = list(pd.unique(results["target"]))
    encoders = list(pd.unique(results["encoder"]))
    fig, axes = style.subplots(1, len(kinds), figsize=(size * len(kinds), size), squeeze=False, sharey=True)
    colors = {e: ("tab:blue" if bool(results.loc[results["encoder"] == e, "pretrained"].iloc[0]) else "tab:gray")
              for e in encoders}
    for ax, kind in zip(axes[0], kinds):
        part = results[results["target"] == kind]
        means = part.groupby("encoder", sort=False)[metric].mean().reindex(encoders)
        ax.bar(range(len(encoders)), means.to_numpy(), color=[colors[e] for e in encoders], alpha=0.6)
        for i, e in enumerate(encoders):
            vals = part.loc[part["encoder"] == e, metric].to_numpy()
            ax.scatter(np.full(len(vals), i) + np.linspace(-0.15, 0.15, len(vals)), vals, color="black", s=14, zorder=3)
        ax.set_xticks(range(len(encoders)))
        ax.set_xticklabels(encoders, rotation=20, ha="right", fontsize=8)
        ax.axhline(0, color="black", lw=0.6)
        ax.set_title(f"target {kind}")
        ax.set_ylabel(f"{metric} (test patient)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c, alpha=0.6) for c in ("tab:blue", "tab:gray")]
    axes[0, -1].legend(handles, ["pretrained", "random init"], frameon=False, fontsize=8)
    fig.tight_layout()
    return fig
