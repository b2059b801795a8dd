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
# # Routing: which expert predicts which spot, and what it predicts
#
# A mixture of experts promises more than a single model: for every spot one can read off **which expert
# drove the prediction**, and ask whether that choice follows something a pathologist would recognise. This
# chapter opens the trained HistoMoE models of the benchmark (chapter 04) and looks at their routing:
#
# 1. on **synthetic data with a known answer** (organ-specific gene programs), to see what a good routing looks
#    like;
# 2. on **her2st**, where every section has the same metadata, so the router can only separate spots by their
#    image, against patients, sections and the pathologist's
#    region labels of section A1;
# 3. at the **genes**: measured against predicted expression on held-out tissue, and HistoMoE against the
#    baselines gene by gene.
#
# Every figure below is drawn by a function of `histomoe_core.pl` from the AnnData slots that
# `histomoe_core.tl.predict` writes, so the same figures can be made for any run (`histomoe inspect RUN`).

# %% tags=["parameters"]
profile = "her2st"
dataset = "her2st"
dataset_options = {}
encoder = "efficientnet_lite0"
text_encoder = "minilm"
seed = 0  # training seed of the models that are opened
n_genes = 50
epochs = None  # None: the benchmark's default
n_seeds = None  # None: the benchmark's default
benchmark_overrides = {}  # further BenchmarkConfig fields (must match chapter 04 to reuse its run)
run_name = None  # open this finished run (folder name under the runs directory) instead
model = "histomoe"  # the MoE of the benchmark that is opened
target = None  # target kind; None: the run's first (log1p)
section = None  # section mapped in detail; None: the first with pathologist labels (her2st A1), else a held-out one
reference = "synthetic"  # benchmark profile of the data with a known answer
reference_options = {}  # overrides for that benchmark (tl.load_run keywords, e.g. run_name)
compare = ["histomoe", "ridge_cv", "knn", "mlp"]  # models in the per-gene comparison (those in the run)
n_top_genes = 3  # genes mapped as measured vs predicted

# %%
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")  # no widgets in the executed book
warnings.filterwarnings("ignore", category=FutureWarning)  # scanpy suggests squidpy for sc.pl.spatial
import numpy as np
import pandas as pd
import scanpy as sc
from myst_nb import glue

from histomoe_core import pl, tl
from histomoe_core.benchmark import describe_model

run = tl.load_run(dataset, dataset_options=dataset_options, encoder=encoder, text_encoder=text_encoder,
                  n_genes=n_genes, epochs=epochs, n_seeds=n_seeds, seed=seed, progress=False, run_name=run_name,
                  **benchmark_overrides)
target = target or run.config["config"]["targets"][0]
glue("run_name", run.path.name, display=False)
glue("target", target, display=False)
pd.Series({"run": run.path.name, "dataset": dataset, "encoder": encoder, "model": model, "target": target,
           "seed": seed, "models saved": ", ".join(run.saved_models())}).to_frame("value")

# %% [markdown]
# ## What a good routing looks like: synthetic organs
#
# The synthetic data (chapter 03) have a known structure: each section comes from one of several organs, and
# each organ turns the same visible cell types into **different** gene programs. A single image-to-expression
# map has to average the organs; one expert per organ does not. The synthetic benchmark's HistoMoE is set up to
# route on the metadata embedding of the section ("kidney, clear cell renal carcinoma", ...), to pick one expert
# per spot ({term}`top-1 routing <top-k routing>`) and to be nudged toward one expert per organ by a small guide
# loss; the model opened here {glue:text}`ref_setup`. Below, its first fold's model is applied to every section
# (training and held-out sections alike).

# %%
ref_run = run if dataset == reference else tl.load_run(reference, seed=seed, progress=False, **reference_options)
ref_fold = ref_run.config["folds"][0]
ref_samples = tl.run_samples(ref_run)
ref = tl.fold_adata(ref_run, ref_fold["name"], model=model, seed=seed, samples=ref_samples)
ref.obs["cell_type"] = tl.true_cell_type(ref, ref_samples)
ref_organ = tl.routing_agreement(ref, "organ")
ref_cells = tl.routing_agreement(ref, "cell_type")
glue("ref_nmi", ref_organ.nmi, display=False)
glue("ref_ari", ref_organ.ari, display=False)
glue("ref_cell_nmi", ref_cells.nmi, display=False)
glue("ref_entropy", float(ref.obs["histomoe_gate_entropy"].median()), display=False)
glue("ref_n_experts", len(ref.uns["histomoe"]["experts"]), display=False)
ref_cfg = ref_run.load_model(model, ref_fold["name"], seed, ref_run.config["config"]["targets"][0]).cfg
glue("ref_setup", f"reads the {ref_cfg.router_input} embedding"
     + (f", routes top-{ref_cfg.top_k}" if ref_cfg.top_k else ", routes softly (all experts)")
     + (f" and has a guide loss of weight {ref_cfg.guide_weight:g}" if ref_cfg.guide_weight else " and no guide loss"),
     display=False)
tab = ref_organ.table
dominant, top_share = tab.idxmax(axis=1), float((tab.max(axis=1) / tab.sum(axis=1)).min())
glue("ref_verdict", ("Each organ goes to its own expert" if top_share >= 0.9 else
                     f"Each organ has its own dominant expert (at least {top_share:.0%} of its spots)")
     if dominant.nunique() == len(dominant) else "Some organs share a dominant expert", display=False)
glue("ref_entropy_phrase", f"With top-1 routing each spot uses exactly one of the {len(ref.uns['histomoe']['experts'])} "
     "experts, so the median gate entropy is" if ref_cfg.top_k == 1 else
     f"Over the {len(ref.uns['histomoe']['experts'])} experts the median gate entropy is", display=False)
glue("ref_cell_phrase", "this router reads the metadata, not the image, so within a section every spot goes to "
     "the same expert" if ref_cfg.router_input == "meta" else f"this router reads the {ref_cfg.router_input} "
     "embedding", display=False)
fig = pl.routing.expert_usage(ref, groupby="organ", title="Synthetic data: mean gate weight per organ")

# %% [markdown]
# {glue:text}`ref_verdict`: the dominant expert and the organ agree with a normalised mutual
# information ({term}`NMI`) of {glue:text}`ref_nmi:.2f` and an adjusted Rand index ({term}`ARI`) of
# {glue:text}`ref_ari:.2f` (1 = the same partition, 0 = unrelated). {glue:text}`ref_entropy_phrase`
# {glue:text}`ref_entropy:.2f`. The cell type that dominates a spot, also known here, agrees with the routing at
# NMI {glue:text}`ref_cell_nmi:.2f`: {glue:text}`ref_cell_phrase`. This is the
# pattern to look for in real data: a routing that lines up with a variable known to change the image-to-gene
# map.

# %%
fig = pl.routing.contingency(ref, "organ", title="Synthetic data")

# %%
ref_section = ref_samples[ref_fold["test"][0]]
fig = pl.routing.expert_map(ref, ref_section, labels="cell_type")

# %% [markdown]
# The map shows one held-out synthetic section: every spot routed to the expert of its organ, next to the true
# dominant cell type of each spot.
#
# ## her2st: does the router find tissue structure?
#
# On her2st every section has the same metadata (HER2-positive breast cancer), so the metadata cannot tell spots
# apart: whatever the router reads, it separates spots by their image. The benchmark's HistoMoE is, in each fold,
# the variant its inner cross-validation chose (chapter {doc}`04_benchmark`); in this fold that is
# **{glue:text}`variant`** ({glue:text}`variant_desc`), with {glue:text}`n_experts` experts ({glue:text}`experts`).
# The model opened here is the one trained without the patient of section {glue:text}`shown`
# (fold {glue:text}`fold`), applied to all {glue:text}`n_sections` sections; in its training sections it routes spots it has seen,
# in the held-out sections spots it has not. The recomputed held-out predictions match the run's stored ones up
# to {glue:text}`max_diff:.1e`, so these are the benchmarked models.

# %%
samples = tl.run_samples(run)
labelled = [s.sample_id for s in samples if tl.has_region_labels(s)]
shown = section or (labelled[0] if labelled else run.config["folds"][0]["test"][0])
fold = tl.fold_of(run, shown)
adata = tl.fold_adata(run, fold, model=model, seed=seed, target=target, samples=samples, images=[shown])
adata.obs["region"] = tl.region_labels(adata, samples)
adata.obs["section"] = adata.obs["sample_id"].astype(str) + " (" + adata.obs["split"].astype(str) + ")"
experts = adata.uns["histomoe"]["experts"]
glue("shown", shown, display=False)
glue("fold", fold, display=False)
glue("max_diff", float(adata.uns["histomoe"]["params"]["max_abs_diff_vs_run"]), display=False)
glue("n_experts", len(experts), display=False)
glue("experts", ", ".join(experts), display=False)
chosen = run.chosen(model, target=target)
glue("variant", str(chosen.get(fold, model)), display=False)
glue("variant_desc", describe_model(run.model_spec(model, fold, target=target)), display=False)
glue("n_sections", len(samples), display=False)
adata

# %% [markdown]
# The printout above is the whole interface: predictions in `layers["histomoe"]`, gate weights in
# `obsm["histomoe_gates"]`, every expert's own prediction in `obsm["histomoe_experts"]`, the dominant expert and
# the gate entropy in `obs`, expert names and parameters in `uns["histomoe"]`, and the H&E thumbnail of
# {glue:text}`shown` in scanpy's `uns["spatial"]` layout. scanpy and squidpy read it like any spatial AnnData:

# %%
import matplotlib.pyplot as plt

gene0 = adata.uns["histomoe"]["genes"][0]
with plt.rc_context({"figure.figsize": (3.4, 3.0)}):  # scanpy sizes each panel from rcParams: two fit the column
    sc.pl.spatial(adata[adata.obs["sample_id"] == shown].copy(), library_id=shown, color=[gene0, "histomoe_expert"],
                  layer="histomoe", title=[f"{gene0}: predicted", "dominant expert"], ncols=2)

# %% [markdown]
# ### Expert usage per section and gate entropy
#
# The model has {glue:text}`n_experts` routed experts ({glue:text}`experts`). The heatmap shows the mean gate
# weight of each expert in each section; the violins the spread of the gate entropy (0 = one expert takes a spot,
# 1 = all experts weigh the same).

# %%
fig = pl.routing.expert_usage(adata, groupby="section", title=f"her2st, model of fold {fold}: mean gate weight")

# %%
fig = pl.routing.gate_entropy(adata, groupby="sample_id")

# %%
labels = [c for c in ("patient", "sample_id", "region") if adata.obs[c].notna().any()]
summary = tl.routing_summary(adata, labels)
glue("her_entropy", float(summary["median_entropy"]), display=False)
glue("her_routing", str(summary["routing"]), display=False)
glue("her_top_gate", float(summary["median_top_gate"]), display=False)
glue("her_least", float(summary["least_used"]), display=False)
glue("her_most", float(summary["most_used"]), display=False)
glue("nmi_patient", float(summary["nmi_patient"]), display=False)
glue("nmi_section", float(summary["nmi_sample_id"]), display=False)
summary.to_frame(model)

# %% [markdown]
# The routing of this model is **{glue:text}`her_routing`**: the median gate entropy is
# {glue:text}`her_entropy:.2f` (0 = one expert per spot, 1 = all experts equal), the largest gate weight of the
# median spot is {glue:text}`her_top_gate:.2f`, and the mean gate weight of the experts ranges from
# {glue:text}`her_least:.2f` to {glue:text}`her_most:.2f`. The dominant expert agrees with the patient at NMI
# {glue:text}`nmi_patient:.2f` and with the section at NMI {glue:text}`nmi_section:.2f`, against
# {glue:text}`ref_nmi:.2f` for the synthetic organs. A near-uniform router makes the mixture act as one averaged
# model; the "dominant" expert is then decided by small differences, and the maps below show where those small
# differences fall.
#
# Every MoE variant the benchmark trained can be opened the same way; the table compares their routing on this
# fold (same sections, same labels).

# %%
moe_models = [m for m in run.saved_models() if run.load_model(m, fold, seed, target).cfg.n_routed > 1]
variants = pd.DataFrame({m: tl.routing_summary(tl.fold_adata(run, fold, model=m, seed=seed, target=target,
                                                             samples=samples), labels) for m in moe_models}).T
variants

# %% [markdown]
# ### Section {glue:text}`shown` against the pathologist's regions
#
# her2st ships a pathologist's annotation of section A1 (invasive cancer, cancer in situ, immune infiltrate,
# breast glands, connective and adipose tissue). The table counts the spots of each region by their dominant
# expert (as a share of the region's spots).

# %%
fig = pl.routing.contingency(adata, "region", title=f"{shown}: pathologist region vs dominant expert") \
    if adata.obs["region"].notna().any() else None

# %%
fig = pl.routing.expert_map(adata, samples[shown], labels="region" if adata.obs["region"].notna().any() else None)

# %%
fig = pl.routing.gate_maps(adata, samples[shown], ncols=3)

# %% [markdown]
# The gate maps show where each expert takes weight over the H&E, on one colour scale shared by the panels
# (from the smallest to the largest gate weight in the section; read the colour bar). The
# interactive version below links the two: click an expert in the legend to see only the spots it dominates,
# hover a spot for its gate weights and region. It runs offline in this page (vega is inlined, nothing loads
# from the network).

# %%
pl.interactive.embed(pl.interactive.routing_explorer(adata, samples[shown],
                                                     labels="region" if adata.obs["region"].notna().any() else None))

# %% [markdown]
# ### Which genes each expert predicts differently
#
# For each expert and gene: on the spots the expert is used for (weighted by its gate), how far its prediction
# lies from the mean of the other experts' predictions, in standard deviations of the gene's predicted expression.
# A large value marks a gene whose prediction would change if those spots were routed elsewhere.

# %%
contrast = tl.expert_genes(adata, n_top=15)
glue("top_contrast_gene", str(contrast.index[0]), display=False)
glue("top_contrast_expert", str(contrast.loc[contrast.index[0]].abs().idxmax()), display=False)
fig = pl.routing.expert_genes(adata, n_top=15, title=f"her2st, model of fold {fold}")

# %% [markdown]
# The gene the experts disagree on most is {glue:text}`top_contrast_gene` (expert
# {glue:text}`top_contrast_expert`).
#
# ## Genes: measured against predicted on held-out tissue
#
# The maps below show the held-out section where HistoMoE scored best, {glue:text}`best` (fold
# {glue:text}`gene_fold`), for the {glue:text}`n_top` genes it predicted best there. Each panel has its own colour
# range: predictions are smoother than measurements, and the question is whether the pattern matches.

# %%
best = tl.best_section(run, model=model, target=target)
gene_fold = tl.fold_of(run, best)
gdata = adata if gene_fold == fold else tl.fold_adata(run, gene_fold, model=model, seed=seed, target=target,
                                                      samples=samples)
per_gene = run.per_gene
per_gene = per_gene[(per_gene["target"] == target) & (per_gene["fold"] == gene_fold)]
ranked = per_gene[per_gene["model"] == model].groupby("gene")["pearson"].mean().sort_values(ascending=False)
genes = ranked.index[:n_top_genes].tolist()
glue("best", best, display=False)
glue("gene_fold", gene_fold, display=False)
glue("n_top", len(genes), display=False)
glue("top_gene", genes[0], display=False)
glue("top_gene_r", float(ranked.iloc[0]), display=False)
glue("seed", seed, display=False)
fig = pl.genes.measured_vs_predicted(gdata, samples[best], genes)

# %%
models_shown = [m for m in compare if m in set(per_gene["model"])]
fig = pl.genes.gene_pearson(per_gene, models=models_shown, n_genes=20, sort_by=model,
                            title=f"Fold {gene_fold}: per-gene Pearson over the held-out spots (top 20 of {model})")

# %%
ho = tl.held_out(gdata)
cols = [list(gdata.var_names).index(g) for g in genes]
sd_ratio = float(np.median(np.nanstd(np.asarray(ho.layers["histomoe"])[:, cols], axis=0)
                           / np.nanstd(np.asarray(ho.layers["target"])[:, cols], axis=0)))
glue("sd_ratio", sd_ratio, display=False)
glue("sd_phrase", "the shrinkage typical of regression from images, predictions covering a narrower range than the "
     "measurements" if sd_ratio < 1 else "no shrinkage: the predictions cover at least the measurements' range",
     display=False)
fig = pl.genes.prediction_scatter(ho, genes, color_by="sample_id")

# %% [markdown]
# Over the pooled held-out spots of fold {glue:text}`gene_fold`, the best-predicted gene,
# {glue:text}`top_gene`, reaches a Pearson r of {glue:text}`top_gene_r:.2f` (mean over seeds; bars above, the
# benchmark's baselines beside them; the maps' titles give one section's r for seed {glue:text}`seed`'s model). In the scatter plots, the predictions' spread is {glue:text}`sd_ratio:.0%` of the
# measurements' (standard deviation over the held-out spots, median over these genes):
# {glue:text}`sd_phrase`.
#
# To explore any panel gene: choose it in the drop-down, switch between measured and predicted colouring, hover
# a spot for its values and gate weights, or drag a rectangle on the scatter to find those spots on the tissue.

# %%
pl.interactive.embed(pl.interactive.spot_explorer(gdata, samples[best], ranked.index.tolist()))

# %% [markdown]
# ## Figures in this chapter
#
# - **Synthetic: mean gate weight per organ** (heatmap): each organ's spots go to one expert; the known answer.
# - **Synthetic: organ vs dominant expert** (contingency table with NMI and ARI) and the **expert map** of a
#   held-out synthetic section beside its true cell types: routing follows the organ, not the cell type.
# - **scanpy `sc.pl.spatial`** of section {glue:text}`shown`: the results open in scanpy like any spatial AnnData.
# - **her2st: mean gate weight per section** (heatmap, training and held-out sections) and **gate entropy per
#   section** (violins): how much each expert is used, and how soft the routing is.
# - **Routing summary** of the opened model and **routing of every MoE variant** in the run (tables: gate
#   entropy, expert usage, NMI of the dominant expert with patient, section and pathologist region).
# - **Pathologist region vs dominant expert** (contingency table) for {glue:text}`shown`.
# - **Expert map** of {glue:text}`shown`: H&E, dominant expert per spot, pathologist regions side by side.
# - **Gate maps**: each expert's gate weight per spot over the H&E.
# - **Routing explorer** (interactive): dominant expert per spot, legend selection, hover for gate weights.
# - **Genes each expert predicts differently** (heatmap of expert-minus-others contrasts).
# - **Measured vs predicted maps** of the best-predicted genes on held-out section {glue:text}`best`.
# - **Per-gene Pearson bars**: HistoMoE against the baselines on the same fold and genes.
# - **Predicted vs measured scatter** per gene over the held-out spots.
# - **Spot explorer** (interactive): any panel gene, measured or predicted, with gate weights on hover and a
#   brush linking the scatter to the tissue.
