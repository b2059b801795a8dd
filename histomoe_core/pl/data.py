"""Figures (and the small tables behind them) for looking at a dataset: sections, spot QC, patch QC, the gene
panel and the two regression target kinds. Every function takes data first and returns a matplotlib Figure."""
from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from histomoe_core.pl import style
from histomoe_core.data.patches import PatchSpec, iter_patches, patch_qc
from histomoe_core.data.sample import Sample, SampleSet, total_counts
from histomoe_core.data.targets import TARGET_KINDS, make_targets
from histomoe_core.pl.spatial import category_palette, spatial_scatter, thumbnail

#: patch QC status -> colour (status order is the legend order)
QC_COLOURS = {"ok": "#4c956c", "background": "#e07a5f", "out of image": "#3d405b"}
TARGET_LABELS = {"log1p": "log1p(raw counts)", "log1p_norm": "log1p(counts per 10k)"}


# ------------------------------------------------------------------------------------------------ tables


def spot_qc(samples: SampleSet | Sequence[Sample]) -> pd.DataFrame:
    """One row per spot: ``section``, ``patient``, ``total_counts`` and ``n_genes`` (genes with a count > 0)."""
    rows = []
    for s in samples:
        x = s.adata.X
        detected = np.asarray((x > 0).sum(axis=1)).ravel()
        rows.append(pd.DataFrame({
            "section": s.sample_id, "patient": s.patient, "total_counts": total_counts(s.adata),
            "n_genes": detected,
        }, index=s.adata.obs_names.copy()))
    out = pd.concat(rows)
    out["section"] = pd.Categorical(out["section"], categories=[s.sample_id for s in samples])
    return out


def spot_qc_summary(qc: pd.DataFrame) -> pd.DataFrame:
    """Per section: spots, median counts per spot, median genes per spot, and median counts relative to the
    section with the fewest."""
    g = qc.groupby("section", observed=True)
    counts = g["total_counts"].median().astype(float)
    out = pd.DataFrame({
        "patient": g["patient"].first(),
        "spots": g.size(),
        "median_counts": counts.round(0).astype(int),
        "median_genes": g["n_genes"].median().astype(float).round(0).astype(int),
        "counts_vs_lowest": (counts / counts.min()).round(1),
    })
    return out


def patch_qc_table(samples: SampleSet | Sequence[Sample], spec: PatchSpec = PatchSpec()) -> pd.DataFrame:
    """:func:`~histomoe_core.data.patches.patch_qc` of every sample, with ``section`` and a ``status``
    column (``ok``, ``background`` or ``out of image``)."""
    parts = []
    for s in samples:
        q = patch_qc(s, spec)
        q.insert(0, "section", s.sample_id)
        parts.append(q)
    out = pd.concat(parts)
    status = np.where(~out["in_image"], "out of image", np.where(out["is_background"], "background", "ok"))
    out["status"] = pd.Categorical(status, categories=list(QC_COLOURS))
    return out


def patch_qc_summary(qc: pd.DataFrame) -> pd.DataFrame:
    """Spots per section and patch QC status (a crosstab with a total column)."""
    t = pd.crosstab(qc["section"], qc["status"]).reindex(columns=list(QC_COLOURS), fill_value=0)
    t = t.reindex(pd.unique(qc["section"]))
    t["total"] = t.sum(axis=1)
    return t


def library_confounding(samples: SampleSet | Sequence[Sample], genes: Sequence[str]) -> pd.DataFrame:
    """Per gene and target kind: Pearson r, over all spots pooled, between the target and log total counts
    per spot. High r means a model can score well on that target by predicting library size alone."""
    lib = np.concatenate([np.log1p(total_counts(s.adata)) for s in samples])
    rows = []
    for kind in TARGET_KINDS:
        y = np.concatenate([make_targets(s.adata, genes, kind=kind) for s in samples])
        yc, lc = y - y.mean(axis=0), lib - lib.mean()
        r = (yc * lc[:, None]).sum(axis=0) / np.sqrt((yc**2).sum(axis=0) * (lc**2).sum() + 1e-12)
        rows.append(pd.DataFrame({"gene": list(genes), "kind": kind, "r_library": r}))
    return pd.concat(rows, ignore_index=True)


# ------------------------------------------------------------------------------------------------ figures


def _grid(n: int, ncols: int, size: float) -> tuple[plt.Figure, np.ndarray]:
    ncols = max(1, min(ncols, n, style.max_columns(size)))
    nrows = int(np.ceil(n / ncols))
    fig, axes = style.subplots(nrows, ncols, figsize=(size * ncols, size * nrows), squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.set_axis_off()
    return fig, axes.ravel()


def sections(samples: SampleSet | Sequence[Sample], *, ncols: int = 4, size: float = 3.2, spot_um: float = 100.0) -> plt.Figure:
    """Every section's H&E with its spots outlined; the title names section and patient."""
    samples = list(samples)
    fig, axes = _grid(len(samples), ncols, size)
    for s, ax in zip(samples, axes):
        spatial_scatter(s, None, ax=ax, spot_um=spot_um, image=thumbnail(s), title=f"{s.sample_id} (patient {s.patient})")
    fig.tight_layout()
    return fig


def spot_qc_distributions(qc: pd.DataFrame) -> plt.Figure:
    """Counts per spot (log scale) and genes detected per spot, one box per section, coloured by patient."""
    secs = list(qc["section"].cat.categories) if hasattr(qc["section"], "cat") else list(pd.unique(qc["section"]))
    patients = sorted(qc["patient"].unique())
    colours = category_palette(patients)
    fig, axes = style.subplots(1, 2, figsize=(11, 3.6))
    for ax, col, label, log in ((axes[0], "total_counts", "counts per spot", True), (axes[1], "n_genes", "genes per spot", False)):
        data = [qc.loc[qc["section"] == s, col].to_numpy() for s in secs]
        box = ax.boxplot(data, patch_artist=True, showfliers=False, widths=0.6)
        for patch, s in zip(box["boxes"], secs):
            patch.set_facecolor(colours[str(qc.loc[qc["section"] == s, "patient"].iloc[0])])
            patch.set_alpha(0.7)
        for i, d in enumerate(data, start=1):
            ax.scatter(np.random.default_rng(i).normal(i, 0.06, len(d)), d, s=3, color="black", alpha=0.3, linewidths=0)
        ax.set_xticks(range(1, len(secs) + 1), secs, rotation=45 if len(secs) > 8 else 0, ha="right" if len(secs) > 8 else "center")
        ax.set_ylabel(label)
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("section")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[str(p)], alpha=0.7) for p in patients]
    axes[1].legend(handles, patients, title="patient", frameon=False, loc="center left", bbox_to_anchor=(1, 0.5))
    fig.tight_layout()
    return fig


def patch_qc_map(sample: Sample, qc: pd.DataFrame, *, ax: plt.Axes | None = None, spot_um: float = 100.0) -> plt.Axes:
    """The sample's spots coloured by patch QC status over its H&E."""
    rows = qc.loc[qc["section"] == sample.sample_id] if "section" in qc else qc
    status = rows.loc[sample.adata.obs_names, "status"]
    if ax is None:
        _, ax = style.subplots(figsize=(6.5, 5.5))
    return spatial_scatter(sample, status, ax=ax, categorical=True, palette=QC_COLOURS, spot_um=spot_um,
                           image=thumbnail(sample), title=f"{sample.sample_id}: patch QC")


def example_patches(
    sample: Sample, qc: pd.DataFrame, *, n: int = 6, spec: PatchSpec = PatchSpec(), seed: int = 0
) -> plt.Figure:
    """A row of ``ok`` patches above a row of flagged ones (background or out of image), as the model sees them."""
    rows = qc.loc[qc["section"] == sample.sample_id] if "section" in qc else qc
    status = rows.loc[sample.adata.obs_names, "status"].to_numpy()
    rng = np.random.default_rng(seed)
    groups = {"ok": np.flatnonzero(status == "ok"), "flagged": np.flatnonzero(status != "ok")}
    picks = {k: np.sort(rng.choice(v, size=min(n, len(v)), replace=False)) for k, v in groups.items()}
    wanted = np.concatenate(list(picks.values()))
    images = {}
    for idx, batch in iter_patches(sample, spec, indices=wanted):
        images.update(zip(idx.tolist(), batch))
    fig, axes = style.subplots(2, n, figsize=(1.6 * n, 3.6), squeeze=False)
    for r, (label, idx) in enumerate(picks.items()):
        for c in range(n):
            ax = axes[r, c]
            ax.set_axis_off()
            if c < len(idx):
                ax.imshow(images[int(idx[c])])
                ax.set_title(str(sample.adata.obs_names[idx[c]]), fontsize=style.SMALL_PT)
        axes[r, 0].text(-0.15, 0.5, f"{label}\n({len(groups[label])} spots)", transform=axes[r, 0].transAxes,
                        ha="right", va="center", fontsize=9)
    fig.suptitle(f"{sample.sample_id}: {spec.size_um:g} µm patches", fontsize=10)
    fig.tight_layout()
    return fig


def gene_panel(panel: pd.DataFrame, *, top: int | None = None) -> plt.Figure:
    """Bars of the panel genes' selection score (HEST rule: normalised dispersion; variance rule: target variance),
    coloured by the lowest expressed fraction over sections."""
    p = panel if top is None else panel.iloc[:top]
    fig, ax = style.subplots(figsize=(min(style.MAX_WIDTH_IN, max(6.0, 0.22 * len(p))), 3.4))
    colours = plt.get_cmap("viridis")(p["min_expressed_frac"].to_numpy())
    ax.bar(range(len(p)), p["score"].to_numpy(), color=colours)
    ax.set_xticks(range(len(p)), p.index, rotation=90, fontsize=style.SMALL_PT)
    rule = str(p["rule"].iloc[0]) if "rule" in p else "hest"
    ax.set_ylabel("normalised dispersion" if rule == "hest" else "variance of target")
    ax.set_xlim(-0.7, len(p) - 0.3)
    sm = plt.cm.ScalarMappable(cmap="viridis", norm=plt.Normalize(0, 1))
    fig.colorbar(sm, ax=ax, fraction=0.03, pad=0.01, label="min fraction of spots\nexpressing (over sections)")
    fig.tight_layout()
    return fig


def target_kinds(
    samples: SampleSet | Sequence[Sample], gene: str, *, sections: Sequence[str] | None = None, spot_um: float = 180.0
) -> plt.Figure:
    """One gene as both target kinds (rows) on a few sections (columns; default: the first section of each
    patient, at most four), each row on one colour scale. Spots are drawn nearly as wide as the grid pitch
    (``spot_um``) so that the pattern, not the tissue, stands out."""
    samples = list(samples)
    if sections is None:
        firsts = {}
        for s in samples:
            firsts.setdefault(s.patient, s.sample_id)
        sections = list(firsts.values())[:4]
    chosen = [s for s in samples if s.sample_id in sections]
    fig, axes = style.subplots(len(TARGET_KINDS), len(chosen), figsize=(4.2 * len(chosen), 4.0 * len(TARGET_KINDS)), squeeze=False)
    for r, kind in enumerate(TARGET_KINDS):
        vals = [make_targets(s.adata, [gene], kind=kind)[:, 0] for s in chosen]
        lo, hi = float(min(v.min() for v in vals)), float(max(v.max() for v in vals))
        for c, (s, v) in enumerate(zip(chosen, vals)):
            spatial_scatter(s, v, ax=axes[r, c], vmin=lo, vmax=hi, colorbar=c == len(chosen) - 1, spot_um=spot_um,
                            image=thumbnail(s), title=f"{s.sample_id}: {TARGET_LABELS[kind]}")
    fig.suptitle(gene, fontsize=11)
    fig.tight_layout()
    return fig


def library_confounding_plot(table: pd.DataFrame) -> plt.Figure:
    """Per-gene correlation with library size for each target kind (one dot per gene, lines pair a gene)."""
    kinds = [k for k in TARGET_KINDS if k in set(table["kind"])]
    wide = table.pivot(index="gene", columns="kind", values="r_library")[kinds]
    fig, ax = style.subplots(figsize=(4.2, 3.6))
    for _, row in wide.iterrows():
        ax.plot(range(len(kinds)), row.to_numpy(), color="grey", alpha=0.3, linewidth=0.7)
    for i, k in enumerate(kinds):
        ax.scatter(np.full(len(wide), i), wide[k], s=12, zorder=3, label=TARGET_LABELS[k])
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xticks(range(len(kinds)), [TARGET_LABELS[k] for k in kinds])
    ax.set_xlim(-0.5, len(kinds) - 0.5)
    ax.set_ylabel("Pearson r with log library size")
    fig.tight_layout()
    return fig
