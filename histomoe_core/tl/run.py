"""Results of a finished benchmark run as AnnData: one fold's trained HistoMoE applied to every section.

A benchmark run (:mod:`histomoe_core.benchmark`) keeps, per fold, the trained MoE and its held-out predictions.
:func:`fold_adata` rebuilds that fold's model, reads the cached embeddings of every section, and writes the
model's predictions, gates and expert outputs for *all* spots (training and held-out sections, marked in
``obs["split"]``) with :func:`~histomoe_core.tl.predict`. The held-out rows are checked against the predictions
the benchmark stored, so the figures show exactly the benchmarked model.
"""
from __future__ import annotations

from typing import Sequence

import anndata as ad
import numpy as np

from histomoe_core.errors import HistoMoEError


def run_config(run) -> dict:
    """The resolved :class:`~histomoe_core.benchmark.BenchmarkConfig` of a run, as a dict."""
    return run.config["config"]


def run_samples(run):
    """The run's dataset (same loader options as the run)."""
    from histomoe_core.data import load_dataset

    cfg = run_config(run)
    return load_dataset(cfg["dataset"], **dict(cfg.get("dataset_options") or {}))


def run_folds(run) -> list[dict]:
    """Folds of the run: ``[{"name", "train", "test"}, ...]``."""
    return run.config["folds"]


def fold_of(run, sample_id: str) -> str:
    """The fold whose test set holds ``sample_id``."""
    for f in run_folds(run):
        if sample_id in f["test"]:
            return f["name"]
    raise HistoMoEError(f"no fold of this run tests {sample_id!r}; folds: {[f['name'] for f in run_folds(run)]}")


def fold_adata(
    run,
    fold: str,
    *,
    model: str = "histomoe",
    seed: int = 0,
    target: str | None = None,
    samples=None,
    sections: Sequence[str] | None = None,
    images: bool | Sequence[str] = False,
    key_added: str = "histomoe",
    progress: bool = False,
) -> ad.AnnData:
    """Every spot of ``sections`` (default: all) on ``fold``'s gene panel, with the predictions of that fold's
    trained ``model`` (seed ``seed``, target kind ``target``) in the ``tl.predict`` slots.

    ``obs["split"]`` says whether a section was in the fold's training or test set; ``layers["target"]`` holds the
    measured targets; ``uns[key_added]["params"]`` records run, fold, model and the largest difference between
    the recomputed and the stored held-out predictions (``max_abs_diff_vs_run``, ~1e-6).
    """
    from histomoe_core.benchmark import normalise_embeddings
    from histomoe_core.data.patches import PatchSpec
    from histomoe_core.embed import embed_metadata, embed_samples
    from histomoe_core.tl.build import spot_adata
    from histomoe_core.tl.prediction import predict

    cfg = run_config(run)
    target = target or cfg["targets"][0]
    folds = {f["name"]: f for f in run_folds(run)}
    if fold not in folds:
        raise HistoMoEError(f"run {run.path.name} has no fold {fold!r}; folds: {', '.join(folds)}")
    net = run.load_model(model, fold, seed, target)
    stored = run.predictions(model, fold, seed, target)
    genes = [str(g) for g in stored["genes"]]
    samples = samples if samples is not None else run_samples(run)
    # metadata of the whole dataset, as in the run: a one-hot vocabulary depends on every section's metadata
    meta = embed_metadata(samples, cfg["text_encoder"]) if net.cfg.router_input != "image" else None
    if sections is not None:
        samples = samples.subset(list(sections))
        meta = None if meta is None else {s.sample_id: meta[s.sample_id] for s in samples}
    img = embed_samples(samples, cfg["encoder"], spec=PatchSpec(**dict(cfg.get("patch") or {})), progress=progress)
    img = normalise_embeddings(img, cfg.get("embedding_norm", "none"))  # as the run's models saw them
    split = {**{s: "train" for s in folds[fold]["train"]}, **{s: "test" for s in folds[fold]["test"]}}
    adata = spot_adata(samples, genes, kind=target, embeddings=img, meta_embeddings=meta, images=images, split=split)
    predict(adata, net, genes=genes, meta="X_meta" if meta is not None else None, key_added=key_added)
    diff = _check_against_run(adata, stored, key_added)
    adata.uns[key_added]["params"].update({"run": run.path.name, "fold": fold, "model": model, "seed": seed,
                                           "target": target, "max_abs_diff_vs_run": diff})
    return adata


def _check_against_run(adata: ad.AnnData, stored: dict, key: str) -> float:
    """Largest |recomputed - stored| over the held-out spots present in ``adata`` (NaN if none are)."""
    from histomoe_core.tl.slots import read_results

    names = np.char.add(np.char.add(stored["sample"].astype(str), "_"), stored["spot"].astype(str))
    pos = adata.obs_names.get_indexer(names)
    keep = pos >= 0
    if not keep.any():
        return float("nan")
    pred = read_results(adata, key=key)["pred"][pos[keep]]
    diff = float(np.abs(pred - stored["pred"][keep]).max())
    if diff > 1e-3:
        raise HistoMoEError(f"recomputed predictions differ from the run's by up to {diff:.3g}; the embeddings or the "
                            "model changed since the run (re-run the benchmark)")
    return diff


def held_out(adata: ad.AnnData) -> ad.AnnData:
    """The spots of the fold's test sections (a view)."""
    return adata[adata.obs["split"] == "test"]


def best_section(run, *, model: str = "histomoe", target: str | None = None) -> str:
    """The held-out section where ``model`` scored best (mean Pearson over genes, mean over seeds)."""
    ps = run.per_section
    target = target or run_config(run)["targets"][0]
    ps = ps[(ps["model"] == model) & (ps["target"] == target)]
    return str(ps.groupby("section")["pearson"].mean().idxmax())


def open_run(name: str):
    """A finished run by folder name under ``runs_dir()`` (or a path to a run folder)."""
    from pathlib import Path

    from histomoe_core import paths
    from histomoe_core.benchmark import BenchmarkRun

    path = Path(name) if Path(name).is_absolute() or Path(name).exists() else paths.runs_dir() / name
    if not (path / "config.json").is_file():
        raise HistoMoEError(f"{path} is not a finished benchmark run (no config.json); runs are folders under "
                            f"{paths.runs_dir()}")
    return BenchmarkRun(path)


def load_run(dataset: str, *, dataset_options: dict | None = None, encoder: str | None = None,
             text_encoder: str | None = None, n_genes: int | None = None, epochs: int | None = None,
             n_seeds: int | None = None, seed: int | None = None, progress: bool = True, run_name: str | None = None,
             **overrides):
    """The benchmark run for book parameters: reloaded when it exists, else run (and cached).

    ``dataset`` names a benchmark profile (``her2st``, ``synthetic``, ``hest``); the other arguments override the
    profile only when given (None keeps its value): ``epochs`` the training epochs, ``n_seeds`` the seeds 0..n-1,
    ``dataset_options`` update the profile's (e.g. ``{"max_spots": 1000}``, :func:`~histomoe_core.data.load_dataset`).
    ``seed``: a training seed the caller will open (a chapter's ``seed`` parameter); the run's seeds are extended
    to include it when they do not. ``run_name`` opens that finished run folder instead (see :func:`open_run`).
    """
    from histomoe_core.benchmark import PROFILES, TRAIN, run_benchmark

    if run_name:
        return open_run(run_name)

    if dataset not in PROFILES:
        raise HistoMoEError(f"no benchmark profile for dataset {dataset!r}; profiles: {', '.join(PROFILES)}")
    kw = dict(overrides)
    if dataset_options:  # on top of the profile's own options; a None value drops an option
        options = {**dict(PROFILES[dataset].get("dataset_options") or {}), **dict(dataset_options)}
        kw["dataset_options"] = {k: v for k, v in options.items() if v is not None}
    if epochs is not None:
        kw["train"] = {**TRAIN, **dict(PROFILES[dataset].get("train") or {}), "epochs": int(epochs)}
    if n_seeds is not None:
        kw["seeds"] = tuple(range(int(n_seeds)))
    if seed is not None:
        from histomoe_core.benchmark.config import make_config

        seeds = tuple(kw.get("seeds") or make_config(dataset).seeds)
        if int(seed) not in seeds:
            kw["seeds"] = tuple(sorted({*seeds, int(seed)}))
    return run_benchmark(dataset, encoder=encoder, text_encoder=text_encoder, n_genes=n_genes, progress=progress, **kw)
