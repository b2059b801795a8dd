"""Figures of a benchmark over several tissue contexts: per-context scores and routing against context."""
from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from histomoe_core.pl import style


def context_bars(table: pd.DataFrame, *, models: Sequence[str] | None = None, title: str = "") -> Figure:
    """Grouped bars: the HEST metric of each model (colour) in each context (group); ``table`` is contexts x
    models (e.g. :func:`histomoe_core.benchmark.compare.per_context_table`)."""
    models = list(models or table.columns)
    t = table[models]
    fig, ax = style.subplots(figsize=(min(style.MAX_WIDTH_IN, max(6.5, 0.9 * len(t))), 3.8))
    width = 0.8 / len(models)
    cmap = plt.get_cmap("tab10")
    for i, m in enumerate(models):
        ax.bar(np.arange(len(t)) + (i - (len(models) - 1) / 2) * width, t[m].to_numpy(), width, label=m,
               color=cmap(i % 10))
    ax.set_xticks(np.arange(len(t)), t.index, rotation=30, ha="right", fontsize=8)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_ylabel("HEST metric (per context)")
    ax.legend(fontsize=style.SMALL_PT, ncols=min(len(models), 4), frameon=False, loc="upper left", bbox_to_anchor=(0, 1.18))
    ax.set_title(title, fontsize=9, pad=30 if title else 6)
    fig.tight_layout()
    return fig


def contingency_heatmap(counts: pd.DataFrame, *, title: str = "") -> Figure:
    """Contexts x experts: the share of each context's test spots that each expert dominates (numbers in cells,
    dark text on light cells and light text on dark ones)."""
    share = counts.div(counts.sum(1), axis=0)
    fig, ax = style.subplots(figsize=(0.7 * share.shape[1] + 3.2, 0.45 * share.shape[0] + 1.4))
    im = ax.imshow(share.to_numpy(), cmap="Blues", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(share.shape[1]), share.columns, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(share.shape[0]), share.index, fontsize=8)
    for (r, c), v in np.ndenumerate(share.to_numpy()):
        ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=style.SMALL_PT, color=style.text_colour(im.cmap(im.norm(v))))
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02, label="share of the context's spots")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig
