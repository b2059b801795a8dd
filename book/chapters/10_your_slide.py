# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Your own slide: train once, predict a slide that was never profiled
#
# The benchmark (chapter {doc}`04_benchmark`) scores models on sections whose expression was measured. The point
# of the tool is the other case: an H&E slide with **no** spatial transcriptomics. This chapter walks that path
# with the two commands made for it:
#
# ```bash
# histomoe train --datasets her2st --exclude-patient C --model histomoe --out bundle/
# histomoe predict SLIDE --model bundle/ [--um-per-px X] [--spots FILE | --grid] --out pred/
# ```
#
# `train` fits a model exactly as the benchmark fits it on one training fold (the inner-CV choice of HistoMoE's
# variant included) and writes a self-contained **bundle**. `predict` reads a slide (JPEG, PNG, TIFF or a
# whole-slide format, tile by tile), finds the tissue, lays spots on a grid at the patch spacing, and writes an
# AnnData, a SpatialData zarr and maps. Here one patient is held out, so the prediction can be checked against
# what was measured on their sections.

# %% tags=["parameters"]
profile = "her2st"
dataset = "her2st"
dataset_options = {}
encoder = "efficientnet_lite0"
text_encoder = "minilm"
seed = 0
n_genes = 50
epochs = None  # None: the benchmark's default
model = "histomoe"  # any benchmark model name
held_out = None  # patient left out of training; None: the dataset's last patient
section = None  # held-out section predicted on a grid; None: the held-out patient's first section
n_maps = 2  # genes mapped, measured vs predicted

# %%
import tempfile
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="IProgress not found")
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning, module="zarr")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import scanpy as sc
from myst_nb import glue

from histomoe_core.bundle import TrainRequest, load_bundle
from histomoe_core.bundle.fit import cached_bundle, describe
from histomoe_core.cli import main as histomoe
from histomoe_core.data import load_dataset
from histomoe_core.data.targets import make_targets
from histomoe_core.evaluate import score
from histomoe_core.pl.spatial import spatial_scatter, thumbnail
from histomoe_core.slide.outputs import H5AD, MAPS
from histomoe_core.slide.predict import (
    POSITIONS_FILES, predict_sample, predict_slide, sample_metadata, slide_sample,
)
from histomoe_core.slide.validation import map_correlation, smooth_at, uncertainty_report

samples = load_dataset(dataset, **dataset_options)
held_out = held_out or samples.patients[-1]
test = [s for s in samples if s.patient == held_out]
section = section or test[0].sample_id
req = TrainRequest(datasets=(dataset,), dataset_options=tuple(sorted(dataset_options.items())),
                   exclude_patients=(held_out,), model=model, seed=seed, encoder=encoder, text_encoder=text_encoder,
                   n_genes=n_genes, epochs=epochs)
bundle = load_bundle(cached_bundle(req))
man = bundle.manifest
glue("held_out", held_out, display=False)
pd.Series({"held-out patient": held_out, "sections predicted": ", ".join(s.sample_id for s in test),
           "bundle": "; ".join(describe(man)[1:])}).to_frame("value")

# %% [markdown]
# ## What a bundle holds
#
# The bundle is one folder: `bundle.json` (below, abridged), the model's weights and a float16 copy of the training
# embeddings (for the novelty score). Loading it checks every file's sha256 and that the encoder here has the
# same weights as the one it was trained on; a bundle from another encoder, or a damaged one, is refused with the
# command that fixes it.

# %%
pd.Series({
    "format / version": f"{man['format']} v{man['version']} (histomoe {man['package_version']}, {man['created']})",
    "encoder": f"{man['encoder']['name']}, weights {man['encoder']['weights_sha256']}",
    "patch": f"{man['patch']['size_um']:g} µm -> {man['patch']['out_px']} px",
    "genes": f"{len(man['genes'])} ({man['panel']['rule']} rule on the training sections; {man['target']} targets)",
    "model": f"{man['model']['name']}: {(man['model']['selection'] or {}).get('chosen', 'one fixed spec')} "
             f"({man['model']['kind']}, seed {man['model']['seed']})",
    "training targets": "section-centred" if man["normalisation"]["centre_targets"] else "raw",
    "metadata": f"{man['metadata']['text_encoder']} (read by the model: {man['metadata']['reads_metadata']})",
    "training data": f"{man['provenance']['datasets']} sha256 {man['provenance']['dataset_sha256']}",
    "files": ", ".join(f"{k} ({v[:8]})" for k, v in man["files"].items()),
}).to_frame("value")

# %% [markdown]
# ## A held-out section on a grid
#
# `predict` is given only the image of section {glue:text}`grid_section`, its pixel size and its metadata (organ,
# cancer type, receptor status: the text the router may read). It finds the tissue on a
# thumbnail (Otsu's threshold on saturation, then closing and small-object removal, all sizes in micrometres), lays
# one spot per patch width over it and predicts every spot. Left: what was measured at the section's own spots;
# right: the grid prediction.

# %%
sample = samples[section]
meta = sample_metadata(sample)  # what a user knows of the slide: organ, cancer type, receptor status, ...
grid = predict_slide(sample.image_path, bundle, um_per_px=sample.pixel_size_um, meta=meta, name=f"{section}_grid",
                     progress=False)
g = grid.adata
grid_sample = slide_sample(sample.image_path, pd.DataFrame(g.obsm["spatial"], columns=["x", "y"], index=g.obs_names),
                           sample.pixel_size_um, {})
y = make_targets(sample.adata, bundle.genes, kind=man["target"])
smooth, covered = smooth_at(np.asarray(g.obsm["spatial"]), np.asarray(g.X), sample.coords, sigma=grid.info["crop_px"])
r_gene = pd.Series([map_correlation(y[covered][:, [i]], smooth[covered][:, [i]]) for i in range(len(bundle.genes))],
                   index=bundle.genes).sort_values(ascending=False)
glue("grid_section", section, display=False)
glue("grid_spots", f"{g.n_obs}", display=False)
glue("grid_r", f"{map_correlation(y[covered], smooth[covered]):.3f}", display=False)
img = thumbnail(sample)
shown = r_gene.index[:n_maps].tolist()
fig, axes = plt.subplots(len(shown), 2, figsize=(8.4, 3.9 * len(shown)), squeeze=False)
for row, gene in zip(axes, shown):
    i = bundle.genes.index(gene)
    vmin, vmax = np.percentile(np.concatenate([y[:, i], g.X[:, i]]), [2, 98])
    spatial_scatter(sample, y[:, i], ax=row[0], image=img, title=f"{gene}, measured", vmin=vmin, vmax=vmax)
    spatial_scatter(grid_sample, g.X[:, i], ax=row[1], image=img, spot_um=man["patch"]["size_um"],
                    title=f"{gene}, predicted on the grid (r = {r_gene[gene]:.2f})", vmin=vmin, vmax=vmax)
fig.tight_layout()

# %% [markdown]
# The grid has {glue:text}`grid_spots` spots. Smoothed (Gaussian, sigma = one patch) at the measured spots, the grid
# prediction correlates with the measured map at **r = {glue:text}`grid_r`** (mean over the panel's genes; the maps
# above are the genes it gets best). The next map is the expert that dominates each grid spot, and the per-spot
# **uncertainty**: how much the experts disagree (the gate-weighted spread of their predictions).

# %%
fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.8))
if "histomoe_expert" in g.obs:
    spatial_scatter(grid_sample, g.obs["histomoe_expert"], ax=axes[0], image=img, categorical=True,
                    spot_um=man["patch"]["size_um"], title="dominant expert")
spatial_scatter(grid_sample, g.obs["uncertainty"].fillna(0), ax=axes[1], image=img, cmap="magma",
                spot_um=man["patch"]["size_um"], title="uncertainty (expert disagreement)")
fig.tight_layout()

# %% [markdown]
# ## Every held-out section at its own spots
#
# Predicting each section of patient {glue:text}`held_out` from its image at its own spots gives the benchmark's
# test-fold score for this seed: the bundle is that fold's model (same panel, same inner-CV choice, same seed), and
# `benchmarks/validate_predict.py` sets the two numbers side by side. The table gives the HEST metric (Pearson r per
# gene over the fold's spots, mean over genes: **{glue:text}`held_out_r`**) and the per-section means.

# %%
preds = [predict_sample(s, bundle, progress=False) for s in test]
Y = np.concatenate([make_targets(s.adata, bundle.genes, kind=man["target"]) for s in test])
P = np.concatenate([np.asarray(p.adata.X) for p in preds])
metrics, _, per_section = score(Y, P, np.concatenate([[s.sample_id] * s.n_spots for s in test]), bundle.genes)
glue("held_out_r", f"{metrics['pearson']:.3f}", display=False)
per_section[["pearson", "n_spots"]].assign(pearson=lambda t: t["pearson"].round(3)).T.assign(
    **{"all (HEST metric)": [round(metrics["pearson"], 3), metrics["n_test_spots"]]})

# %% [markdown]
# ## Is the uncertainty worth anything?
#
# A useful uncertainty is high where the prediction is wrong. Below: the Spearman correlation of each per-spot score
# with the spot's squared error (mean over genes), and the error-retention curve: the mean squared error of the
# most certain x % of spots. `novelty` is the trivial baseline, the distance from a spot's embedding to the nearest
# training spot; `random` keeps spots regardless of any score. A curve below `random` at small shares means the
# score finds the spots that can be trusted.

# %%
scores = {"uncertainty": np.concatenate([p.adata.obs["uncertainty"].to_numpy() for p in preds]),
          "novelty": np.concatenate([p.adata.obs["novelty"].to_numpy() for p in preds])}
rho, curves = uncertainty_report(Y, P, scores)
fig, ax = plt.subplots(figsize=(5, 3.4))
for col in curves:
    ax.plot(curves.index * 100, curves[col], marker="o" if col != "random" else None,
            ls="--" if col == "random" else "-", label=f"{col}" + (f" (rho {rho.loc[col].iloc[0]:.2f})"
                                                                    if col in rho.index else ""))
ax.set_xlabel("most certain spots kept (%)")
ax.set_ylabel("mean squared error")
ax.legend(frameon=False, fontsize=8)
fig.tight_layout()
curves.round(4)

# %% [markdown]
# ## The same from the command line, opened in scanpy
#
# The commands write what the functions above return: `predictions.h5ad` (predicted expression in `X`, spots in
# slide pixels in `obsm["spatial"]`, micrometres in `obs`, gates, dominant expert, uncertainty and novelty in
# `obs` / `obsm`, provenance in `uns`), a SpatialData zarr (thumbnail, spot circles, table) and PNG maps. Spots may
# also come from a file: a CSV of `x, y` or a Space Ranger output folder (`spatial/tissue_positions.csv`); below,
# the section's own spots written as such a folder.

# %%
work = Path(tempfile.mkdtemp(prefix="histomoe-ch10-"))
(work / "outs" / "spatial").mkdir(parents=True)
pd.DataFrame({"barcode": sample.adata.obs_names, "in_tissue": 1, "array_row": 0, "array_col": 0,
              "pxl_row_in_fullres": sample.coords[:, 1], "pxl_col_in_fullres": sample.coords[:, 0]}).to_csv(
    work / "outs" / "spatial" / POSITIONS_FILES[0], index=False)
rc = histomoe(["predict", str(sample.image_path), "--model", str(bundle.path), "--um-per-px", repr(sample.pixel_size_um),
               "--spots", str(work / "outs"), "--name", section, "--out", str(work / "pred"), "--no-progress",
               "--genes", *shown, "--meta", *(f"{k}={v}" for k, v in meta.items())])
adata = sc.read_h5ad(work / "pred" / H5AD)
with plt.rc_context({"figure.figsize": (3.4, 3.0)}):  # scanpy sizes each panel from rcParams: two fit the column
    sc.pl.spatial(adata, color=shown[:1] + ["uncertainty"], library_id=section, size=1.2, show=False)
pd.Series({"exit code": rc, "written": ", ".join(sorted(p.name for p in (work / "pred").iterdir())),
           "maps": ", ".join(sorted(p.name for p in (work / "pred" / MAPS).iterdir())),
           "AnnData": f"{adata.n_obs} spots x {adata.n_vars} genes; obsm: {', '.join(adata.obsm)}"}).to_frame("value")
