"""Attribution overlays on H&E patches (from :class:`histomoe_core.interpret.Attributor`)."""
from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from scipy.ndimage import gaussian_filter

from histomoe_core.pl import style
from histomoe_core.interpret import METHOD_NAMES, Attributions


def _map(res: Attributions, i: int, smooth: float, shape: tuple[int, int]) -> np.ndarray:
    """Channel-summed attribution of patch ``i``, resized to the patch (encoders may resize their input)."""
    from scipy.ndimage import zoom

    h = res.heatmap()[i]
    if h.shape != shape:
        h = zoom(h, (shape[0] / h.shape[0], shape[1] / h.shape[1]), order=1)
    return gaussian_filter(h, smooth) if smooth > 0 else h


def attribution_overlay(
    patches: np.ndarray,
    results: Attributions | Sequence[Attributions],
    *,
    row_labels: Sequence[str] | None = None,
    smooth: float = 4.0,
    clip: float = 99.0,
    alpha: float = 0.85,
) -> Figure:
    """Rows = patches, columns = the patch and one overlay per attribution result.

    Each overlay is the channel-summed attribution (red: pixels that raise the output, blue: pixels that lower
    it), Gaussian-smoothed by ``smooth`` px for display, clipped at the ``clip`` percentile of its absolute
    value, drawn over the greyscale patch with opacity growing with its magnitude. Column titles name method and
    target; each panel's caption gives the output, the baseline output and (IG) the convergence delta.
    """
    results = [results] if isinstance(results, Attributions) else list(results)
    patches = np.asarray(patches)
    if patches.ndim == 3:
        patches = patches[None]
    n = len(patches)
    for r in results:
        if r.values.shape[0] != n:
            raise ValueError(f"attributions of shape {r.values.shape} do not match patches {patches.shape}")
    ncols = 1 + len(results)
    fig, axes = style.subplots(n, ncols, figsize=(2.9 * ncols, 2.6 * n + 0.4), constrained_layout=True, squeeze=False)
    grey = patches.astype(float).mean(axis=3) / 255.0
    for i in range(n):
        axes[i, 0].imshow(patches[i])
        axes[i, 0].set_ylabel(row_labels[i] if row_labels is not None else f"patch {i}", fontsize=8)
        for j, r in enumerate(results, start=1):
            h = _map(r, i, smooth, patches.shape[1:3])
            lim = float(np.percentile(np.abs(h), clip)) or 1e-12
            ax = axes[i, j]
            ax.imshow(grey[i], cmap="gray", vmin=-0.5, vmax=1)  # a light greyscale patch under the colours
            rgba = plt.get_cmap("RdBu_r")(TwoSlopeNorm(0.0, -lim, lim)(np.clip(h, -lim, lim)))
            rgba[..., 3] = alpha * np.clip(np.abs(h) / lim, 0, 1) ** 0.7  # strong attributions opaque, weak ones clear
            ax.imshow(rgba)
            cb = fig.colorbar(plt.cm.ScalarMappable(TwoSlopeNorm(0.0, -lim, lim), "RdBu_r"), ax=ax, fraction=0.046,
                              pad=0.02, ticks=[-lim, 0, lim], format="%.1e")
            cb.ax.tick_params(labelsize=style.SMALL_PT)
            if j == len(results):
                cb.set_label("attribution (clear: weak)", fontsize=style.SMALL_PT)
            label = f"out {r.output[i]:.2f} (base {r.baseline_output[i]:.2f})"
            if r.delta is not None:
                label += f"\ndelta {r.delta[i]:+.1e}"
            ax.set_xlabel(label, fontsize=style.SMALL_PT)
    axes[0, 0].set_title("H&E patch", fontsize=9)
    for j, r in enumerate(results, start=1):
        what = f"gene {r.target_name}" if r.of == "gene" else f"gate of {r.target_name}"
        axes[0, j].set_title(f"{METHOD_NAMES[r.method]}\n{what}", fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    return fig


def convergence(deltas: dict, *, title: str = "Integrated Gradients convergence") -> Figure:
    """Relative completeness error ``|delta| / |f(x) - f(baseline)|`` against the number of IG steps.

    ``deltas`` maps steps -> per-patch relative deltas, or label -> (steps -> deltas) to compare several models.
    """
    series = deltas if all(isinstance(v, dict) for v in deltas.values()) else {"": deltas}
    fig, ax = style.subplots(figsize=(4.6, 3.2), constrained_layout=True)
    colors = plt.get_cmap("tab10")
    for i, (label, d) in enumerate(series.items()):
        steps = sorted(d)
        vals = np.array([np.asarray(d[s], float) for s in steps])
        ax.plot(steps, vals, color=colors(i), alpha=0.35, lw=0.8)
        ax.plot(steps, vals.mean(axis=1), color=colors(i), marker="o", lw=1.5,
                label=(f"{label}: " if label else "") + "mean over patches")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("IG steps")
    ax.set_ylabel("|delta| / |f(x) - f(baseline)|")
    ax.legend(frameon=False, fontsize=style.SMALL_PT)
    ax.set_title(title, fontsize=10)
    return fig
