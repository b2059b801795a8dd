"""The model table: every benchmarked model as data (``kind`` + options), the ablation tables, and
:func:`create_model`, the one factory that turns a spec into an estimator."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from histomoe_core.errors import HistoMoEError

if TYPE_CHECKING:
    import pandas as pd


#: the neural models all share these training settings unless a model overrides them
TRAIN = {"epochs": 60, "batch_size": 128, "lr": 1e-3, "weight_decay": 1e-2, "patience": 10}

#: model kinds trained by gradient descent (seeded, with training settings); the others are fit once per fold
NEURAL_KINDS = ("histomoe", "mlp")
#: a model made of candidates, one chosen per training fold by inner CV (:func:`select`)
SELECT = "select"
#: model specs: ``kind`` is a baseline name (``BASELINES``), ``"histomoe"`` or ``"select"``; other keys are its
#: options. ``centre``: train on section-centred targets (None: the benchmark's ``centre_targets``).
#: The anchored mixture: a frozen ridge expert and three retrieval experts (k = 10, 50, 200) weighted per spot by
#: an image router that starts uniform; early stopping may keep the untrained start.
ANCHORED = {"kind": "histomoe", "n_experts": 1, "expert": "linear", "pca_dim": 256, "init": "ridge",
            "freeze_init": True, "retrieval_k": (10, 50, 200), "router_input": "image"}
#: the plain soft MoE: four MLP experts and an image router, trained from scratch
PLAIN = {"kind": "histomoe", "n_experts": 4, "expert": "mlp", "hidden": 128, "pca_dim": 256, "router_input": "image"}
MLP = {"kind": "mlp", "pca_dim": 256, "hidden": 128, "match_experts": 4, "dropout": 0.1}


def _centring(spec: Mapping[str, Any]) -> dict[str, dict]:
    """The two training-target variants of a spec: section-centred and raw."""
    return {"centred": {**spec, "centre": True}, "raw": {**spec, "centre": False}}


#: HistoMoE as benchmarked: per training fold, inner CV picks the architecture (anchored or plain), the router's
#: input (image, or image and metadata) and the training targets (section-centred or raw)
HISTOMOE_CANDIDATES = {
    "anchored_centred": {**ANCHORED, "centre": True},
    "anchored_raw": {**ANCHORED, "centre": False},
    "anchored_both_centred": {**ANCHORED, "router_input": "both", "centre": True},
    "plain_centred": {**PLAIN, "centre": True},
}


def select(candidates: Mapping[str, Mapping[str, Any]], *, inner_folds: int = 3) -> dict:
    """A model that is whichever of ``candidates`` scores best (HEST metric) in the inner CV of each training
    fold (``inner_folds`` grouped folds, :func:`~histomoe_core.features.group_folds`)."""
    return {"kind": SELECT, "candidates": {k: dict(v) for k, v in candidates.items()}, "inner_folds": inner_folds}


#: the main table: every model that has a setting to choose chooses it inside the training folds
MODELS: dict[str, dict] = {
    "ridge_hest": {"kind": "ridge_hest", "centre": False},  # HEST-Bench's recipe as published: nothing tuned
    "ridge_cv": select(_centring({"kind": "ridge_cv"})),  # alpha by inner CV; centring chosen by inner CV
    "knn": select(_centring({"kind": "knn"})),  # k by inner CV; centring chosen by inner CV
    "per_context": select(_centring({"kind": "per_context"})),
    "mlp": select(_centring(MLP)),
    "moe_soft_mlp": {**PLAIN, "centre": True},  # one fixed candidate of histomoe, for reference
    "histomoe": select(HISTOMOE_CANDIDATES),
}

#: the multi-tissue table (profile ``tissues``): targets are never section-centred there (sections differ by
#: tissue, a real and predictable difference); one expert per context where a mixture ties experts to contexts
CONTEXT_MOE = {"kind": "histomoe", "n_experts": "contexts", "pca_dim": 256, "centre": False}
#: a frozen pooled ridge expert shared by every spot plus one linear correction expert per context, started at
#: zero and shrunk toward it by weight decay: experts share what the tissues have in common
SHARED_CONTEXT = {**CONTEXT_MOE, "expert": "linear", "shared_expert": True, "init": "ridge", "freeze_init": True}
TISSUE_CANDIDATES = {
    "shared_meta_guided": {**SHARED_CONTEXT, "router_input": "meta", "top_k": 1, "guide_weight": 0.1},
    "shared_image": {**SHARED_CONTEXT, "router_input": "image"},
    # retrieval over every context's spots: k = 10 and 50 (k = 200 gathers 200 x the union panel per spot)
    "anchored_image": {**ANCHORED, "retrieval_k": (10, 50), "centre": False},
}
TISSUE_MODELS: dict[str, dict] = {
    "ridge_cv": {"kind": "ridge_cv", "centre": False},  # one pooled ridge over every context
    "knn": {"kind": "knn", "centre": False},
    "mlp": {**MLP, "centre": False},
    "per_context": {"kind": "per_context", "centre": False},  # one ridge per context, told the context
    # mixtures of MLP experts, one per context: routed by the image (free, soft), by the metadata with a guide
    # loss tying each context to its expert (guided), or free top-2 routing on both with a balance loss (MoLF-like)
    "moe_image": {**CONTEXT_MOE, "expert": "mlp", "hidden": 64, "router_input": "image"},
    "moe_meta_guided": {**CONTEXT_MOE, "expert": "mlp", "hidden": 64, "router_input": "meta", "top_k": 1,
                        "guide_weight": 0.1},
    "moe_free_top2": {**CONTEXT_MOE, "expert": "mlp", "hidden": 64, "router_input": "both", "top_k": 2,
                      "balance_weight": 0.05},
    "shared_context": dict(TISSUE_CANDIDATES["shared_meta_guided"]),
    "histomoe": None,  # set below: the inner-CV choice among TISSUE_CANDIDATES
}

#: ablations (book chapter 08): routing input, number of experts, top-k vs soft, and the MoE ideas tried
ABLATIONS: dict[str, dict] = {
    # the fixed anchored MoE (one of histomoe's candidates)
    "histomoe_anchored": {**ANCHORED, "centre": True},
    "knn_k50": {"kind": "knn", "k": 50},
    # routing input of the anchored MoE (her2st has one organ: the metadata router is a learned constant)
    "histomoe_route_meta": {**ANCHORED, "router_input": "meta"},
    "histomoe_route_both": {**ANCHORED, "router_input": "both"},
    # number of experts and top-k vs soft, plain MoE of MLP experts
    "moe_mlp_e2": {**PLAIN, "n_experts": 2},
    "moe_mlp_e8": {**PLAIN, "n_experts": 8, "hidden": 64},
    "moe_mlp_top1": {**PLAIN, "top_k": 1},
    "moe_mlp_top2": {**PLAIN, "top_k": 2},
    "moe_mlp_top1_noisy": {**PLAIN, "top_k": 1, "noisy_gating": True, "balance_weight": 0.1},
    "histomoe_top1": {**ANCHORED, "top_k": 1},
    # ideas: regularisation, starting from ridge, a ridge expert with learned corrections, retrieval experts
    "moe_mlp_dropout": {**PLAIN, "input_dropout": 0.5, "dropout": 0.5},
    "moe_ridge_linear": {"kind": "histomoe", "n_experts": 4, "expert": "linear", "pca_dim": 256, "init": "ridge",
                         "router_input": "image", "train": {"lr": 1e-4}},
    "moe_ridge_shared_mlp": {**PLAIN, "n_experts": 2, "hidden": 64, "shared_expert": True, "init": "ridge",
                             "freeze_init": True},
    "histomoe_k50_only": {**ANCHORED, "retrieval_k": (50,)},
    "histomoe_trainable_ridge": {**ANCHORED, "freeze_init": False, "train": {"lr": 1e-4}},
    "histomoe_retrieval_by_section": {**ANCHORED, "retrieval_exclude": "sample"},
    # fixed centred and raw variants of the models (the centring candidates of the main table's selections)
    "ridge_cv_centred": {"kind": "ridge_cv", "centre": True},
    "ridge_cv_raw": {"kind": "ridge_cv", "centre": False},
    "knn_k50_raw": {"kind": "knn", "k": 50, "centre": False},
    "moe_soft_mlp_raw": {**PLAIN, "centre": False},
    "histomoe_raw": {**ANCHORED, "centre": False},
}
#: routing on spatial context (issue 15): need a ``spatial_context`` kind with use "router" or "both" in the
#: benchmark config; kept out of ABLATIONS, which runs without a context stage
SPATIAL_ABLATIONS: dict[str, dict] = {
    "histomoe_route_spatial": {**ANCHORED, "router_input": "spatial", "centre": True},
    "histomoe_route_image_spatial": {**ANCHORED, "router_input": "image+spatial", "centre": True},
    "moe_soft_mlp_route_image_spatial": {**PLAIN, "router_input": "image+spatial", "centre": True},
}

#: the models every her2st ablation run compares against
ABLATION_REFERENCES = ("ridge_cv", "knn_k50", "moe_soft_mlp", "histomoe_anchored", "histomoe")

#: synthetic routing ablations: routing input, soft vs top-1, the guide loss, fewer experts than organs
SYNTHETIC_HISTOMOE = {"kind": "histomoe", "n_experts": 6, "expert": "mlp", "hidden": 32, "router_input": "meta",
                      "top_k": 1, "guide_weight": 0.1}
SYNTHETIC_ABLATIONS: dict[str, dict] = {
    # the fixed anchored MoE (one of histomoe's candidates)
    "histomoe_anchored": {**ANCHORED, "centre": True},
    "histomoe_route_image": {**SYNTHETIC_HISTOMOE, "router_input": "image"},
    "histomoe_route_both": {**SYNTHETIC_HISTOMOE, "router_input": "both"},
    "histomoe_soft": {**SYNTHETIC_HISTOMOE, "top_k": None},
    "histomoe_no_guide": {**SYNTHETIC_HISTOMOE, "guide_weight": 0.0},
    "histomoe_e3": {**SYNTHETIC_HISTOMOE, "n_experts": 3},
}
SYNTHETIC_REFERENCES = ("per_context", "mlp", "histomoe")


#: what each model of the ablation studies tests: name -> (group, description)
ABLATION_NOTES: dict[str, tuple[str, str]] = {
    "ridge_cv": ("reference", "ridge, alpha and centring by inner CV"),
    "knn_k50": ("reference", "retrieval, k = 50"),
    "histomoe_anchored": ("reference", "the anchored MoE, section-centred targets (fixed)"),
    "per_context": ("reference", "one ridge per organ (told the organ)"),
    "mlp": ("reference", "single MLP, about the MoE's parameters"),
    "moe_soft_mlp": ("reference", "plain soft MoE, 4 MLP experts, image router"),
    "histomoe": ("reference", "HistoMoE as benchmarked (variant chosen by inner CV)"),
    "histomoe_route_meta": ("routing input", "anchored MoE, router reads the metadata"),
    "histomoe_route_both": ("routing input", "anchored MoE, router reads image and metadata"),
    "histomoe_route_image": ("routing input", "router reads the image"),
    "moe_mlp_e2": ("number of experts", "plain MoE, 2 MLP experts"),
    "moe_mlp_e8": ("number of experts", "plain MoE, 8 MLP experts (64 hidden)"),
    "histomoe_e3": ("number of experts", "3 experts for the organs"),
    "moe_mlp_top1": ("top-k vs soft", "plain MoE, top-1"),
    "moe_mlp_top2": ("top-k vs soft", "plain MoE, top-2"),
    "moe_mlp_top1_noisy": ("top-k vs soft", "plain MoE, noisy top-1, balance weight 0.1"),
    "histomoe_top1": ("top-k vs soft", "anchored MoE, top-1"),
    "histomoe_soft": ("top-k vs soft", "soft routing"),
    "histomoe_no_guide": ("guided routing", "no guide loss"),
    "moe_mlp_dropout": ("MoE ideas", "plain MoE, input and hidden dropout 0.5"),
    "moe_ridge_linear": ("MoE ideas", "4 linear experts started from the ridge fit, trained"),
    "moe_ridge_shared_mlp": ("MoE ideas", "frozen shared ridge expert + 2 MLP correction experts"),
    "histomoe_k50_only": ("MoE ideas", "anchored MoE with one retrieval expert (k = 50)"),
    "histomoe_trainable_ridge": ("MoE ideas", "anchored MoE, ridge expert trainable"),
    "histomoe_retrieval_by_section": ("MoE ideas", "anchored MoE, training retrieval skips own section only"),
    "ridge_cv_centred": ("training targets", "ridge_cv on section-centred targets"),
    "ridge_cv_raw": ("training targets", "ridge_cv on raw (not section-centred) targets"),
    "knn_k50_raw": ("training targets", "knn_k50 on raw targets"),
    "moe_soft_mlp_raw": ("training targets", "plain soft MoE on raw targets"),
    "histomoe_raw": ("training targets", "the anchored MoE on raw targets"),
    "histomoe_route_spatial": ("spatial context", "anchored MoE, router reads the spatial context only"),
    "histomoe_route_image_spatial": ("spatial context", "anchored MoE, router reads image and spatial context"),
    "moe_soft_mlp_route_image_spatial": ("spatial context", "plain soft MoE, router reads image and spatial context"),
}


def ablation_references(dataset: str) -> list[str]:
    """The reference models of a dataset's ablation study (also rerun on section-centred embeddings)."""
    return list(SYNTHETIC_REFERENCES if dataset == "synthetic" else ABLATION_REFERENCES)


def ablation_models(dataset: str) -> list[str]:
    """Model names of the ablation study for a dataset (synthetic: routing; otherwise: the MoE ideas on real data)."""
    if dataset == "synthetic":
        return [*SYNTHETIC_REFERENCES, *SYNTHETIC_ABLATIONS]
    return [*ABLATION_REFERENCES, *ABLATIONS]



def create_model(spec: Mapping[str, Any], *, name: str, train: Mapping[str, Any]):
    """An estimator from a model spec (``kind`` + options); neural models get the shared training settings."""
    from histomoe_core.baselines import BASELINES
    from histomoe_core.train import MoERegressor

    spec = dict(spec)
    kind = spec.pop("kind")
    spec.pop("centre", None)
    if kind in NEURAL_KINDS:
        spec["train"] = {**dict(train), **dict(spec.get("train") or {})}
    if kind == "histomoe":
        return MoERegressor(name=name, **spec)
    if kind not in BASELINES:
        raise HistoMoEError(f"model {name}: unknown kind {kind!r}; use 'histomoe' or one of {BASELINES.list()}")
    return BASELINES.get(kind)(name=name, **spec)


def is_selection(spec: Mapping[str, Any]) -> bool:
    """True for a ``select`` spec: candidates of which inner CV on each training fold picks one."""
    return spec["kind"] == SELECT


def is_deterministic(spec: Mapping[str, Any]) -> bool:
    """True for models fit once per fold (no seed, no training settings); a selection when all its candidates are."""
    if is_selection(spec):
        return all(is_deterministic(c) for c in spec["candidates"].values())
    return spec["kind"] not in NEURAL_KINDS


def describe_model(spec: Mapping[str, Any]) -> str:
    """One line in words for a model spec (as the book prints it)."""
    kind = spec["kind"]
    if kind == SELECT:
        return "the inner-CV choice among " + ", ".join(spec["candidates"])
    targets = {True: "section-centred targets", False: "raw targets", None: "the benchmark's default targets"}
    tail = targets[spec.get("centre")]
    if kind != "histomoe":
        return f"{kind}, {tail}"
    router = {"image": "the image", "meta": "the metadata", "both": "the image and the metadata",
              "spatial": "the spatial context", "image+spatial": "the image and the spatial context"}[
        spec.get("router_input", "image")]
    if spec.get("retrieval_k"):
        ks = ", ".join(map(str, spec["retrieval_k"]))
        body = f"a frozen ridge expert and retrieval experts (k = {ks}) mixed by a router reading {router}"
    else:
        body = (f"{spec.get('n_experts', 4)} {spec.get('expert', 'mlp')} experts mixed by a router reading {router}"
                + (", top-" + str(spec["top_k"]) if spec.get("top_k") else ", soft routing"))
    return f"{body}; {tail}"


def candidate_table(spec: Mapping[str, Any]) -> "pd.DataFrame":
    """One row per candidate of a ``select`` spec (or the spec itself) with its description."""
    import pandas as pd

    cands = spec["candidates"] if spec["kind"] == SELECT else {spec["kind"]: spec}
    return pd.DataFrame({"variant": list(cands), "what it is": [describe_model(c) for c in cands.values()]}
                        ).set_index("variant")


TISSUE_MODELS["histomoe"] = select(TISSUE_CANDIDATES)
