"""The benchmark: every model on the same folds, gene panels and embeddings, over several seeds.

``run_benchmark(profile_or_config, **overrides) -> BenchmarkRun``. For each target kind (``log1p``,
``log1p_norm``), each fold (patient-grouped) and each model, the gene panel is chosen on the fold's
training sections only (:func:`~histomoe_core.data.genes.select_panel`; or a fixed list), the model is fit on the
training spots (neural models once per seed, deterministic ones once) and scored on the test spots.

Profiles (:data:`PROFILES`): ``her2st`` (leave-one-patient-out), ``synthetic`` (patient k-fold on the synthetic
multi-organ data), ``hest`` (a HEST-Bench task with its published patient splits; needs the downloaded data).

Content addressing: the run folder is ``runs_dir()/<dataset>-<encoder>-<key>``, where the key hashes the
config, the embeddings (their values), the dataset's counts, and the source of the modules the benchmark uses.
A re-run with nothing changed returns the finished run at once. Each fit (a "unit": target, fold, model, seed)
is cached on its own under ``cache_dir()/benchmark_units/<key>`` (key: inputs, fold, panel, model spec,
training settings, seed and the source of the modules a fit runs), so an interrupted run resumes and runs that
share models (the main table and the ablations) fit them once.

Run folder layout::

    config.json                      resolved config, keys, folds, package versions, wall time
    results.csv                      one row per target x model x fold x seed: pearson (HEST metric: per gene
                                     over pooled test spots, mean over genes), pearson_section (per section,
                                     mean over sections), mse, n_nan_genes, n_test_spots, fit_seconds, info
    summary.csv / summary.md         mean over folds and seeds, sd over folds, sd over seeds
    per_gene.csv                     target, model, fold, seed, gene, pearson, mse
    per_section.csv                  target, model, fold, seed, section, pearson, mse, n_spots
    panels/<target>/<fold>.csv       the fold's gene panel (chosen on its training sections)
    predictions/<target>/<model>/<fold>_seed<k>.npz
                                     pred (N, G), y (N, G), spot, sample, genes; for MoE models also
                                     gates (N, E) and expert_preds (N, E, G)
    models/<target>/<model>/<fold>_seed<k>.pt
                                     MoE models: {"config": MoEConfig dict, "state_dict": ..., "genes": [...]};
                                     rebuild with :meth:`BenchmarkRun.load_model`

Deterministic models (ridge, kNN, per-context) are fit once per fold; their rows are repeated for every seed so
all models aggregate the same way (their sd over seeds is 0).
"""
from __future__ import annotations

import copy
import hashlib
import json
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from histomoe_core import cache, paths
from histomoe_core.errors import HistoMoEError

#: modules whose source is part of a run's key
CODE_MODULES = (
    "histomoe_core.benchmark", "histomoe_core.moe", "histomoe_core.train", "histomoe_core.baselines",
    "histomoe_core.evaluate", "histomoe_core.features", "histomoe_core.pca", "histomoe_core.data.genes",
    "histomoe_core.data.targets", "histomoe_core.data.splits",
)
RUN_VERSION = 1
#: modules whose source decides one fit (a "unit"); bump UNIT_VERSION when :func:`_fit_unit` changes
UNIT_MODULES = (
    "histomoe_core.moe", "histomoe_core.train", "histomoe_core.baselines", "histomoe_core.evaluate",
    "histomoe_core.features", "histomoe_core.pca", "histomoe_core.data.targets",
)
UNIT_VERSION = 1
#: packages whose source decides the inputs (datasets, encoders, embeddings): part of the quick lookup key
INPUT_PACKAGES = ("histomoe_core.data", "histomoe_core.encoders", "histomoe_core.embed", "histomoe_core.embed_cache")

#: the neural models all share these training settings unless a model overrides them
TRAIN = {"epochs": 60, "batch_size": 128, "lr": 1e-3, "weight_decay": 1e-2, "patience": 10}

#: model kinds trained by gradient descent (seeded, with training settings); the others are fit once per fold
NEURAL_KINDS = ("histomoe", "mlp")
#: model specs: ``kind`` is a baseline name (``BASELINES``) or ``"histomoe"``; other keys are its options.
#: ``centre``: train on section-centred targets (None: the benchmark's ``centre_targets``).
#: ``histomoe`` is the anchored mixture: a frozen ridge expert and three retrieval experts (k = 10, 50, 200)
#: weighted per spot by an image router that starts uniform; early stopping may keep the untrained start.
ANCHORED = {"kind": "histomoe", "n_experts": 1, "expert": "linear", "pca_dim": 256, "init": "ridge",
            "freeze_init": True, "retrieval_k": (10, 50, 200), "router_input": "image"}
PLAIN = {"kind": "histomoe", "n_experts": 4, "expert": "mlp", "hidden": 128, "pca_dim": 256, "router_input": "image"}
MODELS: dict[str, dict] = {
    "ridge_hest": {"kind": "ridge_hest", "centre": False},
    "ridge_cv": {"kind": "ridge_cv"},
    "knn": {"kind": "knn"},
    "knn_k50": {"kind": "knn", "k": 50},
    "per_context": {"kind": "per_context"},
    "mlp": {"kind": "mlp", "pca_dim": 256, "hidden": 128, "match_experts": 4, "dropout": 0.1},
    "moe_soft_mlp": dict(PLAIN),
    "histomoe": dict(ANCHORED),
}

#: ablations (book chapter 07): routing input, number of experts, top-k vs soft, and the MoE ideas tried
ABLATIONS: dict[str, dict] = {
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
    # the same models trained on raw (not section-centred) targets
    "ridge_cv_raw": {"kind": "ridge_cv", "centre": False},
    "knn_k50_raw": {"kind": "knn", "k": 50, "centre": False},
    "moe_soft_mlp_raw": {**PLAIN, "centre": False},
    "histomoe_raw": {**ANCHORED, "centre": False},
}
#: the models every her2st ablation run compares against
ABLATION_REFERENCES = ("ridge_cv", "knn_k50", "moe_soft_mlp", "histomoe")

#: synthetic routing ablations: routing input, soft vs top-1, the guide loss, fewer experts than organs
SYNTHETIC_HISTOMOE = {"kind": "histomoe", "n_experts": 6, "expert": "mlp", "hidden": 32, "router_input": "meta",
                      "top_k": 1, "guide_weight": 0.1}
SYNTHETIC_ABLATIONS: dict[str, dict] = {
    "histomoe_route_image": {**SYNTHETIC_HISTOMOE, "router_input": "image"},
    "histomoe_route_both": {**SYNTHETIC_HISTOMOE, "router_input": "both"},
    "histomoe_soft": {**SYNTHETIC_HISTOMOE, "top_k": None},
    "histomoe_no_guide": {**SYNTHETIC_HISTOMOE, "guide_weight": 0.0},
    "histomoe_e3": {**SYNTHETIC_HISTOMOE, "n_experts": 3},
}
SYNTHETIC_REFERENCES = ("per_context", "mlp", "histomoe")


#: what each model of the ablation studies tests: name -> (group, description)
ABLATION_NOTES: dict[str, tuple[str, str]] = {
    "ridge_cv": ("reference", "ridge, alpha by inner CV"),
    "knn_k50": ("reference", "retrieval, k = 50"),
    "per_context": ("reference", "one ridge per organ (told the organ)"),
    "mlp": ("reference", "single MLP, about the MoE's parameters"),
    "moe_soft_mlp": ("reference", "plain soft MoE, 4 MLP experts, image router"),
    "histomoe": ("reference", "HistoMoE as benchmarked"),
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
    "ridge_cv_raw": ("training targets", "ridge_cv on raw (not section-centred) targets"),
    "knn_k50_raw": ("training targets", "knn_k50 on raw targets"),
    "moe_soft_mlp_raw": ("training targets", "plain soft MoE on raw targets"),
    "histomoe_raw": ("training targets", "HistoMoE on raw targets"),
}


def ablation_references(dataset: str) -> list[str]:
    """The reference models of a dataset's ablation study (also rerun on section-centred embeddings)."""
    return list(SYNTHETIC_REFERENCES if dataset == "synthetic" else ABLATION_REFERENCES)


def ablation_models(dataset: str) -> list[str]:
    """Model names of the ablation study for a dataset (synthetic: routing; otherwise: the MoE ideas on real data)."""
    if dataset == "synthetic":
        return [*SYNTHETIC_REFERENCES, *SYNTHETIC_ABLATIONS]
    return [*ABLATION_REFERENCES, *ABLATIONS]


@dataclass(frozen=True)
class BenchmarkConfig:
    dataset: str
    dataset_options: Mapping[str, Any] = field(default_factory=dict)
    encoder: str = "efficientnet_lite0"
    text_encoder: str = "minilm"
    scheme: str = "lopo"  #: "lopo", "kfold" (patients), "stratified" (patients, every context in every fold)
    #: or "hest" (HEST-Bench published splits)
    k: int | None = None  #: folds for "kfold"
    folds: tuple[str, ...] | None = None  #: run only these fold names
    n_genes: int = 50
    min_frac: float = 0.1
    gene_list: str | None = None  #: a fixed gene list (path, or "hest" for the task's shipped list)
    targets: tuple[str, ...] = ("log1p", "log1p_norm")
    seeds: tuple[int, ...] = (0, 1, 2)
    models: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: copy.deepcopy(MODELS))
    #: train on per-section centred targets (models may opt out with centre=False): right when sections differ
    #: technically (sequencing depth) as on her2st, wrong when they differ biologically (organs) as on synthetic
    centre_targets: bool = True
    context_key: str = "organ"
    #: "none", or "section": subtract each section's mean embedding from its spots (train and test sections
    #: alike; uses test images, never test expression), a per-slide batch correction applied to every model
    embedding_norm: str = "none"
    train: Mapping[str, Any] = field(default_factory=lambda: dict(TRAIN))
    patch: Mapping[str, Any] = field(default_factory=dict)  #: PatchSpec fields

    def as_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self), default=list))


PROFILES: dict[str, dict] = {
    "her2st": {"dataset": "her2st", "scheme": "lopo", "encoder": "efficientnet_lite0"},
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
    "hest": {"dataset": "hest", "dataset_options": {"task": "IDC"}, "scheme": "hest", "encoder": "efficientnet_lite0"},
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
        table = {**MODELS, **ABLATIONS, **SYNTHETIC_ABLATIONS, **base.get("models", {})}
        unknown = [m for m in overrides["models"] if m not in table]
        if unknown:
            raise HistoMoEError(f"unknown models {unknown}; known: {', '.join(table)}")
        overrides["models"] = {m: table[m] for m in overrides["models"]}
    d = {**base, **overrides}
    for key in ("targets", "seeds", "folds"):
        if d.get(key) is not None:
            d[key] = tuple(d[key])
    return BenchmarkConfig(**d)


# ----------------------------------------------------------------------------------------------------------
# inputs


def _array_digest(arrays: Mapping[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(k.encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def dataset_digest(samples) -> str:
    """Hash of what the targets depend on: spot and gene names and the counts of every sample."""
    h = hashlib.sha256()
    for s in samples:
        x = s.adata.X
        data = x.data if hasattr(x, "data") and not isinstance(x, np.ndarray) else np.asarray(x)
        h.update(s.sample_id.encode())
        h.update(str(s.adata.shape).encode())
        h.update("\0".join(map(str, s.adata.obs_names)).encode())
        h.update("\0".join(map(str, s.adata.var_names)).encode())
        h.update(np.ascontiguousarray(data, dtype=np.float32).tobytes())
        h.update(json.dumps({k: str(v) for k, v in s.meta.items()}, sort_keys=True).encode())
    return h.hexdigest()[:16]


def load_inputs(cfg: BenchmarkConfig, *, progress: bool = True):
    """``(samples, folds, img_emb, meta_emb, fixed_genes)`` for a config."""
    from histomoe_core.data import load_dataset
    from histomoe_core.data.patches import PatchSpec
    from histomoe_core.data.splits import make_folds
    from histomoe_core.embed import embed_metadata, embed_samples

    samples = load_dataset(cfg.dataset, **dict(cfg.dataset_options))
    fixed = None
    if cfg.scheme == "hest":
        from histomoe_core.data.hest import hest_task

        task = hest_task(cfg.dataset_options.get("task", "IDC"))
        folds = task["folds"]
        if cfg.gene_list == "hest":
            fixed = task["genes"]
    elif cfg.scheme == "stratified":
        folds = stratified_folds(samples, cfg.k or 3, key=cfg.context_key)
    else:
        folds = make_folds(samples, cfg.scheme, k=cfg.k)
    if cfg.gene_list and cfg.gene_list != "hest":
        from histomoe_core.data.genes import read_gene_list

        fixed = read_gene_list(Path(cfg.gene_list))
    if cfg.folds:
        unknown = set(cfg.folds) - {f.name for f in folds}
        if unknown:
            raise HistoMoEError(f"unknown folds {sorted(unknown)}; folds: {', '.join(f.name for f in folds)}")
        folds = [f for f in folds if f.name in cfg.folds]
    img = embed_samples(samples, cfg.encoder, spec=PatchSpec(**dict(cfg.patch)), progress=progress)
    meta = embed_metadata(samples, cfg.text_encoder) if cfg.text_encoder else None
    return samples, folds, img, meta, fixed


def _modules(packages: Sequence[str]) -> list[str]:
    import importlib
    import pkgutil

    out = []
    for name in packages:
        mod = importlib.import_module(name)
        out.append(name)
        if hasattr(mod, "__path__"):
            out += [m.name for m in pkgutil.walk_packages(mod.__path__, prefix=name + ".")]
    return out


def request_key(cfg: BenchmarkConfig) -> str:
    """Key of a request before any data is read: config + source of every module involved. Dataset files are
    assumed immutable (her2st is read-only, synthetic data is keyed by its parameters, HEST files are checked
    against their sums); ``force=True`` recomputes regardless."""
    return cache.content_key(RUN_VERSION, cfg.as_dict(), cache.code_fingerprint(*CODE_MODULES, *_modules(INPUT_PACKAGES)))


def stratified_folds(samples, k: int, *, key: str = "organ"):
    """``k`` patient-grouped folds in which every context (``meta[key]``) has held-out patients when it has at
    least ``k`` patients: each context's patients are dealt round-robin over the folds."""
    from histomoe_core.data.splits import Fold

    ctx = {}
    for s in samples:
        ctx.setdefault(str(s.meta.get(key) or "unknown"), [])
        if s.patient not in ctx[str(s.meta.get(key) or "unknown")]:
            ctx[str(s.meta.get(key) or "unknown")].append(s.patient)
    group = {p: i % k for pats in ctx.values() for i, p in enumerate(sorted(pats))}
    folds = []
    for i in range(k):
        test = tuple(s.sample_id for s in samples if group[s.patient] == i)
        train = tuple(s.sample_id for s in samples if group[s.patient] != i)
        if test and train:
            folds.append(Fold(f"fold{i}", train, test))
    return folds


def input_digests(samples, img, meta) -> tuple[str, str, str]:
    """Digests of the dataset's counts, the image embeddings and the metadata embeddings (hashed once per run)."""
    return dataset_digest(samples), _array_digest(img), _array_digest(meta or {})


def run_key(cfg: BenchmarkConfig, digests: tuple[str, str, str]) -> str:
    data, img, meta = digests
    return cache.content_key(RUN_VERSION, cfg.as_dict(), img, meta, data, cache.code_fingerprint(*CODE_MODULES))


# ----------------------------------------------------------------------------------------------------------
# models


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


def normalise_embeddings(img: Mapping[str, np.ndarray], how: str = "none") -> dict[str, np.ndarray]:
    """Embeddings as they enter every model: unchanged (``"none"``) or centred per section (``"section"``)."""
    if how == "none":
        return dict(img)
    if how == "section":
        return {k: (v - v.mean(0, keepdims=True)).astype(np.float32) for k, v in img.items()}
    raise HistoMoEError(f"unknown embedding_norm {how!r}; use 'none' or 'section'")


def centre_sections(data):
    """Training targets with each section's mean moved to the pooled training mean (per gene)."""
    y = data.y.astype(np.float64)
    pooled = y.mean(0)
    out = y.copy()
    for s in np.unique(data.sample):
        m = data.sample == s
        out[m] += pooled - y[m].mean(0)
    return replace(data, y=out.astype(np.float32))


# ----------------------------------------------------------------------------------------------------------
# running


@dataclass
class BenchmarkRun:
    """A finished run folder with its tables (read once per object; each access returns a fresh copy)."""

    path: Path
    _tables: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def _read(self, name: str) -> pd.DataFrame:
        if name not in self._tables:
            self._tables[name] = pd.read_csv(self.path / name)
        return self._tables[name].copy()

    @property
    def config(self) -> dict:
        if "config.json" not in self._tables:
            self._tables["config.json"] = (self.path / "config.json").read_text()
        return json.loads(self._tables["config.json"])

    @property
    def results(self) -> pd.DataFrame:
        return self._read("results.csv")

    @property
    def summary(self) -> pd.DataFrame:
        return self._read("summary.csv")

    @property
    def per_gene(self) -> pd.DataFrame:
        return self._read("per_gene.csv")

    @property
    def per_section(self) -> pd.DataFrame:
        return self._read("per_section.csv")

    def summary_markdown(self) -> str:
        return (self.path / "summary.md").read_text()

    def panel(self, target: str, fold: str) -> pd.DataFrame:
        return pd.read_csv(self.path / "panels" / target / f"{fold}.csv", index_col=0)

    def predictions(self, model: str, fold: str, seed: int = 0, target: str | None = None) -> dict[str, np.ndarray]:
        target = target or self.config["config"]["targets"][0]
        with np.load(self.path / "predictions" / target / model / f"{fold}_seed{seed}.npz", allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def load_model(self, model: str, fold: str, seed: int = 0, target: str | None = None):
        """The trained :class:`~histomoe_core.moe.HistoMoE` of one fold and seed (eval mode)."""
        import torch

        from histomoe_core.moe import HistoMoE, MoEConfig

        target = target or self.config["config"]["targets"][0]
        path = self.path / "models" / target / model / f"{fold}_seed{seed}.pt"
        if not path.exists():
            raise HistoMoEError(f"{path} does not exist; only MoE-type models save weights (saved: {self.saved_models()})")
        st = torch.load(path, map_location="cpu", weights_only=False)
        m = HistoMoE(MoEConfig.from_dict(st["config"]))
        m.load_state_dict(st["state_dict"])
        return m.eval()

    def saved_models(self) -> list[str]:
        root = self.path / "models"
        return sorted({p.parent.name for p in root.glob("*/*/*.pt")}) if root.exists() else []


def _fit_unit(cfg: BenchmarkConfig, name: str, spec: Mapping[str, Any], train, test, seed: int, unit: Path) -> None:
    """Fit one model on one fold (one seed), score it, and write the unit folder."""
    import torch

    from histomoe_core.evaluate import score

    est = create_model(spec, name=name, train=cfg.train)
    centre = spec.get("centre")
    centre = cfg.centre_targets if centre is None else bool(centre)
    t0 = time.perf_counter()
    est.fit(centre_sections(train) if centre else train, seed=seed)
    fit_s = time.perf_counter() - t0
    extra: dict[str, np.ndarray] = {}
    if hasattr(est, "predict_full"):
        full = est.predict_full(test)
        pred = full["pred"].astype(np.float32)
        extra = {"gates": full["gates"].astype(np.float32), "expert_preds": full["expert_preds"].astype(np.float32)}
    else:
        pred = est.predict(test).astype(np.float32)
    metrics, per_gene, per_section = score(test.y, pred, test.sample, test.genes)
    info = est.info() if hasattr(est, "info") else {}
    with cache.atomic_dir(unit) as tmp:
        (tmp / "metrics.json").write_text(json.dumps({**metrics, "fit_seconds": fit_s, "centre": centre,
                                                      "info": info}, default=float))
        per_gene.to_csv(tmp / "per_gene.csv")
        per_section.to_csv(tmp / "per_section.csv")
        np.savez_compressed(tmp / "pred.npz", pred=pred, y=test.y, spot=test.spot, sample=test.sample,
                            genes=np.asarray(test.genes), **extra)
        if hasattr(est, "model"):
            torch.save({"config": est.model.cfg.as_dict(), "state_dict": est.model.state_dict(),
                        "genes": list(test.genes)}, tmp / "model.pt")


def _is_deterministic(spec: Mapping[str, Any]) -> bool:
    return spec["kind"] not in NEURAL_KINDS


def run_benchmark(profile: str | BenchmarkConfig | Mapping[str, Any] = "her2st", *, progress: bool = True,
                  threads: int | None = 1, n_jobs: int | None = None, force: bool = False,
                  **overrides: Any) -> BenchmarkRun:
    """Run (or load) a benchmark; see the module docstring for what is written where.

    ``threads`` caps BLAS and torch threads per fit (default 1: these problems are small and CPUs are often
    shared; None or 0 keeps the libraries' defaults). ``n_jobs`` fits that many units at once in worker
    processes (None: :func:`resolve_jobs`); results do not depend on it.
    """
    cfg = make_config(profile, **overrides)
    limiter = _thread_limits(threads)
    try:
        t_start = time.perf_counter()
        index = paths.runs_dir() / ".index" / f"{request_key(cfg)}.txt"
        if index.exists() and not force:  # fast path: the same request finished before
            hit = paths.runs_dir() / index.read_text().strip()
            if (hit / "summary.md").exists():
                return BenchmarkRun(hit)
        samples, folds, img, meta, fixed = load_inputs(cfg, progress=progress)
        digests = input_digests(samples, img, meta)
        key = run_key(cfg, digests)
        final = paths.runs_dir() / f"{cfg.dataset}-{cfg.encoder.replace('/', '_').replace(':', '_')}-{key}"
        if (final / "summary.md").exists() and not force:
            _write_index(index, final)
            return BenchmarkRun(final)
        panels, done, pending = _plan(cfg, samples, folds, img, meta, fixed, digests)
        _fit_pending(cfg, pending, n_jobs=resolve_jobs(n_jobs), threads=threads, progress=progress)
        _assemble(cfg, folds, panels, done, final, key, time.perf_counter() - t_start)
        _write_index(index, final)
        return BenchmarkRun(final)
    finally:
        limiter.unregister()


def resolve_jobs(n_jobs: int | None) -> int:
    """Worker processes for fits: ``n_jobs``, else ``$HISTOMOE_JOBS``, else 1 when a GPU is visible (fits run on it
    one after the other) and the usable CPUs (at most 8) when not."""
    import os

    import torch

    if n_jobs is None:
        env = os.environ.get("HISTOMOE_JOBS")
        if env:
            n_jobs = int(env)
        elif torch.cuda.is_available():
            n_jobs = 1
        else:
            n_jobs = min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1), 8)
    if n_jobs < 1:
        raise HistoMoEError(f"n_jobs must be >= 1, got {n_jobs}")
    return int(n_jobs)


@dataclass
class _Pending:
    """A fit that is not in the cache yet."""

    label: str
    name: str
    spec: Mapping[str, Any]
    data: tuple  #: (train, test) FoldData
    seed: int
    unit: Path


def _plan(cfg: BenchmarkConfig, samples, folds, img, meta, fixed, digests: tuple[str, str, str]):
    """Gene panels per (target, fold), the unit folder of every (target, fold, model, seed), and the fits missing
    from the cache (fold arrays are cut only for folds with missing fits)."""
    from histomoe_core.data.genes import select_panel
    from histomoe_core.features import fold_arrays, spot_table

    table = spot_table(samples, normalise_embeddings(img, cfg.embedding_norm), meta, context_key=cfg.context_key)
    inputs = cache.content_key(cfg.dataset, dict(cfg.dataset_options), cfg.context_key, *digests, cfg.embedding_norm)
    code = cache.code_fingerprint(*UNIT_MODULES)
    panels: dict[tuple[str, str], pd.DataFrame] = {}
    done: dict[tuple[str, str, str, int], Path] = {}
    pending: list[_Pending] = []
    for target in cfg.targets:
        for fold in folds:
            if fixed is not None:
                genes = list(fixed)
                panel = pd.DataFrame({"rank": np.arange(1, len(genes) + 1)}, index=pd.Index(genes, name="gene"))
            else:
                panel = select_panel([samples[i] for i in fold.train], n_genes=cfg.n_genes, min_frac=cfg.min_frac,
                                     kind=target)
                genes = panel.index.tolist()
            panels[(target, fold.name)] = panel
            data = None
            for name, spec in cfg.models.items():
                det = _is_deterministic(spec)
                for seed in cfg.seeds[:1] if det else cfg.seeds:
                    unit = cache.artifact_dir("benchmark_units", _unit_key(cfg, spec, inputs, code, target, fold,
                                                                            genes, None if det else seed))
                    if not (unit / "metrics.json").exists():
                        if data is None:
                            data = fold_arrays(table, samples, fold, genes=genes, kind=target)
                        pending.append(_Pending(f"{target} {fold.name} {name} s{seed}", name, spec, data, seed, unit))
                    for s_ in (cfg.seeds if det else [seed]):
                        done[(target, fold.name, name, s_)] = unit
    return panels, done, pending


def _fit_pending(cfg: BenchmarkConfig, pending: Sequence[_Pending], *, n_jobs: int, threads: int | None,
                 progress: bool) -> None:
    """Fit the missing units, in this process or in ``n_jobs`` spawned workers (each limited to ``threads``)."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(pending), desc=f"benchmark {cfg.dataset}", disable=not progress or not pending, unit="fit")
    try:
        if n_jobs <= 1 or len(pending) <= 1:
            for p in pending:
                bar.set_postfix_str(p.label)
                _fit_unit(cfg, p.name, p.spec, p.data[0], p.data[1], p.seed, p.unit)
                bar.update()
            return
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(max_workers=min(n_jobs, len(pending)), mp_context=mp.get_context("spawn"),
                                 initializer=_worker_init, initargs=(threads,)) as pool:
            futures = {pool.submit(_fit_unit, cfg, p.name, p.spec, p.data[0], p.data[1], p.seed, p.unit): p
                       for p in pending}
            for f in as_completed(futures):
                if f.exception() is not None:
                    pool.shutdown(wait=True, cancel_futures=True)  # let running fits finish
                    raise HistoMoEError(f"fit {futures[f].label} failed in a worker: {f.exception()!r}; "
                                        "finished fits are cached, a re-run resumes") from f.exception()
                bar.set_postfix_str(futures[f].label)
                bar.update()
    finally:
        bar.close()


_WORKER_LIMITS: list = []


def _worker_init(threads: int | None) -> None:
    """Worker process setup: the same thread limits as a fit in the main process (kept for its lifetime)."""
    _WORKER_LIMITS.append(_thread_limits(threads))


def _unit_key(cfg: BenchmarkConfig, spec: Mapping[str, Any], inputs: str, code: str, target: str, fold, genes,
              seed: int | None) -> str:
    """Key of one fit: inputs, fold, panel, target kind, model spec (+ training settings and seed for neural
    models), target centring, and the source of the modules a fit runs."""
    neural = not _is_deterministic(spec)
    centre = cfg.centre_targets if spec.get("centre") is None else bool(spec["centre"])
    return cache.content_key(UNIT_VERSION, code, inputs, target, fold.as_dict(), list(genes), dict(spec), centre,
                             dict(cfg.train) if neural else None, seed)


def _write_index(index: Path, run: Path) -> None:
    index.parent.mkdir(parents=True, exist_ok=True)
    tmp = index.with_suffix(".tmp")
    tmp.write_text(run.name)
    tmp.replace(index)


class _thread_limits:
    """Limit BLAS and torch threads to ``threads`` until :meth:`unregister` (no-op for None / 0)."""

    def __init__(self, threads: int | None) -> None:
        import torch
        from threadpoolctl import threadpool_limits

        self.old = torch.get_num_threads()
        self.limits = threadpool_limits(limits=threads) if threads else None
        if threads:
            torch.set_num_threads(threads)

    def unregister(self) -> None:
        import torch

        if self.limits is not None:
            self.limits.unregister()
        torch.set_num_threads(self.old)


def _assemble(cfg: BenchmarkConfig, folds, panels: Mapping[tuple[str, str], pd.DataFrame],
              units: Mapping[tuple[str, str, str, int], Path], final: Path, key: str, seconds: float) -> None:
    from histomoe_core.evaluate import summarize

    rows, genes, sections = [], [], []
    with cache.atomic_dir(final) as tmp:
        for (target, fold_name), panel in panels.items():
            (tmp / "panels" / target).mkdir(parents=True, exist_ok=True)
            panel.to_csv(tmp / "panels" / target / f"{fold_name}.csv")
        for target in cfg.targets:
            for fold in folds:
                for name, spec in cfg.models.items():
                    det = _is_deterministic(spec)
                    for seed in cfg.seeds:
                        src = units[(target, fold.name, name, seed)]
                        m = json.loads((src / "metrics.json").read_text())
                        ident = {"target": target, "model": name, "fold": fold.name, "seed": seed}
                        info = m.pop("info", {})
                        rows.append({**ident, **m, "deterministic": det, "info": json.dumps(info, default=float)})
                        genes.append(pd.read_csv(src / "per_gene.csv").assign(**ident))
                        sections.append(pd.read_csv(src / "per_section.csv").assign(**ident))
                        pdir = tmp / "predictions" / target / name
                        pdir.mkdir(parents=True, exist_ok=True)
                        shutil.copyfile(src / "pred.npz", pdir / f"{fold.name}_seed{seed}.npz")
                        if (src / "model.pt").exists():
                            mdir = tmp / "models" / target / name
                            mdir.mkdir(parents=True, exist_ok=True)
                            shutil.copyfile(src / "model.pt", mdir / f"{fold.name}_seed{seed}.pt")
        results = pd.DataFrame(rows)
        ident_cols = ["target", "model", "fold", "seed"]
        results.to_csv(tmp / "results.csv", index=False)
        pg = pd.concat(genes, ignore_index=True)
        pg[ident_cols + [c for c in pg.columns if c not in ident_cols]].to_csv(tmp / "per_gene.csv", index=False)
        ps = pd.concat(sections, ignore_index=True)
        ps[ident_cols + [c for c in ps.columns if c not in ident_cols]].to_csv(tmp / "per_section.csv", index=False)
        summary = summarize(results)
        summary.to_csv(tmp / "summary.csv", index=False)
        (tmp / "summary.md").write_text(_summary_md(cfg, results, summary, seconds))
        (tmp / "config.json").write_text(json.dumps({
            "config": cfg.as_dict(), "key": key, "folds": [f.as_dict() for f in folds], "seconds": seconds,
            "versions": _versions(), "layout_version": RUN_VERSION,
        }, indent=2, default=str))


def _summary_md(cfg: BenchmarkConfig, results: pd.DataFrame, summary: pd.DataFrame, seconds: float) -> str:
    from histomoe_core.evaluate import fold_table, markdown_table

    lines = [f"# Benchmark: {cfg.dataset} / {cfg.encoder}", "",
             f"Folds: {results['fold'].nunique()} ({cfg.scheme}), seeds: {list(cfg.seeds)}, "
             f"genes per panel: {cfg.n_genes} (chosen on each training fold)" if not cfg.gene_list else
             f"Folds: {results['fold'].nunique()} ({cfg.scheme}), seeds: {list(cfg.seeds)}, fixed gene list {cfg.gene_list}",
             "", "pearson = HEST metric (Pearson per gene over the pooled test spots of a fold, mean over genes); "
             "pearson_section = per test section, mean over sections; values are mean ± sd over folds "
             "(seed-averaged); the last column is the sd over seeds.", ""]
    for target in cfg.targets:
        s = summary[summary["target"] == target].sort_values("pearson", ascending=False)
        lines += [f"## Targets: {target}", "", markdown_table(s), "", "Per fold (HEST metric, mean over seeds):", ""]
        ft = fold_table(results, target=target)
        lines.append("| model | " + " | ".join(ft.columns) + " |")
        lines.append("|---|" + "---|" * len(ft.columns))
        for model, row in ft.iterrows():
            lines.append(f"| {model} | " + " | ".join(f"{v:.3f}" for v in row.to_numpy()) + " |")
        lines.append("")
    lines.append(f"Wall time: {seconds:.0f} s.")
    return "\n".join(lines) + "\n"


def _versions() -> dict:
    import sklearn
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "sklearn": sklearn.__version__, "pandas": pd.__version__}


def find_runs(dataset: str | None = None) -> list[BenchmarkRun]:
    """Finished runs under ``runs_dir()``, newest first."""
    root = paths.runs_dir()
    if not root.exists():
        return []
    runs = [p for p in root.iterdir() if (p / "summary.md").exists() and (dataset is None or p.name.startswith(dataset + "-"))]
    return [BenchmarkRun(p) for p in sorted(runs, key=lambda p: p.stat().st_mtime, reverse=True)]
