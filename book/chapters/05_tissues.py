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
# # Many tissues: where experts could matter
#
# On her2st every section is one cancer type, so there is nothing for experts to specialise in. This chapter
# pools every tissue context on the mirrors (chapter {doc}`01_data`) into one benchmark and asks the question the
# mixture of experts was built for: do experts tied to tissues beat one global model measured on the same folds?
#
# The protocol of chapter {doc}`04_benchmark`, extended to several contexts:
#
# - **Contexts**: a context is a tissue and species (e.g. `human breast cancer`, `mouse brain`).
# - **Genes**: each context's panel ({glue:text}`n_genes` genes, HEST's rule) is chosen on that context's
#   training sections only; every model predicts the union of the panels, and a spot is trained and scored only
#   on its own context's panel (a mask). Human and mouse genes are different columns, never matched.
# - **Folds**: {glue:text}`n_folds` folds; every context with two or more groups (patients, else sections) has
#   held-out groups in every fold; a context with one group ({glue:text}`training_only`) is trained on, never scored.
# - **Metric**: per context, the HEST metric on its own panel; the headline is the **macro mean over contexts**,
#   so a big context cannot hide a small one; the worst context is reported too.
# - **Models** (same folds, same features): pooled single models (`ridge_cv`, `knn`, `mlp`), one ridge per
#   context told the context (`per_context`), mixtures with one expert per context routed by the image
#   (`moe_image`), by the metadata with a guide loss tying each context to its expert (`moe_meta_guided`), or
#   freely by both with top-2 routing and a balance loss and no labels (`moe_free_top2`, as MoLF does), and a
#   frozen pooled ridge expert shared by every spot plus one linear correction expert per context
#   (`shared_context`). `histomoe` is, in each fold, the inner-CV winner among {glue:text}`candidates`.

# %% tags=["parameters"]
profile = "her2st"
dataset = "her2st"
dataset_options = {}
encoder = "efficientnet_lite0"
text_encoder = "minilm"
seed = 0
n_genes = 50
epochs = None  # None: the benchmark's default
n_seeds = 1  # neural models' seeds (the tissues profile's default is 2: -p n_seeds=2, about 1.5x the time)
tissues = "tissues"  # the multi-context benchmark profile (synthetic-tissues on the smoke profile)
tissues_overrides = {}  # further BenchmarkConfig fields for it
max_spots = 600  # spots kept per section (a seeded random subset of larger ones); None (-p max_spots=null): all
model = "histomoe"
singles = ["ridge_cv", "knn", "mlp", "per_context"]  # the single models the mixtures are compared with
routed = "moe_image"  # the mixture whose routing is opened (its router reads only the image)
lco_models = ["ridge_cv", "moe_image"]  # models rerun leaving one context out
n_boot = 1000  # bootstrap replicates of the paired intervals
n_montage = 6  # patches per expert in the montage

# %%
import pandas as pd
from myst_nb import glue

from histomoe_core import pl, tl
from histomoe_core.benchmark.compare import compare_to, context_sizes, per_context_table, versus_best_single
from histomoe_core.benchmark.routing import dominant_counts, expert_usage, routing_stats, top_spots

run = tl.load_run(tissues, dataset_options={"max_spots": max_spots}, encoder=encoder, text_encoder=text_encoder,
                  epochs=epochs, n_seeds=n_seeds, progress=False, **tissues_overrides)
cfg = run.config["config"]
target = cfg["targets"][0]
samples = tl.run_samples(run)
sizes = context_sizes(run, samples)
table = per_context_table(run, target=target)
tested = [c for c in sizes.index if c in table.index]
glue("n_genes", int(cfg["n_genes"]), display=False)
glue("n_folds", len(run.config["folds"]), display=False)
glue("training_only", ", ".join(sorted(set(sizes.index) - set(tested))) or "none", display=False)
glue("candidates", ", ".join(cfg["models"][model].get("candidates", [model])), display=False)
glue("n_contexts", len(sizes), display=False)
glue("n_sections", len(samples), display=False)
glue("run_seconds", float(run.config["seconds"]), display=False)
capped = [f"{s.sample_id} ({s.meta['n_spots_total']:,} spots)" for s in samples if "n_spots_total" in s.meta]
glue("capped_text", (f"Sections with more than {max_spots} spots are cut to a seeded random {max_spots} of them so "
                     f"the chapter runs in minutes (-p max_spots=null keeps all): {', '.join(capped)}."
                     if capped else "Every section keeps all its spots."), display=False)
sizes.assign(train_spots=sizes["train_spots"].round(0).astype(int))

# %% [markdown]
# {glue:text}`n_sections` sections in {glue:text}`n_contexts` contexts; `train_spots` is the mean number of
# training spots of a context over the folds. {glue:text}`capped_text`
#
# ## Per context
#
# Each context's HEST metric on its own panel (mean over the folds where it is tested and over seeds), the macro
# mean over contexts and the worst context:

# %%
shown = [m for m in [*singles, "moe_image", "moe_meta_guided", "moe_free_top2", "shared_context", model]
         if m in table.columns]
order = table.loc["macro mean", shown].sort_values(ascending=False).index
best_pooled = table.loc["macro mean", [m for m in ("ridge_cv", "knn", "mlp") if m in table.columns]].astype(float).idxmax()
glue("best_pooled", best_pooled, display=False)
glue("best_pooled_r", float(table.loc["macro mean", best_pooled]), display=False)
glue("model_r", float(table.loc["macro mean", model]), display=False)
glue("model_worst", float(table.loc["worst context", model]), display=False)
glue("best_overall", str(order[0]), display=False)
table[[model, *[m for m in order if m != model]]].round(3)  # histomoe first: the model the text discusses

# %%
fig = pl.contexts.context_bars(table.drop(index=["macro mean", "worst context"]),
                               models=[best_pooled, "per_context", model],
                               title="HEST metric per context (mean over folds and seeds)")

# %% [markdown]
# ## Paired differences
#
# `histomoe` against the pooled single models on the macro mean (paired on folds, sections and seeds; a
# bootstrap over held-out sections within each fold and context), then, context by context, against the best
# single model of that context:

# %%
macro = compare_to(run, model, [m for m in singles if m in table.columns], target=target, n_boot=n_boot)
glue("diff_pooled", float(macro.loc[best_pooled, "diff"]), display=False)
glue("lo_pooled", float(macro.loc[best_pooled, "ci_lo"]), display=False)
glue("hi_pooled", float(macro.loc[best_pooled, "ci_hi"]), display=False)
glue("verdict_pooled", macro.loc[best_pooled, "verdict"], display=False)
glue("goal_macro", "is met" if macro.loc[best_pooled, "diff"] >= 0.03 and macro.loc[best_pooled, "ci_lo"] > 0
     else "is not met", display=False)
macro[["diff", "ci_lo", "ci_hi", "verdict", "folds_won"]].round(3)

# %%
per_ctx = versus_best_single(run, model, [m for m in singles if m in table.columns], target=target, n_boot=n_boot)
per_ctx = per_ctx.join(sizes["train_spots"].round(0).astype(int)).sort_values("train_spots")
small = per_ctx.index[: max(1, len(per_ctx) // 3)]
vs_pc = table.loc[small, model] - table.loc[small, "per_context"]
glue("small_contexts", ", ".join(small), display=False)
glue("small_vs_pc", "at least as good as" if (vs_pc >= 0).all() else "below", display=False)
glue("n_ctx_better", int((per_ctx["verdict"] == "better").sum()), display=False)
glue("n_ctx_tie", int((per_ctx["verdict"] == "tie").sum()), display=False)
glue("n_ctx_worse", int((per_ctx["verdict"] == "worse").sum()), display=False)
per_ctx.round(3)

# %% [markdown]
# On the macro mean `histomoe` scores {glue:text}`model_r:.3f` against {glue:text}`best_pooled_r:.3f` for the
# best pooled single model ({glue:text}`best_pooled`): a paired difference of {glue:text}`diff_pooled:+.3f`
# (interval {glue:text}`lo_pooled:+.3f` to {glue:text}`hi_pooled:+.3f`, verdict **{glue:text}`verdict_pooled`**).
# The goal set for this benchmark, `histomoe` at least 0.03 above the best pooled model, {glue:text}`goal_macro`.
# Context by context against the best single model of each, `histomoe` is better in {glue:text}`n_ctx_better`,
# ties in {glue:text}`n_ctx_tie` and is worse in {glue:text}`n_ctx_worse`. On the contexts with the fewest
# training spots ({glue:text}`small_contexts`) it is {glue:text}`small_vs_pc` the per-context ridge. The best
# model on the macro mean is {glue:text}`best_overall`; its worst context scores {glue:text}`model_worst:.3f` under
# `histomoe`.
#
# ## What the inner cross-validation chose

# %%
run.choices(target=target)

# %% [markdown]
# ## Routing against context
#
# For every mixture: per fold, the normalised mutual information (NMI) and adjusted Rand index (ARI) between a
# spot's dominant expert and its context, the median gate entropy (0: one expert, 1: uniform) and how many
# experts dominate some spot.

# %%
mixtures = [m for m in ("moe_image", "moe_meta_guided", "moe_free_top2", "shared_context") if m in table.columns]
stats = pd.concat({m: routing_stats(run, m, target=target) for m in mixtures})
nmi = stats.groupby(level=0)["nmi"].mean()
glue("routed", routed, display=False)
glue("nmi_image", float(nmi.get(routed, float("nan"))), display=False)
glue("nmi_free", float(nmi.get("moe_free_top2", float("nan"))), display=False)
glue("nmi_guided", float(nmi.get("moe_meta_guided", float("nan"))), display=False)
glue("goal_nmi", "reaches" if nmi.get(routed, 0) >= 0.9 else "does not reach", display=False)
stats.round(3).astype({c: int for c in ("experts_used", "n_spots") if c in stats.columns})

# %%
fig = pl.contexts.contingency_heatmap(dominant_counts(run, routed, target=target),
                                      title=f"{routed}: share of each context's test spots per dominant expert")

# %% [markdown]
# The image-only router ({glue:text}`routed`) recovers the context with an NMI of {glue:text}`nmi_image:.2f`
# (mean over folds), so it {glue:text}`goal_nmi` the 0.9 this benchmark asked for. The free top-2 router on
# image and metadata reaches {glue:text}`nmi_free:.2f`, the guided metadata router {glue:text}`nmi_guided:.2f`
# (its guide loss ties each context to one expert by construction). Mean gates per context:

# %%
expert_usage(run, routed, target=target).round(2)

# %% [markdown]
# The test patches that pick each expert most strongly (all folds):

# %%
fig = pl.routing.expert_montage(samples, top_spots(run, routed, target=target, n=n_montage))

# %% [markdown]
# ## Leaving a context out
#
# Each fold below holds out *every* section of one context, so the models meet a tissue they never saw. The
# held-out context has no training sections to choose its panel on, so it is scored on the genes of the other
# contexts' panels that its sections measure. `cost` is the drop against the same model in the stratified
# benchmark above, where the context had training sections and was scored on its own panel: it mixes the unseen
# tissue with the other genes. The routing table shows which experts the held-out spots were sent to.

# %%
lco = tl.load_run(tissues, dataset_options={"max_spots": max_spots}, encoder=encoder, text_encoder=text_encoder,
                  epochs=epochs, n_seeds=1, progress=False,
                  **{**tissues_overrides, "scheme": "leave_context_out", "models": lco_models})
lco_table = per_context_table(lco, target=target).drop(index=["macro mean", "worst context"])
cost = (table.loc[lco_table.index.intersection(table.index), lco_models] - lco_table[lco_models]).add_prefix("cost ")
lco_view = lco_table[lco_models].join(cost)
glue("lco_mean_cost", float(cost.mean().mean()), display=False)
glue("lco_best", str(lco_table[lco_models].mean().idxmax()), display=False)
pl.tables.shown(lco_view, missing="n/a (not scored above)")  # contexts that are training-only above

# %%
lco_usage = expert_usage(lco, routed, target=target) if routed in lco_models else pd.DataFrame()
lco_usage.round(2)

# %% [markdown]
# A context never seen in training costs the models {glue:text}`lco_mean_cost:.3f` of HEST metric on average
# where a comparison exists; over the held-out contexts {glue:text}`lco_best` does best. The router has no
# expert trained for an unseen tissue: the usage table shows which experts its spots are sent to (rows: the
# held-out context of each fold).
#
# This run took {glue:text}`run_seconds:.0f` s (warm embeddings); the chapter reloads it from the cache.
