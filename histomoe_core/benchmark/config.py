"""Benchmark configuration: :class:`BenchmarkConfig`, the named :data:`PROFILES` and :func:`make_config`."""
from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from histomoe_core.benchmark.models import (ABLATIONS, MODELS, SPATIAL_ABLATIONS, SYNTHETIC_ABLATIONS, SYNTHETIC_HISTOMOE,
                                            TISSUE_MODELS, TRAIN)
from histomoe_core.errors import HistoMoEError


@dataclass(frozen=True)
class BenchmarkConfig:
    dataset: str
    dataset_options: Mapping[str, Any] = field(default_factory=dict)
    encoder: str = "efficientnet_lite0"
    text_encoder: str = "minilm"
    scheme: str = "lopo"  #: "lopo", "kfold" (patients), "stratified" (patients, every context in every fold)
    #: or "hest" (HEST-Bench published splits), or "hest_pan" (several tasks: fold k holds out HEST split
    #: k mod n_splits of every task, :func:`~histomoe_core.data.hest.hest_pan_folds`)
    k: int | None = None  #: folds for "kfold" ("hest_pan": default the most splits of any task)
    folds: tuple[str, ...] | None = None  #: run only these fold names
    n_genes: int = 50
    min_frac: float = 0.1
    #: gene panel rule (:data:`~histomoe_core.data.genes.PANEL_RULES`), run on each fold's training sections
    panel_rule: str = "hest"
    #: "pooled": one panel for all spots; "per_context": one panel per context, models predict their union
    #: (:mod:`~histomoe_core.benchmark.panels`)
    panels: str = "pooled"
    gene_list: str | None = None  #: a fixed gene list (path, or "hest" for the task's shipped list)
    targets: tuple[str, ...] = ("log1p", "log1p_norm")
    seeds: tuple[int, ...] = (0, 1, 2)
    models: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: copy.deepcopy(MODELS))
    #: train on per-section centred targets (models may opt out with centre=False): right when sections differ
    #: technically (sequencing depth) as on her2st, wrong when they differ biologically (organs) as on synthetic
    centre_targets: bool = True
    context_key: str = "organ"
    #: "none", or "section": subtract each section's mean embedding from its spots (train and test sections
    #: alike), a per-slide batch correction applied to every model. TRANSDUCTIVE: it reads the test sections'
    #: images (never their expression) before predicting them; kept out of every headline number
    embedding_norm: str = "none"
    train: Mapping[str, Any] = field(default_factory=lambda: dict(TRAIN))
    patch: Mapping[str, Any] = field(default_factory=dict)  #: PatchSpec fields
    #: spatial context stage (:mod:`~histomoe_core.spatial_context`): kind ("neighbours", "wide", "section") ->
    #: options and ``use`` ("features": appended to every model's image features; "router": read only by a
    #: HistoMoE router with router_input "spatial" / "image+spatial"; "both"). Empty: one patch per spot
    spatial_context: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = json.loads(json.dumps(asdict(self), default=list))
        if not d["spatial_context"]:  # runs without context keep the keys they had before the stage existed
            del d["spatial_context"]
        return d


PROFILES: dict[str, dict] = {
    # log1p only (HEST-Bench's target); `--targets log1p log1p_norm` adds library-size-normalised targets
    "her2st": {"dataset": "her2st", "scheme": "lopo", "encoder": "efficientnet_lite0", "targets": ("log1p",)},
    "synthetic": {
        "dataset": "synthetic", "scheme": "stratified", "k": 3, "encoder": "tiny", "n_genes": 30,
        "dataset_options": {"n_organs": 6, "patients_per_organ": 3, "spots_per_section": 60, "n_genes": 60},
        "context_key": "organ", "targets": ("log1p",),
        # sections differ by organ here (a real, predictable difference), not only by depth: keep their means
        "centre_targets": False,
        "train": {**TRAIN, "lr": 3e-3},
        "models": {
            "ridge_cv": {"kind": "ridge_cv"},
            "knn": {"kind": "knn"},
            "per_context": {"kind": "per_context"},
            "mlp": {"kind": "mlp", "hidden": 32, "match_experts": 6},
            "histomoe": dict(SYNTHETIC_HISTOMOE),
        },
    },
    # every tissue context on the mirrors (issue 11): per-context panels, contexts with two or more groups held
    # out in both folds, targets never section-centred
    "tissues": {
        "dataset": "tissues", "scheme": "stratified", "k": 2, "context_key": "context", "panels": "per_context",
        "encoder": "efficientnet_lite0", "targets": ("log1p",), "seeds": (0, 1), "centre_targets": False,
        # early stopping on one held-out group per context (not one model per inner fold): 8k spots, 7 contexts
        "train": {**TRAIN, "val_folds": 1},
        "models": copy.deepcopy(TISSUE_MODELS),
    },
    # the same machinery on the synthetic organs (tests, the smoke book): per-context panels, the tissue models
    "synthetic-tissues": {
        "dataset": "synthetic", "scheme": "stratified", "k": 2, "encoder": "tiny", "n_genes": 10,
        "dataset_options": {"n_organs": 3, "patients_per_organ": 2, "spots_per_section": 64, "n_genes": 40,
                            "patch_px": 32},
        "context_key": "organ", "panels": "per_context", "targets": ("log1p",), "seeds": (0,),
        "centre_targets": False, "train": {**TRAIN, "epochs": 5, "lr": 3e-3},
        "models": copy.deepcopy(TISSUE_MODELS),
    },
    "hest": {"dataset": "hest", "dataset_options": {"task": "IDC"}, "scheme": "hest", "encoder": "efficientnet_lite0"},
    # pan-cancer HEST-Bench (issue 11): one model over several HEST-Bench tasks (dataset_options tasks, default
    # all nine), the task is the context, HEST's per-task patient splits combined, one panel per task chosen on
    # its training sections (gene_list="hest": each task's shipped list); needs the downloaded data
    "hest-pan": {
        "dataset": "hest_pan", "scheme": "hest_pan", "context_key": "hest_task", "panels": "per_context",
        "encoder": "efficientnet_lite0", "targets": ("log1p",), "seeds": (0, 1), "centre_targets": False,
        # early stopping on one held-out group per context (not one model per inner fold): 8k spots, 7 contexts
        "train": {**TRAIN, "val_folds": 1},
        "models": copy.deepcopy(TISSUE_MODELS),
    },
}


def make_config(profile: str | BenchmarkConfig | Mapping[str, Any] = "her2st", **overrides: Any) -> BenchmarkConfig:
    """A :class:`BenchmarkConfig` from a profile name (or dict / config) with keyword overrides."""
    if isinstance(profile, BenchmarkConfig):
        base = profile.as_dict()
    elif isinstance(profile, str):
        if profile not in PROFILES:
            raise HistoMoEError(f"unknown benchmark profile {profile!r}; profiles: {', '.join(PROFILES)}")
        base = copy.deepcopy(PROFILES[profile])
    else:
        base = dict(profile)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if "models" in overrides and isinstance(overrides["models"], (list, tuple)):
        table = {**MODELS, **ABLATIONS, **SYNTHETIC_ABLATIONS, **SPATIAL_ABLATIONS, **base.get("models", {})}
        unknown = [m for m in overrides["models"] if m not in table]
        if unknown:
            raise HistoMoEError(f"unknown models {unknown}; known: {', '.join(table)}")
        overrides["models"] = {m: table[m] for m in overrides["models"]}
    d = {**base, **overrides}
    for key in ("targets", "seeds", "folds"):
        if d.get(key) is not None:
            d[key] = tuple(d[key])
    return BenchmarkConfig(**d)

