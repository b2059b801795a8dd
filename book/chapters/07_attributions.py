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
# # Attributions: which pixels drive a prediction, and a routing decision
#
# Chapter {doc}`06_routing` asked *which expert* predicts a spot. This chapter asks *what in the image* moves a prediction:
# for one gene's predicted expression, and for one expert's gate weight, which pixels of the H&E patch push the
# output up or down. The attributions run end to end, from the patch pixels through the vision encoder and the
# MoE, with Captum {cite}`kokhlikyan2020captum`:
#
# - **Integrated Gradients** (IG) {cite}`sundararajan2017ig` integrates the gradient along the straight path
#   from a baseline image to the patch. Its attributions should add up to the change of the output between
#   baseline and patch; the gap left over, the {term}`convergence delta <IG convergence delta>`, contains the
#   error of the numerical integral and is reported for every result.
# - **GradientSHAP** {cite}`lundberg2017shap` averages gradients at noisy points between baseline and patch.
# - **Occlusion** {cite}`zeiler2014occlusion` replaces a square window with the baseline and records how much
#   the output changes: slow, coarse, but free of gradients.
#
# The baseline is the patch itself, blurred (a Gaussian of 1/16 of the patch width): an attribution then says how
# the fine structure at a pixel (a nucleus, a fibre, a gap) moved the output away from what the patch's local
# colour alone would give. A blank white baseline (`baselines="white"`) asks instead how all tissue moved the
# output away from glass; it is further from the patch, and IG can be expected to need more steps there, because
# the network's output changes fast as the first tissue appears along the path (this chapter does not measure
# it). The model is the benchmark's own: the encoder
# that made the cached embeddings, followed by the MoE trained on them for one fold, so the end-to-end model
# reproduces the benchmarked predictions (checked below).

# %% tags=["parameters"]
profile = "her2st"
dataset = "her2st"
dataset_options = {}
encoder = "efficientnet_lite0"
text_encoder = "minilm"
seed = 0  # training seed of the model that is opened
n_genes = 50
epochs = None  # None: the benchmark's default
n_seeds = None  # None: the benchmark's default
benchmark_overrides = {}  # further BenchmarkConfig fields (must match chapter 04 to reuse its run)
run_name = None  # open this finished run (folder name under the runs directory) instead
model = "histomoe"
target = None  # target kind; None: the run's first (log1p)
section = None  # held-out section whose patches are explained; None: the one where the model scored best
gene = None  # gene explained; None: the best-predicted gene of that fold
reference = "synthetic"  # benchmark profile of the data with a known answer
reference_options = {}  # overrides for that benchmark (tl.load_run keywords, e.g. run_name)
n_steps = 32  # IG steps of the figures (the convergence section compares more)
n_samples = 8  # GradientSHAP samples
occlusion_window = 56  # px (the patch is 224 px)
convergence_steps = [8, 32, 128]  # IG steps compared for the convergence delta
threads = 2  # CPU threads for torch

# %%
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")  # no widgets in the executed book
import numpy as np
import pandas as pd
import torch
from myst_nb import glue

from histomoe_core import pl, tl
from histomoe_core.data.patches import PatchSpec
from histomoe_core.data.synthetic import CELL_TYPES
from histomoe_core.embed import embed_metadata
from histomoe_core.encoders import create_encoder
from histomoe_core.interpret import Attributor, spot_patches
from histomoe_core.moe import HistoMoEEndToEnd

torch.set_num_threads(threads)
run = tl.load_run(dataset, dataset_options=dataset_options, encoder=encoder, text_encoder=text_encoder,
                  n_genes=n_genes, epochs=epochs, n_seeds=n_seeds, seed=seed, progress=False, run_name=run_name,
                  **benchmark_overrides)
target = target or run.config["config"]["targets"][0]
samples = tl.run_samples(run)
shown = section or tl.best_section(run, model=model, target=target)
fold = tl.fold_of(run, shown)
spec = PatchSpec(**dict(run.config["config"].get("patch") or {}))
moe = run.load_model(model, fold, seed, target)
net = HistoMoEEndToEnd(create_encoder(run.config["config"]["encoder"]), moe).eval()
meta = embed_metadata(samples, run.config["config"]["text_encoder"])[shown] if moe.cfg.router_input != "image" else None
sec = tl.fold_adata(run, fold, model=model, seed=seed, target=target, samples=samples, sections=[shown])
panel = sec.uns["histomoe"]["genes"]
attr = Attributor(net, genes=panel, meta_emb=meta)
glue("shown", shown, display=False)
glue("fold", fold, display=False)
glue("encoder_name", net.encoder.name, display=False)
glue("n_experts", len(attr.experts), display=False)
pd.Series({"run": run.path.name, "section": shown, "fold": fold, "encoder": net.encoder.name, "model": model,
           "experts": ", ".join(attr.experts), "target": target}).to_frame("value")

# %% [markdown]
# ## Attributions for one gene on her2st
#
# Section {glue:text}`shown` was held out of fold {glue:text}`fold`'s training; the model is
# {glue:text}`encoder_name` followed by that fold's MoE with {glue:text}`n_experts` routed experts. The gene
# explained is {glue:text}`gene_name`, the gene this model predicted best on its held-out spots. Three patches
# are explained: the spots with the highest, the median and the lowest predicted expression. Running the patches
# through the end-to-end model gives the benchmark's stored predictions back to within
# {glue:text}`e2e_diff:.1e`.

# %%
per_gene = run.per_gene
per_gene = per_gene[(per_gene["target"] == target) & (per_gene["fold"] == fold) & (per_gene["model"] == model)]
gene_name = gene or str(per_gene.groupby("gene")["pearson"].mean().idxmax())
res = tl.read_results(sec)
g_col = panel.index(gene_name)
order = np.argsort(res["pred"][:, g_col])
spots = [int(order[-1]), int(order[len(order) // 2]), int(order[0])]
patches = spot_patches(samples[shown], spots, spec=spec)
e2e = attr.predict(patches)
glue("gene_name", gene_name, display=False)
glue("e2e_diff", float(np.abs(e2e["pred"] - res["pred"][spots]).max()), display=False)
row_labels = [f"{tag}: {samples[shown].adata.obs_names[i]}\npred {res['pred'][i, g_col]:.2f}, "
              f"meas {sec.layers['target'][i, g_col]:.2f}" for tag, i in zip(["highest", "median", "lowest"], spots)]
gene_results = [attr.attribute(patches, target=gene_name, of="gene", method=m, n_steps=n_steps, n_samples=n_samples,
                               window=occlusion_window, stride=occlusion_window // 2)
                for m in ("ig", "gradient_shap", "occlusion")]
fig = pl.attributions.attribution_overlay(patches, gene_results, row_labels=row_labels)

# %%
gene_table = pd.DataFrame([r.summary() for r in gene_results]).set_index("method")
glue("ig_delta", float(gene_table.loc["Integrated Gradients", "max_relative_delta"]), display=False)
pl.tables.shown(gene_table, digits=4, missing="n/a (IG only)")  # only IG has a completeness delta

# %% [markdown]
# Red pixels raise the predicted expression of {glue:text}`gene_name`, blue ones lower it (each panel on its own
# symmetric scale, smoothed for display). The three methods are computed independently, so where they agree the
# pattern is a property of the model rather than of one method. With {glue:text}`n_steps_used` steps the largest
# relative IG convergence delta over the three patches (`max_relative_delta` in the table) is
# {glue:text}`ig_delta:.1%` of the output change it explains; the convergence section below uses the same
# patches and the same statistic.
#
# Part of such a gap need not be numerical error. A {term}`retrieval` expert predicts the mean expression of the most
# similar training spots, which changes in jumps when the set of neighbours changes and is flat in between.
# Gradients are zero on the flat parts, so IG and GradientSHAP cannot credit the jumps: the delta then contains
# the change of the retrieval experts' share of the prediction between baseline and patch, and more steps do not
# remove it. Occlusion, which never takes a gradient, includes it. This model {glue:text}`retrieval_note`; per
# patch, the change of the output, the IG delta and the change of the retrieval share (zero without retrieval):

# %%
glue("retrieval_note", f"has {len(moe.cfg.retrieval_ks)} retrieval expert(s)" if moe.retrieval is not None
     else "has no retrieval expert", display=False)
pd.DataFrame({"output change": gene_results[0].output - gene_results[0].baseline_output,
              "IG delta": gene_results[0].delta,
              "retrieval part change": attr.retrieval_change(patches, target=gene_name)},
             index=[row.split(":")[0] for row in row_labels]).round(4)

# %% [markdown]
#
# ## Attributions for a routing decision
#
# The same question for the router: which pixels raise or lower the gate weight of one expert? The expert
# explained is the one whose gate varies most across the section's spots ({glue:text}`gate_expert`); the patches
# are the spots where its gate weight is highest and lowest.

# %%
glue("n_steps_used", n_steps, display=False)
gate_spread = pd.Series(res["gates"].std(axis=0), index=res["experts"])
gate_expert = str(gate_spread.idxmax())
g_order = np.argsort(res["gates"][:, res["experts"].index(gate_expert)])
gate_spots = [int(g_order[-1]), int(g_order[0])]
gate_patches = spot_patches(samples[shown], gate_spots, spec=spec)
gate_labels = [f"{tag}: {samples[shown].adata.obs_names[i]}\ngate {res['gates'][i, res['experts'].index(gate_expert)]:.3f}"
               for tag, i in zip(["highest", "lowest"], gate_spots)]
gate_results = [attr.attribute(gate_patches, target=gate_expert, of="gate", method=m, n_steps=n_steps,
                               n_samples=n_samples, window=occlusion_window, stride=occlusion_window // 2)
                for m in ("ig", "occlusion")]
glue("gate_expert", gate_expert, display=False)
glue("gate_range", float(gate_spread.max()), display=False)
fig = pl.attributions.attribution_overlay(gate_patches, gate_results, row_labels=gate_labels)

# %%
gate_table = pd.DataFrame([r.summary() for r in gate_results]).set_index("method")
pl.tables.shown(gate_table, digits=4, missing="n/a (IG only)")

# %% [markdown]
# The gate weight of {glue:text}`gate_expert` varies with a standard deviation of {glue:text}`gate_range:.3f`
# over the section's spots. When a router is near-uniform (chapter 06), these maps explain small changes of a
# weight that stays close to 1/E; they are still exact statements about the model, and IG's completeness check
# below applies to them as to the gene.
#
# ## How many IG steps are enough?
#
# IG approximates a path integral with a finite number of steps; where the integrand is smooth, the convergence
# delta shrinks as steps are added. Below, for the gene above on the same three patches (the table gives the
# largest relative delta over them, as above; the figure each patch and their mean): the opened model, and
# {glue:text}`smooth_model`, a model of the same run without a retrieval expert (when the run has one).

# %%
smooth_model = next((m for m in run.saved_models() if m != model
                     and run.load_model(m, fold, seed, target).retrieval is None), None)
smooth_attr = Attributor(HistoMoEEndToEnd(net.encoder, run.load_model(smooth_model, fold, seed, target)).eval(),
                         genes=panel, meta_emb=meta) if smooth_model else None
deltas = {name: {n: a.attribute(patches, target=gene_name, of="gene", method="ig", n_steps=n).relative_delta
                 for n in convergence_steps}
          for name, a in ((model, attr), (smooth_model, smooth_attr)) if a is not None}
conv = pd.DataFrame({name: {n: float(v.max()) for n, v in d.items()} for name, d in deltas.items()})
conv.index.name = "IG steps"
glue("smooth_model", str(smooth_model), display=False)
glue("model", model, display=False)
glue("conv_first_steps", int(conv.index[0]), display=False)
glue("conv_last_steps", int(conv.index[-1]), display=False)
glue("conv_first", float(conv[model].iloc[0]), display=False)
glue("conv_last", float(conv[model].iloc[-1]), display=False)
glue("conv_smooth_last", float(conv[smooth_model].iloc[-1]) if smooth_model else float("nan"), display=False)

ig0 = gene_results[0]
gap = np.abs(ig0.output - ig0.baseline_output)
conv_trend, reason = tl.ig_convergence(
    conv, model=model, smooth_model=smooth_model, has_retrieval=moe.retrieval is not None,
    retrieval_share=float(np.max(np.abs(attr.retrieval_change(patches, target=gene_name)) / np.maximum(gap, 1e-12))),
    encoder=net.encoder, min_gap_share=float(np.min(gap / np.maximum(np.abs(ig0.output), 1e-12))))
glue("conv_trend", conv_trend, display=False)
glue("conv_reason", reason, display=False)
fig = pl.attributions.convergence(deltas, title=f"IG convergence: {gene_name} on {shown}")
conv

# %% [markdown]
# From {glue:text}`conv_first_steps` to {glue:text}`conv_last_steps` steps the largest relative delta of
# {glue:text}`model` goes from {glue:text}`conv_first:.1%` to {glue:text}`conv_last:.1%`: it
# {glue:text}`conv_trend`; for {glue:text}`smooth_model` it reaches {glue:text}`conv_smooth_last:.1%`.
# {glue:text}`conv_reason` The tests check that the delta shrinks with more steps on a small model, the exact IG
# and occlusion values on a model that is linear in the pixels, and that the IG delta of a retrieval model is
# close to the retrieval part's change.
#
# ## A known answer: synthetic tissue
#
# The synthetic images are drawn from known cell types (many small dark nuclei, mid-size pink blobs, a few large
# pale blobs), and each organ maps them to genes through known programs. Its benchmark HistoMoE is configured
# to route on the **metadata**, not the image (what the opened model's router reads is printed below). That
# gives two checks: the gate of a metadata router cannot depend on the pixels, so its attributions must be
# exactly zero; and a gene's attributions should sit on the cells that drive it.

# %%
ref_run = run if dataset == reference else tl.load_run(reference, seed=seed, progress=False, **reference_options)
ref_samples = tl.run_samples(ref_run)
ref_fold = ref_run.config["folds"][0]
ref_section = ref_samples[ref_fold["test"][0]]
ref_cfg = ref_run.config["config"]
ref_moe = ref_run.load_model(model, ref_fold["name"], seed, ref_cfg["targets"][0])
ref_net = HistoMoEEndToEnd(create_encoder(ref_cfg["encoder"]), ref_moe).eval()
ref_meta = embed_metadata(ref_samples, ref_cfg["text_encoder"])[ref_section.sample_id] \
    if ref_moe.cfg.router_input != "image" else None
ref_genes = [str(g) for g in ref_run.predictions(model, ref_fold["name"], seed)["genes"]]
ref_attr = Attributor(ref_net, genes=ref_genes, meta_emb=ref_meta)
ref_spec = PatchSpec(**dict(ref_cfg.get("patch") or {}))
z = np.asarray(ref_section.adata.obsm["z_true"])
ref_spots = [int(np.argmax(z[:, k])) for k in range(len(CELL_TYPES))]
ref_patches = spot_patches(ref_section, ref_spots, spec=ref_spec)
program = pd.DataFrame(np.asarray(ref_section.adata.varm["program"]), index=ref_section.adata.var_names)
ref_gene = str(program.loc[ref_genes, CELL_TYPES.index("epithelial")].abs().idxmax())
ref_results = [ref_attr.attribute(ref_patches, target=ref_gene, of="gene", method=m, n_steps=n_steps,
                                  window=occlusion_window, stride=occlusion_window // 2) for m in ("ig", "occlusion")]
ref_expert = int(ref_attr.predict(ref_patches)["gates"].mean(axis=0).argmax())
ref_gate = ref_attr.attribute(ref_patches, target=ref_expert, of="gate", method="ig", n_steps=n_steps)
ref_weight = float(program.loc[ref_gene, CELL_TYPES.index("epithelial")])
glue("ref_router", ref_moe.cfg.router_input, display=False)
glue("ref_expert", ref_attr.experts[ref_expert], display=False)
glue("ref_gate_max", float(np.abs(ref_gate.values).max()), display=False)
glue("ref_gene", ref_gene, display=False)
glue("ref_weight", ref_weight, display=False)
glue("ref_sign", "lower (blue)" if ref_weight < 0 else "raise (red)", display=False)
nuclei = ref_patches[0].max(axis=2) < 150  # the dark nuclei of the epithelial patch (first row)
ig_map = ref_results[0].heatmap()[0]
glue("nuclei_area", float(nuclei.mean()), display=False)
glue("nuclei_share", float(np.abs(ig_map[nuclei]).sum() / np.abs(ig_map).sum()), display=False)
glue("nuclei_sum", float(ig_map[nuclei].sum()), display=False)
glue("ref_gate_phrase", "exactly zero, so the last column is blank: for a metadata router there is nothing in the "
     "image to show" if np.abs(ref_gate.values).max() == 0 else "not zero: this router's gate does depend on the "
     "pixels", display=False)
share = float(np.abs(ig_map[nuclei]).sum() / np.abs(ig_map).sum())
glue("nuclei_verb", "but carry" if share > nuclei.mean() else "and carry only", display=False)
glue("nuclei_agree", "as the generating model says" if np.sign(ig_map[nuclei].sum()) == np.sign(ref_weight)
     else "against what the generating model says", display=False)
fig = pl.attributions.attribution_overlay(
    ref_patches, [*ref_results, ref_gate],
    row_labels=[f"mostly {c}" for c in CELL_TYPES])

# %% [markdown]
# The router of this model reads the **{glue:text}`ref_router`** embedding; the largest absolute IG attribution
# of the gate of the expert these patches are routed to ({glue:text}`ref_expert`) is
# {glue:text}`ref_gate_max:.1e`, {glue:text}`ref_gate_phrase`. The gene explained, {glue:text}`ref_gene`, is the panel gene with the strongest program weight on the
# epithelial cell type (small dark nuclei) in this organ, {glue:text}`ref_weight:.2f`; the generating model says
# those nuclei should {glue:text}`ref_sign` its expression. In the first row (a patch dominated by epithelial
# cells) the nuclei cover {glue:text}`nuclei_area:.0%` of the pixels {glue:text}`nuclei_verb`
# {glue:text}`nuclei_share:.0%` of the IG attribution's magnitude, and their attributions sum to
# {glue:text}`nuclei_sum:.2f` (negative = lowering), {glue:text}`nuclei_agree`.
#
# ## Figures in this chapter
#
# - **Gene attributions on her2st** (IG, GradientSHAP, Occlusion overlays on the patches with the highest,
#   median and lowest predicted expression of {glue:text}`gene_name`), with a table of outputs, baseline outputs
#   and convergence deltas.
# - **Gate attributions on her2st** (IG, Occlusion) for the gate weight of expert {glue:text}`gate_expert` on
#   the patches where it is highest and lowest, with its table.
# - **Retrieval table**: output change, IG delta and the retrieval expert's change per patch.
# - **IG convergence**: relative delta against the number of steps, per patch and their mean, for the opened
#   model and for a model without retrieval, with its table (largest delta over the patches).
# - **Synthetic known answer**: gene attributions on patches dominated by each cell type, and the gate of a
#   router of that model (zero attributions when the router reads only the metadata).
