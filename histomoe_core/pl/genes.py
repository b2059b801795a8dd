"""Gene-level figures: measured vs predicted maps over the H&E, per-gene Pearson bars of models, and
predicted-vs-measured scatter plots. Functions return matplotlib Figures."""
from __future__ import annotations

from typing import Sequence

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from histomoe_core.pl import style
from histomoe_core.data.sample import Sample
from histomoe_core.pl.routing import map_style
from histomoe_core.evaluate import pearson_columns
from histomoe_core.pl.spatial import category_palette, spatial_scatter, thumbnail
from histomoe_core.tl.slots import section_index


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two vectors, as the benchmark computes it (NaN when either is constant)."""
    return float(pearson_columns(np.asarray(a, float)[:, None], np.asarray(b, float)[:, None])[0])


def gene_values(adata: ad.AnnData, gene: str, layer: str) -> np.ndarray:
    """One gene's column of ``adata.layers[layer]`` as a dense float vector."""
    if layer not in adata.layers:
        raise KeyError(f"adata.layers has no {layer!r}; layers: {list(adata.layers)}")
    if gene not in adata.var_names:
        raise KeyError(f"gene {gene!r} is not in adata.var_names")
    col = adata.layers[layer][:, adata.var_names.get_loc(gene)]
    return np.asarray(col.toarray() if hasattr(col, "toarray") else col, dtype=float).ravel()


def _range(v: np.ndarray) -> tuple[float, float]:
    lo, hi = np.nanpercentile(v, [2, 98])
    return (float(lo), float(hi)) if hi > lo else (float(np.nanmin(v)), float(np.nanmax(v)) + 1e-6)


def measured_vs_predicted(adata: ad.AnnData, sample: Sample, genes: Sequence[str], *, key: str = "histomoe",
                          measured: str = "target", image: tuple[np.ndarray, float] | None = None) -> Figure:
    """One row per gene: measured (``layers[measured]``) and predicted (``layers[key]``) expression over the H&E.

    Each panel has its own colour range (2nd-98th percentile): predictions are smoother than measurements, and
    the question is whether the pattern matches; the Pearson r of the section is in the title.
    """
    rows = section_index(adata, sample)
    image = image or thumbnail(sample)
    fig, axes = style.subplots(len(genes), 2, figsize=(8.6, 3.9 * len(genes)), constrained_layout=True, squeeze=False)
    for (ax_m, ax_p), g in zip(axes, genes):
        y, p = gene_values(adata, g, measured)[rows], gene_values(adata, g, key)[rows]
        vm, vp = _range(y), _range(p)
        spatial_scatter(sample, y, ax=ax_m, image=image, vmin=vm[0], vmax=vm[1], title=f"{g}: measured",
                        **map_style(sample))
        spatial_scatter(sample, p, ax=ax_p, image=image, vmin=vp[0], vmax=vp[1],
                        title=f"{g}: predicted (r = {pearson(y, p):.2f})", **map_style(sample))
    kind = adata.uns.get("target_kind", measured)
    split = adata.obs["split"].astype(str).to_numpy()[rows[0]] if "split" in adata.obs else None
    fig.suptitle(f"{sample.sample_id}: measured vs predicted {kind}" + (f" ({split} section)" if split else ""), fontsize=11)
    return fig


def gene_pearson(per_gene: pd.DataFrame, *, models: Sequence[str] | None = None, genes: Sequence[str] | None = None,
                 n_genes: int = 20, sort_by: str | None = None, value: str = "pearson", title: str | None = None) -> Figure:
    """Grouped bars of per-gene Pearson r for several models.

    ``per_gene`` is long format with columns ``model``, ``gene`` and ``value`` (other columns such as fold or
    seed are averaged over). Genes are the ``n_genes`` best of ``sort_by`` (default: the first model) unless
    ``genes`` is given.
    """
    need = {"model", "gene", value}
    if not need <= set(per_gene.columns):
        raise KeyError(f"per_gene needs columns {sorted(need)}; has {list(per_gene.columns)}")
    table = per_gene.groupby(["gene", "model"])[value].mean().unstack("model")
    models = list(models) if models is not None else list(table.columns)
    missing = [m for m in models if m not in table.columns]
    if missing:
        raise KeyError(f"models {missing} not in per_gene; models: {list(table.columns)}")
    table = table[models]
    order = table[sort_by or models[0]].sort_values(ascending=False)
    chosen = list(genes) if genes is not None else list(order.index[:n_genes])
    table = table.loc[chosen]
    fig, ax = style.subplots(figsize=(min(style.MAX_WIDTH_IN, max(6.0, 0.45 * len(chosen) * max(1, len(models) / 2))), 3.8), constrained_layout=True)
    width = 0.8 / len(models)
    x = np.arange(len(chosen))
    colors = plt.get_cmap("tab10")
    for i, m in enumerate(models):
        ax.bar(x + (i - (len(models) - 1) / 2) * width, table[m].to_numpy(), width, label=m, color=colors(i % 10))
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xticks(x, chosen, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("Pearson r" if value == "pearson" else value)
    ax.legend(frameon=False, fontsize=8, ncols=min(len(models), 4))
    ax.set_title(title or f"Per-gene {value}: top {len(chosen)} genes of {sort_by or models[0]}", fontsize=10)
    return fig


def prediction_scatter(adata: ad.AnnData, genes: Sequence[str], *, key: str = "histomoe", measured: str = "target",
                       color_by: str | None = "sample_id", ncols: int = 3) -> Figure:
    """Predicted vs measured expression per spot for each gene, coloured by ``obs[color_by]``, with Pearson r."""
    ncols = min(ncols, len(genes))
    nrows = int(np.ceil(len(genes) / ncols))
    fig, axes = style.subplots(nrows, ncols, figsize=(3.4 * ncols, 3.2 * nrows), constrained_layout=True, squeeze=False)
    groups = adata.obs[color_by].astype(str).to_numpy() if color_by else np.full(adata.n_obs, "")
    colors = category_palette(sorted(set(groups)))
    for ax, g in zip(axes.flat, genes):
        y, p = gene_values(adata, g, measured), gene_values(adata, g, key)
        for lev, colour in colors.items():
            m = groups == lev
            ax.scatter(y[m], p[m], s=5, alpha=0.6, color=colour, label=lev or None, linewidths=0)
        lo, hi = min(y.min(), p.min()), max(y.max(), p.max())
        ax.plot([lo, hi], [lo, hi], ls="--", lw=0.7, color="grey")
        ax.set_title(f"{g}: r = {pearson(y, p):.2f}", fontsize=10)
        ax.set_xlabel(f"measured ({measured})")
        ax.set_ylabel("predicted")
    for ax in axes.flat[len(genes):]:
        ax.set_axis_off()
    if color_by and len(colors) > 1:
        axes.flat[0].legend(frameon=False, fontsize=style.SMALL_PT, markerscale=2, title=color_by, title_fontsize=style.SMALL_PT)
    return fig
