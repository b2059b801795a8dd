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
# # The data: sections, spots, patches and targets
#
# HistoMoE learns a map from the H&E image under a spot to the genes measured in that spot. Before any model,
# this chapter looks at what that map is trained on: the tissue sections with their spots, how many molecules
# each spot caught, which image patches are usable, which genes make up the prediction panel, and the two ways
# to turn counts into regression targets.
#
# It starts with **every dataset** side by side, before anything is pooled: tissues, species, technologies and
# pixel sizes differ, and a model that pools them has to cope with all of it. The rest of the chapter then looks
# closely at one dataset. The default profile reads **her2st** (Andersson et al. 2021
# {cite}`andersson2021her2st`): HER2-positive breast cancer measured with legacy Spatial Transcriptomics (100 µm
# spots on a 200 µm grid). The smoke profile runs the same cells on the synthetic dataset.

# %% tags=["parameters"]
profile = "her2st"
dataset = "her2st"
dataset_options = {}
datasets = ["her2st", "ffpe_analysis", "spacest", "murine_colon_explorer"]  # shown side by side first
section = None  # section to inspect closely; None: the one with the most background-flagged patches
n_genes = 50
min_frac = 0.1
gene = None  # gene drawn as both target kinds; None: the most variable gene of the panel
seed = 0

# %%
from myst_nb import glue

from histomoe_core import pl
from histomoe_core.data import load_dataset
from histomoe_core.data.genes import select_panel
from histomoe_core.data.patches import PatchSpec
from histomoe_core.data.summary import overview_table, summary_table
from histomoe_core.data.targets import NORM_TARGET_SUM

samples = load_dataset(dataset, **dataset_options)
# every dataset of `datasets`, and `dataset` itself if it is not among them (e.g. your own, -p dataset=NAME)
overview = {name: samples if name == dataset else load_dataset(name) for name in dict.fromkeys([*datasets, dataset])}
spec = PatchSpec()
pqc_every = pl.data.patch_qc_table([s for ss in overview.values() for s in ss], spec)
every = overview_table(overview, spec, patch_qc=pqc_every)
glue("n_datasets", len(overview), display=False)
glue("n_all_sections", len(every), display=False)
glue("n_contexts", every["context"].nunique(), display=False)
glue("n_species", every["species"].nunique(), display=False)
glue("px_range", f"{every['um_per_px'].min():.2f} to {every['um_per_px'].max():.2f}", display=False)
glue("top_background", ", ".join(every["background"].nlargest(3).index), display=False)
glue("patch_px_range", f"{every['patch_px'].min()} to {every['patch_px'].max()}", display=False)
every

# %% [markdown]
# ## Every dataset
#
# {glue:text}`n_datasets` datasets, {glue:text}`n_all_sections` sections, {glue:text}`n_contexts` tissue
# contexts and {glue:text}`n_species` species. Pixel sizes run from {glue:text}`px_range` µm/px, so one
# {glue:text}`patch_um` µm patch spans {glue:text}`patch_px_range` source pixels (`patch_px`) before it is resized
# for the encoder: the same tissue area, at very different detail. Sections whose patches span fewer than 32
# source pixels (the Visium hires images) are upsampled about 8-fold. `background` counts the patches that are
# mostly glass or masked background (the patch QC below); most of them are in {glue:text}`top_background` (on
# the default profile: the airy COVID-19 lung sections and her2st's poorly registered A2). Each panel below is one section with its spots drawn at their physical size (100 µm legacy-ST
# spots, 55 µm Visium spots).

# %%
fig = pl.datasets.section_grid(overview, spec=spec)

# %% [markdown]
# One row per tissue context: random {glue:text}`patch_um` µm patches of one of its sections, as the encoder
# sees them (here at 96 px).

# %%
fig = pl.datasets.context_montage(overview, seed=seed)

# %% [markdown]
# ## One dataset up close
#
# From here on the chapter looks at one dataset, {glue:text}`dataset_name`.

# %%
table = summary_table(samples)
glue("dataset_name", dataset, display=False)
glue("n_sections", len(samples), display=False)
glue("n_patients", len(samples.patients), display=False)
glue("n_spots", int(table["spots"].sum()), display=False)
table

# %% [markdown]
# ### Sections and spots
#
# The dataset has {glue:text}`n_sections` sections from {glue:text}`n_patients` patients, {glue:text}`n_spots`
# spots in all. Each circle below is one spot drawn at its physical size over the section's H&E image. Sections
# of one patient are serial cuts of the same tumour, which is why every evaluation in this book splits by
# **patient**: a model tested on a section whose neighbour it trained on has seen the same tissue.

# %%
fig = pl.data.sections(samples)

# %% [markdown]
# ### Spot QC: counts and genes per spot
#
# The number of molecules a spot catches (its *library size*) depends on the tissue, but also on the section's
# chemistry and sequencing depth. Across these sections the median counts per spot differ
# {glue:text}`fold_counts:.0f`-fold between the shallowest section ({glue:text}`low_section`) and the deepest
# ({glue:text}`high_section`). Genes detected per spot follow the same pattern.

# %%
qc = pl.data.spot_qc(samples)
qc_summary = pl.data.spot_qc_summary(qc)
glue("fold_counts", float(qc_summary["counts_vs_lowest"].max()), display=False)
glue("low_section", str(qc_summary["median_counts"].idxmin()), display=False)
glue("high_section", str(qc_summary["median_counts"].idxmax()), display=False)
fig = pl.data.spot_qc_distributions(qc)
qc_summary

# %% [markdown]
# A difference this large matters for the targets (below): a model that only learns "dense tissue, many
# counts" already correlates with every gene.
#
# ### Patch QC
#
# The model sees a square patch around each spot ({glue:text}`patch_um` µm wide, HEST-Bench's size, resized to
# {glue:text}`patch_px` px). Two things can go wrong: the
# patch can leave the image (it is then padded with white), or it can be mostly background (glass, or a masked
# region). Here {glue:text}`n_out` patches leave their image and {glue:text}`n_background` are flagged as
# mostly background. They are kept in training and evaluation (the spots were measured), but they are the first
# place to look when a section scores badly.

# %%
glue("patch_um", f"{spec.size_um:g}", display=False)
glue("patch_px", spec.out_px, display=False)
pqc = pqc_every[pqc_every["section"].isin(samples.ids)]
pqc_summary = pl.data.patch_qc_summary(pqc)
glue("n_out", int(pqc_summary["out of image"].sum()), display=False)
glue("n_background", int(pqc_summary["background"].sum()), display=False)
pqc_summary

# %% [markdown]
# The section with the most flagged patches, {glue:text}`qc_section`, has {glue:text}`qc_section_flagged` of
# its {glue:text}`qc_section_spots` spots flagged. her2st's A2 is the known case: its image is a 2000-pixel downscale whose
# background was masked black, and its spot coordinates do not register well with it, so a band of spots
# lands on the black mask. The her2st loader can leave it out (`exclude_low_quality=True`).

# %%
detail = section if section is not None else str((pqc_summary["background"] + pqc_summary["out of image"]).idxmax())
glue("qc_section", detail, display=False)
glue("qc_section_flagged", int(pqc_summary.loc[detail, ["background", "out of image"]].sum()), display=False)
glue("qc_section_spots", int(pqc_summary.loc[detail, "total"]), display=False)
ax = pl.data.patch_qc_map(samples[detail], pqc)

# %%
fig = pl.data.example_patches(samples[detail], pqc, seed=seed)

# %% [markdown]
# ### The gene panel
#
# HistoMoE predicts a panel of genes, chosen by HEST-Bench's rule: among genes expressed in at least
# {glue:text}`min_frac_pct` of the spots of every section (control probes dropped), the {glue:text}`panel_size`
# most highly variable ones (scanpy's `seurat` flavour on log1p counts: dispersion normalised within bins of
# mean expression, so a gene is chosen for varying more than genes of its expression level). Here the panel is
# picked on all sections, to show it. **The benchmark does not do this**: it picks the panel again inside every
# cross-validation fold, on the training patients only, so the test patients never influence which genes are
# scored.

# %%
panel = select_panel(list(samples), n_genes=n_genes, min_frac=min_frac)
glue("panel_size", len(panel), display=False)
glue("min_frac_pct", f"{min_frac:.0%}", display=False)
fig = pl.data.gene_panel(panel)

# %% [markdown]
# ### Two kinds of target
#
# HEST-Bench regresses `log1p` of the **raw counts**. Because of the library-size differences above, that
# target mixes two signals: how much of the gene a spot expresses *relative to its other genes*, and how many
# molecules the spot caught at all. The second kind, `log1p` of counts **per {glue:text}`norm_sum`** (library-size
# normalised), removes most of the latter. The figure shows one gene, {glue:text}`shown_gene`, both ways, on one
# section per patient; each row shares one colour scale.

# %%
shown = gene if gene is not None else str(panel.index[0])
glue("shown_gene", shown, display=False)
glue("norm_sum", f"{NORM_TARGET_SUM:,.0f}", display=False)
fig = pl.data.target_kinds(samples, shown)

# %% [markdown]
# Over all panel genes, the median Pearson correlation between a gene's target and the spot's log library size is
# {glue:text}`r_raw:.2f` for raw-count targets and {glue:text}`r_norm:.2f` for normalised ones. A model can earn
# part of its raw-count score by predicting cellularity, which the image shows well; the benchmark chapter
# reports both target kinds for that reason.

# %%
conf = pl.data.library_confounding(list(samples), list(panel.index))
medians = conf.groupby("kind")["r_library"].median()
glue("r_raw", float(medians["log1p"]), display=False)
glue("r_norm", float(medians["log1p_norm"]), display=False)
fig = pl.data.library_confounding_plot(conf)
