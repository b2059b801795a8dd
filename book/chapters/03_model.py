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
# # The model: a router, experts, and the losses they return
#
# HistoMoE predicts a panel of genes for every spot from the embedding of its image patch. Instead of one
# regression head it has several **experts** (small heads), and a **router** decides, spot by spot, how much
# each expert contributes. The router can read the image embedding, an embedding of the sample's metadata
# (organ, cancer type), or both. This chapter builds the model piece by piece, then trains it on the synthetic
# dataset, where the right answer is known: every organ has its own gene program, so a good router should send
# each organ to its own expert.
#
# The code is three small modules in `histomoe_core.moe` (after ST-MoE's router / experts / MoE split):
#
# | piece | what it does |
# |---|---|
# | `Router` | logits from the image features, the metadata embedding, or both; gates by softmax over all experts (*soft*) or over the `top_k` largest logits (*sparse*, {term}`top-k routing`), optionally with {term}`noisy gating` {cite}`shazeer2017moe` |
# | `Experts` | `E` heads (`linear` or `mlp`) evaluated in one batched product; optional {term}`retrieval` experts (mean expression of the nearest training spots) and an optional *shared* expert added to every prediction |
# | `HistoMoE` | `pred = sum_e gate_e * expert_e(x) [+ shared(x)]`, returned with the gates, every expert's prediction and the auxiliary losses |

# %% tags=["parameters"]
profile = "her2st"
dataset = "her2st"
dataset_options = {}
encoder = "efficientnet_lite0"
text_encoder = "minilm"
seed = 0
n_genes = 50
epochs = None  # None: the benchmark's default
n_seeds = None  # None: the benchmark's default
reference = "synthetic"  # the dataset with a known answer this chapter trains on
fold = None  # fold whose model is opened; None: the first

# %%
import numpy as np
import pandas as pd
import torch
from myst_nb import glue
from sklearn.metrics import normalized_mutual_info_score

from histomoe_core import tl
from histomoe_core.benchmark import PROFILES, make_config
from histomoe_core.benchmark.models import candidate_table
from histomoe_core.moe import HistoMoE, MoEConfig, count_parameters

torch.manual_seed(seed)
cfg = MoEConfig(in_dim=16, n_genes=5, meta_dim=3, n_experts=4, top_k=2, router_input="both", expert="mlp",
                hidden=8, noisy_gating=True, guide_weight=0.1, n_contexts=3)
model = HistoMoE(cfg)
pd.Series(cfg.as_dict()).to_frame("MoEConfig")

# %% [markdown]
# ## One forward pass
#
# The forward pass takes a batch of image embeddings `(B, D)`, the metadata embeddings `(B, M)` and, for the
# guided-routing loss, the context label of each spot. It returns a `MoEOutput`: the prediction, the gate
# weights (rows sum to one), every expert's prediction and a dictionary of **unweighted** auxiliary losses. The
# weights of those losses live in the config, and `model.loss` adds them to the prediction error, so nothing is
# hidden inside the forward pass.

# %%
x, meta, context = torch.randn(6, 16), torch.eye(3)[torch.arange(6) % 3], torch.arange(6) % 3
out = model.train()(x, meta, context)
pd.DataFrame({"shape": {k: tuple(getattr(out, k).shape) for k in ("pred", "gates", "expert_preds")}})

# %%
pd.DataFrame(out.gates.detach().numpy().round(3), columns=[f"expert {e}" for e in range(cfg.n_experts)])

# %% [markdown]
# With `top_k=2` every row has exactly two non-zero gates. The auxiliary losses are:
#
# - **balance** ({term}`load-balance loss`, Switch Transformer {cite}`fedus2022switch`): `E * sum_e f_e * P_e`, with `f_e` the fraction of spots dispatched to
#   expert `e` and `P_e` its mean router probability. It is 1 when routing is uniform and `E` when every spot
#   goes to one expert, so it pushes against collapse;
# - **z** ({term}`router z-loss`, ST-MoE {cite}`zoph2022stmoe`): the mean squared log-sum-exp of the router logits, which keeps logits small and training stable;
# - **guide**: the cross-entropy of the router logits toward the expert tied to each spot's context
#   (organ / cancer type); present only when context labels are given.
#
# In evaluation mode the dictionary is empty: these losses shape training only.

# %%
aux = {k: v.item() for k, v in out.aux.items()}
total, parts = model.loss(out, torch.randn(6, 5))
glue("n_params_demo", count_parameters(model), display=False)
pd.DataFrame({"unweighted": aux, "weight": model.aux_weights()}).assign(
    contribution=lambda t: t["unweighted"] * t["weight"]).round(4)

# %% [markdown]
# ## Training on organs with their own gene programs
#
# The synthetic dataset ({doc}`01_data`) draws each spot's cell-type mix, renders it as an image with an
# organ-specific texture, and draws expression from an **organ-specific** program: the same visual cell type
# drives different genes in each organ. A single regression head has to learn every program at once and tell
# the organs apart from texture alone; a mixture routed by the metadata can give each organ its own expert.
#
# The benchmark below (`histomoe benchmark synthetic`) trains, on patient-grouped folds: HistoMoE with the
# router reading the metadata embedding, one expert per organ (`top_k=1`) and a small guide loss; a single
# MLP with about the same number of parameters; per-organ ridge regressions (which are *told* the organ); a
# pooled ridge; and nearest-neighbour retrieval.

# %%
kw = dict(dataset_options=dataset_options, encoder=encoder, text_encoder=text_encoder, n_genes=n_genes,
          epochs=epochs, n_seeds=n_seeds) if dataset == reference else {}
run = tl.load_run(reference, seed=seed, progress=False, **kw)
summary = run.summary.set_index("model")
glue("syn_histomoe", float(summary.loc["histomoe", "pearson"]), display=False)
glue("syn_mlp", float(summary.loc["mlp", "pearson"]), display=False)
glue("syn_per_context", float(summary.loc["per_context", "pearson"]), display=False)
glue("syn_n_folds", int(summary["n_folds"].max()), display=False)
glue("syn_n_seeds", int(summary["n_seeds"].max()), display=False)
summary[["pearson", "pearson_sd_folds", "pearson_sd_seeds", "pearson_section", "mse"]].sort_values(
    "pearson", ascending=False).round(3)

# %% [markdown]
# Over {glue:text}`syn_n_folds` folds and {glue:text}`syn_n_seeds` seeds, HistoMoE reaches a mean Pearson of
# {glue:text}`syn_histomoe:.3f` (HEST metric: per gene over the pooled test spots, mean over genes) against
# {glue:text}`syn_mlp:.3f` for the single MLP of the same size. Per-organ ridge models, which receive the organ
# label directly, score {glue:text}`syn_per_context:.3f`: routing by metadata recovers most of what knowing the
# organ is worth.
#
# ## Did the router find the organs?
#
# The run keeps every fold's held-out predictions together with the gates. Each held-out spot is assigned to
# its dominant expert; the table shows the mean gate weight of every expert per organ, and the normalised
# mutual information (NMI) between dominant expert and organ measures how cleanly the router separates organs
# (1: one expert per organ).

# %%
samples = tl.run_samples(run)
organ = {s.sample_id: s.meta["organ"] for s in samples}
folds = [f["name"] for f in run.config["folds"]]
fold = fold or folds[0]
preds = {f: run.predictions("histomoe", f, seed=seed) for f in folds}
nmi = pd.Series({f: normalized_mutual_info_score([organ[s] for s in p["sample"]], p["gates"].argmax(1))
                 for f, p in preds.items()}, name="NMI(dominant expert, organ)")
glue("syn_nmi_mean", float(nmi.mean()), display=False)
glue("syn_nmi_min", float(nmi.min()), display=False)
nmi.to_frame().round(3)

# %%
p = preds[fold]
usage = pd.DataFrame(p["gates"], columns=[f"expert {e}" for e in range(p["gates"].shape[1])])
usage["organ"] = [organ[s] for s in p["sample"]]
usage.groupby("organ").mean().style.background_gradient(cmap="Blues", axis=None).format("{:.2f}")

# %% [markdown]
# The NMI is {glue:text}`syn_nmi_mean:.2f` on average over folds (lowest {glue:text}`syn_nmi_min:.2f`). The
# router reads the metadata embedding, which is identical for all sections of an organ, so each organ goes to
# one expert; the guide loss ties organ `c` to expert `c`, and the balance loss keeps any one expert from
# absorbing several organs. {doc}`06_routing` opens these models further (which genes each expert predicts,
# and how a router that reads only the image behaves), and {doc}`08_ablations` removes the pieces one at a time.
#
# ## The trained model
#
# Each fold's HistoMoE is saved with its config; `run.load_model` rebuilds it. Its first module fixes the
# input normalisation (standardisation, and a PCA projection when `pca_dim` is set) fitted on the training
# spots, so the saved model applies to raw embeddings.

# %%
trained = run.load_model("histomoe", fold, seed=seed)
glue("syn_n_params", count_parameters(trained), display=False)
pd.Series({k: v for k, v in trained.cfg.as_dict().items() if v not in (None, 0, 0.0, False)}).to_frame(
    f"{fold}, seed {seed}")

# %% [markdown]
# The model has {glue:text}`syn_n_params` trainable parameters. The same module runs end to end with a vision
# encoder in front (`HistoMoEEndToEnd(encoder, moe)`), which is how {doc}`07_attributions` computes
# attributions back to the pixels and how a GPU user would fine-tune the encoder together with the experts.

# %% [markdown]
# ## The model benchmarked on real data
#
# The model trained above is the synthetic profile's. On {glue:text}`bench_dataset`, `histomoe` is not one fixed
# architecture: in each training fold, inner cross-validation picks one of these variants (chapter
# {doc}`04_benchmark` lists what each fold chose):

# %%
bench = make_config(dataset if dataset in PROFILES else "her2st")
glue("bench_dataset", bench.dataset, display=False)
candidate_table(bench.models["histomoe"]).style.set_properties(**{"white-space": "normal"})  # descriptions in full
