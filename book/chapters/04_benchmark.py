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
# # The benchmark: HistoMoE against the baselines on her2st
#
# Every model in this chapter sees the same folds, the same gene panels and the same embeddings, and is scored
# the same way. The protocol is built so that nothing about the test patients can flatter a model:
#
# - **Folds**: {term}`leave one patient out <leave-one-patient-out>` ({glue:text}`n_patients` patients, so {glue:text}`n_folds` folds). Serial
#   sections of a patient never straddle train and test.
# - **Gene panel**: {glue:text}`cfg_n_genes` genes per fold chosen on the fold's *training* sections only, by
#   HEST-Bench's {term}`panel rule` (rule {glue:text}`panel_rule`): drop genes detected in fewer than {glue:text}`cfg_min_frac`
#   of the spots of any training section and control probes, then the highly variable genes of scanpy's `seurat`
#   flavour on log1p counts, i.e. genes that vary more than other genes *of the same expression level*.
#   HEST-Bench runs this rule on all samples of a task, test included; here it never sees the test patient.
#   The older rule of this project (`variance`: the genes whose log1p counts vary most) is compared below.
# - **Targets**: {term}`log1p` of raw counts (HEST-Bench's choice){glue:text}`norm_targets_note`. Library-size
#   normalised targets ({term}`log1p_norm`) are added with
#   `-p benchmark_overrides='{"targets": ["log1p", "log1p_norm"]}'`, at about twice the time.
# - **Choices inside the training folds**: every setting a model can choose is chosen by {term}`inner cross-validation <inner CV>`
#   on the training sections of each fold, never on the test fold: the ridge penalty, the number of neighbours,
#   whether to train on {term}`section-centred targets` (each training section's mean moved to the pooled mean, which
#   removes sequencing-depth offsets between sections), and for `histomoe` its architecture and router input.
#   With only {glue:text}`n_train_patients` training patients per fold, inner folds group by **section**
#   (a patient-grouped inner CV would have two folds, each fitting on one patient alone).
# - **Metric**: the {term}`HEST metric`, Pearson r per gene over all test spots of a fold pooled, mean over genes; then
#   the mean over folds (and seeds), `±` the standard deviation over folds (ddof = 0, as HEST-Bench). The
#   {term}`per-section Pearson` and the MSE are reported too.
# - **Paired uncertainty**: a model is compared with another on the same folds, sections and seeds; the
#   interval is a {term}`paired bootstrap` over held-out sections (within folds), the spots within them and the
#   seeds, and a difference whose interval covers 0 is called a {term}`tie`.
# - **Seeds**: neural models are trained with {glue:text}`n_seeds` seeds; ridge, retrieval and per-context
#   models are deterministic and fit once.
#
# The models:
#
# | model | what it is |
# |---|---|
# | `ridge_hest` | HEST-Bench's head as published: StandardScaler, PCA-256, ridge with HEST's fixed alpha, raw targets |
# | `ridge_cv` | the same features, alpha by inner CV (the grid widens while the best alpha is on its edge) |
# | `knn` | {term}`retrieval` of the nearest training spots (cosine, BLEEP-style {cite}`xie2023bleep`), k by inner CV |
# | `per_context` | one `ridge_cv` per organ / cancer type (her2st has one, so it equals `ridge_cv`) |
# | `mlp` | one MLP with about the parameters of the plain MoE |
# | `moe_soft_mlp` | a plain soft MoE of four MLP experts, routed by the image, section-centred targets (fixed) |
# | `histomoe` | per fold, the inner-CV winner among {glue:text}`histomoe_candidates` |
#
# `ridge_cv`, `knn`, `per_context` and `mlp` also choose, by the same inner CV, between section-centred and raw
# training targets, so they are tuned with the same care as `histomoe`.

# %% tags=["parameters"]
profile = "her2st"
dataset = "her2st"
dataset_options = {}
encoder = "efficientnet_lite0"
text_encoder = "minilm"
seed = 0
n_genes = 50
epochs = None  # None: the benchmark's default
n_seeds = None  # None: the benchmark's default (3)
benchmark_overrides = {}  # further BenchmarkConfig fields (chapter 06 must use the same to reuse this run)
model = "histomoe"  # the model compared with the baselines
n_top_genes = 10  # genes listed in the per-gene table
n_boot = 2000  # bootstrap replicates of the paired intervals
other_rule = "variance"  # the panel rule compared with the default one
other_rule_models = ["ridge_hest", "ridge_cv", "knn"]  # models rerun under it (add "histomoe": ~4x the time)
context_models = ["ridge_cv_centred", "knn_k50", "histomoe_anchored"]  # models rerun with spatial context
context_n_seeds = 1  # seeds of the spatial-context comparison (None: as the main run; these models vary little)
spatial_contexts = {"rings": {"neighbours": {"radius_um": [250, 450]}},
                    "rings + wide": {"neighbours": {"radius_um": [250, 450]}, "wide": {}}}
context_spot = None  # spot drawn with its neighbourhood (index or id in the first test section); None: middle

# %%
import matplotlib.pyplot as plt
import pandas as pd
from myst_nb import glue

from histomoe_core import tl
from histomoe_core.benchmark.compare import compare_to, panel_depth
from histomoe_core.evaluate import fold_table

run = tl.load_run(dataset, dataset_options=dataset_options, encoder=encoder, text_encoder=text_encoder,
                  n_genes=n_genes, epochs=epochs, n_seeds=n_seeds, progress=False, **benchmark_overrides)
results, summary = run.results, run.summary
cfg = run.config["config"]
targets = list(cfg["targets"])
baselines = [m for m in summary["model"].unique() if m != model and not m.startswith(("moe_", "histomoe"))]
samples = tl.run_samples(run)
candidates = cfg["models"][model].get("candidates", {model: cfg["models"][model]})
glue("n_folds", int(results["fold"].nunique()), display=False)
glue("n_seeds", int(results["seed"].nunique()), display=False)
glue("run_seconds", float(run.config["seconds"]), display=False)
glue("n_patients", len(samples.patients), display=False)
glue("n_train_patients", len(samples.patients) - 1, display=False)
glue("cfg_n_genes", int(cfg["n_genes"]), display=False)
glue("cfg_min_frac", f"{cfg['min_frac']:.0%}", display=False)
glue("panel_rule", cfg["panel_rule"], display=False)
glue("histomoe_candidates", ", ".join(candidates), display=False)
glue("norm_targets_note", " and log1p_norm, side by side, in this run" if len(targets) > 1 else ", only, in this run",
     display=False)
pd.Series({"run": run.path.name, "folds": ", ".join(sorted(results["fold"].unique())),
           "seeds": ", ".join(map(str, sorted(results["seed"].unique()))), "targets": ", ".join(targets),
           "panel rule": cfg["panel_rule"], "inner CV groups": ", ".join(sorted(set(run.config["inner_cv_groups"].values()))),
           "wall time (s)": round(float(run.config["seconds"]))}).to_frame("value")

# %% [markdown]
# ## Results
#
# Mean over {glue:text}`n_folds` folds and {glue:text}`n_seeds` seeds; `± sd` is the standard deviation over
# folds of the seed-averaged values, `sd seeds` the standard deviation over seeds of the fold-averaged values.

# %%
table = summary.assign(**{
    "HEST metric": summary["pearson"].map("{:.3f}".format) + " ± " + summary["pearson_sd_folds"].map("{:.3f}".format),
    "sd seeds": summary["pearson_sd_seeds"].map("{:.3f}".format),
    "per-section Pearson": summary["pearson_section"].map("{:.3f}".format) + " ± "
    + summary["pearson_section_sd_folds"].map("{:.3f}".format),
    "MSE": summary["mse"].map("{:.3f}".format),
}).sort_values(["target", "pearson"], ascending=[True, False])
table.set_index(["target", "model"])[["HEST metric", "sd seeds", "per-section Pearson", "MSE"]]

# %%
main = summary[summary["target"] == targets[0]].set_index("model")
best_baseline = main.loc[baselines, "pearson"].idxmax()
glue("target0", targets[0], display=False)
glue("model_r", float(main.loc[model, "pearson"]), display=False)
glue("best_baseline", best_baseline, display=False)
glue("best_r", float(main.loc[best_baseline, "pearson"]), display=False)
glue("sd_folds_model", float(main.loc[model, "pearson_sd_folds"]), display=False)
glue("hest_r", float(main.loc["ridge_hest", "pearson"]) if "ridge_hest" in main.index else float("nan"), display=False)
ax = main["pearson"].sort_values().plot.barh(xerr=main["pearson_sd_folds"], figsize=(6, 3.5), color="#4c72b0")
ax.set_xlabel(f"HEST metric ({targets[0]}), mean ± sd over folds")
ax.set_ylabel("")
plt.tight_layout()

# %% [markdown]
# ## Paired differences
#
# `histomoe` against every baseline on the same folds, sections and seeds: the difference in the HEST metric,
# its {glue:text}`ci_level` bootstrap interval ({glue:text}`n_boot` replicates over held-out sections and seeds),
# and how many folds and test sections `histomoe` wins (per-section Pearson).

# %%
paired = compare_to(run, model, baselines, target=targets[0], n_boot=n_boot)
best = paired.loc[best_baseline]
glue("ci_level", "95 %", display=False)
glue("n_boot", n_boot, display=False)
glue("diff_best", float(best["diff"]), display=False)
glue("ci_lo", float(best["ci_lo"]), display=False)
glue("ci_hi", float(best["ci_hi"]), display=False)
glue("verdict", {"tie": "a tie", "better": "a win for histomoe", "worse": "a loss for histomoe"}[best["verdict"]],
     display=False)
glue("goal", "is met" if best["ci_lo"] > 0 and best["diff"] >= 0.02 else "is not met", display=False)
glue("folds_won", best["folds_won"], display=False)
glue("sections_won", best["sections_won"], display=False)
paired.round(3)

# %% [markdown]
# On {glue:text}`target0` targets `histomoe` scores {glue:text}`model_r:.3f` and the best baseline,
# {glue:text}`best_baseline`, {glue:text}`best_r:.3f`: a difference of {glue:text}`diff_best:+.3f`
# ({glue:text}`ci_level` interval {glue:text}`ci_lo:+.3f` to {glue:text}`ci_hi:+.3f`), which is
# **{glue:text}`verdict`**. `histomoe` wins {glue:text}`folds_won` folds and {glue:text}`sections_won` test
# sections against it. The goal this protocol was written to test, `histomoe` at least 0.02 above the best
# baseline with an interval that excludes 0, {glue:text}`goal`. HEST's fixed-alpha ridge scores
# {glue:text}`hest_r:.3f`. The interval reflects which sections were held out, not which patients: with three
# patients, the patient-to-patient spread is what the per-fold table shows, and it is far larger
# (sd over folds {glue:text}`sd_folds_model:.3f`).
#
# ## What the inner cross-validation chose
#
# Each fold's choices, made on its training sections alone. For `histomoe` the candidates' inner-CV scores
# are listed; the ridge penalty and the number of neighbours are those of the fit on the whole training fold.

# %%
run.choices(target=targets[0])

# %%
run.candidate_scores(model, target=targets[0]).round(3)

# %% [markdown]
# ## Two panel rules
#
# The panel decides what "predicting expression" means. The rule this project used before, the
# {glue:text}`cfg_n_genes` genes whose log1p counts vary most, picks the most highly expressed genes (in fold
# {glue:text}`first_fold`: {glue:text}`variance_top`, ...), and much of their spot-to-spot variation is how
# many molecules the spot caught. The table shows, per fold and on the test sections, the median correlation of a
# panel gene with the spot's log1p total counts and the genes' median detection rate, then the same models
# under both rules.

# %%
other = tl.load_run(dataset, dataset_options=dataset_options, encoder=encoder, text_encoder=text_encoder,
                    n_genes=n_genes, epochs=epochs, n_seeds=n_seeds, progress=False,
                    **{**benchmark_overrides, "panel_rule": other_rule, "targets": targets[:1],
                       "models": [m for m in other_rule_models if m in main.index]})
depth = pd.concat({cfg["panel_rule"]: panel_depth(run, samples, target=targets[0]),
                   other_rule: panel_depth(other, samples, target=targets[0])}, axis=1)
shared = {f: len(set(run.panel(targets[0], f).index) & set(other.panel(targets[0], f).index))
          for f in depth.index}
depth["shared genes"] = pd.Series(shared)
rules = pd.concat({cfg["panel_rule"]: main["pearson"],
                   other_rule: other.summary.set_index("model")["pearson"]}, axis=1).dropna().round(3)
glue("depth_main", float(depth[(cfg["panel_rule"], "depth_r")].median()), display=False)
glue("depth_other", float(depth[(other_rule, "depth_r")].median()), display=False)
glue("other_rule", other_rule, display=False)
glue("rule_gap", float((rules[other_rule] - rules[cfg["panel_rule"]]).mean()), display=False)
glue("shared_max", int(max(shared.values())), display=False)
glue("first_fold", depth.index[0], display=False)
glue("variance_top", ", ".join(other.panel(targets[0], depth.index[0]).index[:6]), display=False)
higher = rules[other_rule] > rules[cfg["panel_rule"]]
glue("higher_models", "Every model scores" if higher.all() else f"{int(higher.sum())} of {len(higher)} models score",
     display=False)
depth.round(2)

# %%
rules

# %% [markdown]
# Under the {glue:text}`other_rule` rule the panel genes correlate with spot depth at a median r of
# {glue:text}`depth_other:.2f`, against {glue:text}`depth_main:.2f` for HEST's rule, and the two panels share at
# most {glue:text}`shared_max` genes in a fold. {glue:text}`higher_models` higher on the depth-driven panel (by
# {glue:text}`rule_gap:.3f` on average): much of that measures how well an image predicts how many molecules a
# spot caught. The numbers of this book are on HEST's rule.
#
# ## Per fold
#
# The hardest fold is {glue:text}`hard_fold`: the best model reaches {glue:text}`hard_best:.3f` there, against
# {glue:text}`easy_best:.3f` on {glue:text}`easy_fold`. The images of patient {glue:text}`coarse_patient` were
# published at {glue:text}`coarse_um:.1f` µm per pixel, where the others have {glue:text}`fine_um:.2f`, so its
# patches look unlike most of what a model trains on. `histomoe` is the best model in
# {glue:text}`model_best_folds` of the folds; its per-section Pearson ranks {glue:text}`section_rank` of
# {glue:text}`n_models`.

# %%
folds_t = fold_table(results, target=targets[0])
best_per_fold = folds_t.drop(columns="mean").max()
px = pd.Series({s.sample_id: s.pixel_size_um for s in samples})
glue("hard_fold", best_per_fold.idxmin(), display=False)
glue("hard_best", float(best_per_fold.min()), display=False)
glue("easy_fold", best_per_fold.idxmax(), display=False)
glue("easy_best", float(best_per_fold.max()), display=False)
glue("coarse_patient", samples[px.idxmax()].patient, display=False)
glue("coarse_um", float(px.max()), display=False)
glue("fine_um", float(px.median()), display=False)
winners = folds_t.drop(columns="mean").idxmax()
glue("model_best_folds", f"{int((winners == model).sum())} / {len(winners)}", display=False)
glue("section_rank", int(main["pearson_section"].rank(ascending=False)[model]), display=False)
glue("n_models", len(main), display=False)
folds_t.round(3)

# %%
ps = run.per_section
ps[ps["target"] == targets[0]].pivot_table(index="model", columns="section", values="pearson").round(3)

# %% [markdown]
# ## Gene by gene
#
# Each point is one gene of one fold's panel (mean over seeds): its Pearson under `histomoe` against the best
# baseline. Points above the diagonal are genes where `histomoe` does better.

# %%
pg = run.per_gene
pg = pg[pg["target"] == targets[0]]
per_gene = pg.pivot_table(index=["fold", "gene"], columns="model", values="pearson", aggfunc="mean")
wins = float((per_gene[model] > per_gene[best_baseline]).mean())
glue("gene_wins", 100 * wins, display=False)
glue("n_gene_points", int(len(per_gene)), display=False)
fig, ax = plt.subplots(figsize=(4.5, 4.5))
ax.scatter(per_gene[best_baseline], per_gene[model], s=10, alpha=0.6)
lims = [min(per_gene[[best_baseline, model]].min()), max(per_gene[[best_baseline, model]].max())]
ax.plot(lims, lims, color="grey", lw=1)
ax.set_xlabel(f"{best_baseline} (Pearson per gene)")
ax.set_ylabel(f"{model} (Pearson per gene)")
plt.tight_layout()

# %% [markdown]
# `histomoe` does better on {glue:text}`gene_wins:.0f`% of the {glue:text}`n_gene_points` gene-fold pairs.
# The genes predicted best (mean over folds where the gene is in the panel):

# %%
genes = pg.pivot_table(index="gene", columns="model", values="pearson", aggfunc="mean")
cols = [model, best_baseline, *[m for m in ("ridge_hest", "mlp") if m in genes.columns and m != best_baseline]]
genes[cols].sort_values(model, ascending=False).head(n_top_genes).round(3)

# %% [markdown]
# ## Library-size-normalised targets
#
# {glue:text}`norm_intro`

# %%
glue("norm_intro", "The same comparison on log1p_norm targets, where the total counts of a spot no longer help:"
     if len(targets) > 1 else "This run has log1p targets only (the book's default, to keep the build short); with "
     "log1p_norm added as the Targets bullet above says, this section compares the models on them, where the total "
     "counts of a spot no longer help.", display=False)
norm_text = ""
if len(targets) > 1:
    norm = summary[summary["target"] == targets[-1]].set_index("model")
    norm_best = norm.loc[baselines, "pearson"].idxmax()
    paired_norm = compare_to(run, model, [norm_best], target=targets[-1], n_boot=n_boot).loc[norm_best]
    norm_text = (
        f"On {targets[-1]} the best baseline is {norm_best} ({norm.loc[norm_best, 'pearson']:.3f}) and histomoe "
        f"scores {norm.loc[model, 'pearson']:.3f}, a difference of {paired_norm['diff']:+.3f} "
        f"({paired_norm['ci_lo']:+.3f} to {paired_norm['ci_hi']:+.3f}): "
        + {"tie": "a tie", "better": "a win for histomoe", "worse": "a loss for histomoe"}[paired_norm["verdict"]]
        + ". What remains on these targets is the part of expression the image of a spot tells apart from its "
        "neighbours', and on three patients with a frozen ImageNet encoder that part is small.")
    display(fold_table(results, target=targets[-1]).round(3))
glue("norm_verdict_text", norm_text, display=False)

# %% [markdown]
# {glue:text}`norm_verdict_text`

# %% [markdown]
# ## Beyond one spot: spatial context
#
# A spot's expression depends on more than the 112 µm under it. The context stage
# (`histomoe_core.spatial_context`) adds, from the images only and never across sections, the mean embedding of
# the spot's neighbours in rings of radius {glue:text}`ring_radii` µm and the embedding of a wider
# {glue:text}`wide_um` µm patch around it, to every model's input alike. Each model below is rerun with and
# without context on the same folds, panels and seeds ({glue:text}`ctx_n_seeds` here; the fixed variants, so the
# only change is the input).

# %%
from histomoe_core import pl
from histomoe_core.benchmark.compare import versus
from histomoe_core.benchmark.context_runs import CombinedRuns
from histomoe_core.spatial_context import WIDE_UM

ctx_runs = {"none": tl.load_run(dataset, dataset_options=dataset_options, encoder=encoder, text_encoder=text_encoder,
                                n_genes=n_genes, epochs=epochs, n_seeds=context_n_seeds or n_seeds, progress=False,
                                **{**benchmark_overrides, "targets": targets[:1], "models": context_models})}
for label, spec in spatial_contexts.items():
    ctx_runs[label] = tl.load_run(dataset, dataset_options=dataset_options, encoder=encoder, text_encoder=text_encoder,
                                  n_genes=n_genes, epochs=epochs, n_seeds=context_n_seeds or n_seeds, progress=False,
                                  **{**benchmark_overrides, "targets": targets[:1], "models": context_models,
                                     "spatial_context": spec})
both = CombinedRuns(ctx_runs)
glue("ctx_n_seeds", len(ctx_runs["none"].config["config"]["seeds"]), display=False)
gains = pd.DataFrame({(label, m): versus(both, [f"{m}@{label}"], f"{m}@none", target=targets[0], n_boot=n_boot).iloc[0]
                      for label in spatial_contexts for m in context_models}).T.astype(
    {"diff": float, "ci_lo": float, "ci_hi": float})
scores = pd.DataFrame({label: r.summary.set_index("model")["pearson"] for label, r in ctx_runs.items()})
best_gain = gains["diff"].astype(float).idxmax()
glue("ring_radii", " and ".join(str(r) for r in next(iter(spatial_contexts.values()))["neighbours"]["radius_um"]),
     display=False)
glue("wide_um", " and ".join(sorted({f"{spec['wide'].get('size_um', WIDE_UM):g}" for spec in spatial_contexts.values()
                                     if "wide" in spec})), display=False)
glue("ctx_best_label", best_gain[0], display=False)
glue("ctx_best_model", best_gain[1], display=False)
glue("ctx_best_gain", float(gains.loc[best_gain, "diff"]), display=False)
glue("ctx_best_lo", float(gains.loc[best_gain, "ci_lo"]), display=False)
glue("ctx_best_hi", float(gains.loc[best_gain, "ci_hi"]), display=False)
glue("ctx_goal", "is met" if gains.loc[best_gain, "diff"] >= 0.03 and gains.loc[best_gain, "ci_lo"] > 0 else "is not met",
     display=False)
scores.round(3)

# %%
gains[["diff", "ci_lo", "ci_hi", "verdict"]].round(3)

# %%
first_test = samples[run.config["folds"][0]["test"][0]]
glue("first_section", first_test.sample_id, display=False)
fig = pl.spatial_context.neighbourhood(first_test, context_spot if context_spot is not None else first_test.n_spots // 2,
                                       radius_um=next(iter(spatial_contexts.values()))["neighbours"]["radius_um"])

# %% [markdown]
# The largest gain is {glue:text}`ctx_best_model` with {glue:text}`ctx_best_label`: {glue:text}`ctx_best_gain:+.3f`
# (interval {glue:text}`ctx_best_lo:+.3f` to {glue:text}`ctx_best_hi:+.3f`). The goal set for context, at least
# +0.03 for the best model with an interval that excludes 0, {glue:text}`ctx_goal`. The figure shows the
# neighbourhood one spot of {glue:text}`first_section` gets: its patch, the wide field of view and the rings.

# %% [markdown]
# Every number above comes from the run folder `histomoe benchmark her2st --encoder efficientnet_lite0` writes:
# `results.csv` (one row per target, model, fold and seed), `selections.csv` (the inner-CV choices),
# `per_gene.csv`, `per_section.csv`, `summary.md`, the test predictions of every model and the trained MoE
# weights (see `histomoe_core.benchmark`). Building this run took {glue:text}`run_seconds:.0f` s of wall time
# with a warm embedding cache (fits cached by an earlier run are reused, not refit); re-rendering this chapter
# reloads it in seconds.
