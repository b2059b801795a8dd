"""Fit one model on chosen datasets / sections and write it as a bundle (what ``histomoe train`` runs).

The steps are the benchmark's, on one training fold: embed (cached), the gene panel of the training sections
(:func:`~histomoe_core.data.genes.select_panel`), the spot table and targets, then for a ``select`` model the
inner-CV choice (:func:`~histomoe_core.benchmark.selection.select_unit`) and the chosen candidate fit with
``seed`` (:func:`~histomoe_core.benchmark.units.fit_model`), so a bundle trained on a benchmark fold's training
sections is that fold's seed-``seed`` model.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from histomoe_core.errors import HistoMoEError


@dataclass(frozen=True)
class TrainRequest:
    """What to train on and how."""

    datasets: tuple[str, ...] = ("her2st",)
    dataset_options: tuple[tuple[str, Any], ...] = ()  #: options of the (single) dataset's loader
    sections: tuple[str, ...] | None = None  #: only these sample ids
    exclude_patients: tuple[str, ...] = ()
    model: str = "histomoe"
    target: str = "log1p"
    seed: int = 0
    encoder: str | None = None  #: None: the profile's
    text_encoder: str | None = None
    n_genes: int | None = None
    epochs: int | None = None  #: override the profile's maximum epochs (neural models)
    patch: tuple[tuple[str, Any], ...] = ()  #: PatchSpec fields, e.g. (("size_um", 56.0), ("out_px", 64))


def training_samples(req: TrainRequest):
    """The training :class:`~histomoe_core.data.sample.SampleSet` of a request (datasets merged in order)."""
    from histomoe_core.data import load_dataset
    from histomoe_core.data.sample import SampleSet

    if req.dataset_options and len(req.datasets) != 1:
        raise HistoMoEError("dataset options need exactly one dataset")
    samples = []
    for name in req.datasets:
        samples += list(load_dataset(name, **dict(req.dataset_options)))
    ids = [s.sample_id for s in samples]
    if len(set(ids)) != len(ids):
        raise HistoMoEError(f"datasets {list(req.datasets)} share sample ids; train on one of them at a time")
    if req.sections:
        unknown = sorted(set(req.sections) - set(ids))
        if unknown:
            raise HistoMoEError(f"no sections {unknown} in {'+'.join(req.datasets)}; sections: {', '.join(ids)}")
        samples = [s for s in samples if s.sample_id in set(req.sections)]
    patients = {s.patient for s in samples}
    unknown = sorted(set(req.exclude_patients) - patients)
    if unknown:
        raise HistoMoEError(f"--exclude-patient {unknown}: no such patient; patients: {', '.join(sorted(patients))}")
    samples = [s for s in samples if s.patient not in set(req.exclude_patients)]
    if len(samples) < 2:
        raise HistoMoEError(f"{len(samples)} training section(s) left; a model needs at least two (inner validation)")
    return SampleSet("+".join(req.datasets), samples)


def make_train_config(req: TrainRequest):
    """The benchmark config whose training settings, centring and model table the fit uses."""
    from histomoe_core.benchmark.config import PROFILES, make_config

    profile = req.datasets[0] if req.datasets[0] in PROFILES and len(req.datasets) == 1 else \
        {**PROFILES["her2st"], "dataset": "+".join(req.datasets)}
    base = make_config(profile, dataset_options=dict(req.dataset_options) or None)
    train = {**dict(base.train), **({"epochs": req.epochs} if req.epochs else {})}
    return make_config(base, models=[req.model], targets=[req.target], seeds=[req.seed], encoder=req.encoder,
                       text_encoder=req.text_encoder, n_genes=req.n_genes, train=train,
                       patch={**dict(base.patch), **dict(req.patch)})


def train_arrays(cfg, samples):
    """``(train FoldData, panel, img_emb, meta_emb)`` on every section of ``samples``."""
    from histomoe_core.benchmark.inputs import normalise_embeddings
    from histomoe_core.data.genes import select_panel
    from histomoe_core.data.patches import PatchSpec
    from histomoe_core.data.splits import Fold
    from histomoe_core.embed import embed_metadata, embed_samples
    from histomoe_core.features import fold_arrays, spot_table

    img = embed_samples(samples, cfg.encoder, spec=PatchSpec(**dict(cfg.patch)), progress=True)
    meta = embed_metadata(samples, cfg.text_encoder) if cfg.text_encoder else None
    panel = select_panel(list(samples), n_genes=cfg.n_genes, min_frac=cfg.min_frac, rule=cfg.panel_rule,
                         kind=cfg.targets[0])
    table = spot_table(samples, normalise_embeddings(img, cfg.embedding_norm), meta, context_key=cfg.context_key)
    ids = tuple(samples.ids)
    train, _ = fold_arrays(table, samples, Fold("train", ids, ids[:1]), genes=panel.index.tolist(),
                           kind=cfg.targets[0])
    return train, panel, img, meta


def choose(cfg, name: str, spec: Mapping[str, Any], train) -> tuple[dict, dict | None]:
    """``(spec to fit, selection record)``: a ``select`` model's inner-CV choice, or the spec itself."""
    from histomoe_core.benchmark.models import is_selection
    from histomoe_core.benchmark.selection import read_selection, select_unit

    if not is_selection(spec):
        return dict(spec), None
    with tempfile.TemporaryDirectory(prefix="histomoe-select-") as d:
        out = Path(d) / "selection"
        select_unit(cfg, name, spec, train, out)
        sel = read_selection(out)
    return dict(sel["spec"]), sel


def reads_metadata(spec: Mapping[str, Any]) -> bool:
    return spec.get("kind") == "per_context" or spec.get("router_input", "image") in ("meta", "both")


def provenance(samples, cfg, req: TrainRequest) -> dict:
    from histomoe_core.benchmark.inputs import dataset_digest
    from histomoe_core.cache import file_sha256

    return {
        "datasets": list(req.datasets), "dataset_sha256": dataset_digest(samples),
        "sections": [{"sample_id": s.sample_id, "patient": s.patient, "n_spots": s.n_spots,
                      "image_sha256": file_sha256(s.image_path) if s.image_path else None} for s in samples],
        "request": {k: (list(v) if isinstance(v, tuple) else v) for k, v in req.__dict__.items() if k != "patch"},
        "config": cfg.as_dict(),
    }


def train_bundle(req: TrainRequest, out: Path) -> dict:
    """Fit the requested model and write its bundle at ``out``; returns the manifest written."""
    from histomoe_core.benchmark.units import fit_model
    from histomoe_core.bundle.format import load_bundle, read_manifest, save_bundle
    from histomoe_core.data.patches import PatchSpec
    from histomoe_core.embed import metadata_strings
    from histomoe_core.encoders import create_encoder

    samples = training_samples(req)
    cfg = make_train_config(req)
    name, spec = next(iter(cfg.models.items()))
    train, panel, img, _ = train_arrays(cfg, samples)
    chosen, selection = choose(cfg, name, spec, train)
    est, centre, fit_s = fit_model(cfg, name, chosen, train, seed=req.seed)
    enc = create_encoder(cfg.encoder)
    manifest = {
        "encoder": {"name": cfg.encoder, "cache_id": enc.cache_id(), "weights_sha256": enc.weights_id,
                    "pretrained": enc.pretrained, "embed_dim": enc.embed_dim},
        "patch": PatchSpec(**dict(cfg.patch)).as_dict(),
        "genes": panel.index.tolist(), "target": req.target,
        "panel": {"rule": cfg.panel_rule, "n_genes": cfg.n_genes, "min_frac": cfg.min_frac},
        "normalisation": {"embedding_norm": cfg.embedding_norm, "centre_targets": bool(centre),
                          "input": "per-feature standardisation (and PCA) fitted on the training embeddings"},
        "model": {"name": name, "kind": chosen["kind"], "spec": chosen, "seed": req.seed,
                  "train_settings": dict(cfg.train), "fit_seconds": fit_s,
                  "info": est.info() if hasattr(est, "info") else {},
                  "selection": None if selection is None else {k: selection[k] for k in ("chosen", "mean", "scores")}},
        "contexts": list(train.contexts), "context_key": cfg.context_key,
        "metadata": {"text_encoder": cfg.text_encoder, "reads_metadata": reads_metadata(chosen),
                     "train_texts": dict(metadata_strings(samples)), "meta_dim": int(train.meta.shape[1])},
        "provenance": provenance(samples, cfg, req),
    }
    x = np.concatenate([img[s.sample_id] for s in samples])
    save_bundle(out, estimator=est, manifest=json.loads(json.dumps(manifest, default=_jsonable)), train_x=x)
    try:
        load_bundle(out, encoder=enc)  # never report success on a bundle that does not load
    except Exception:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return read_manifest(out)


def cached_bundle(req: TrainRequest) -> Path:
    """The bundle of ``req`` under the cache (trained on first use; keyed by the request, the inputs' code and
    the training code), e.g. for the book."""
    from histomoe_core import cache
    from histomoe_core.benchmark.inputs import CODE_MODULES, INPUT_PACKAGES, _modules
    from histomoe_core.bundle.format import BundleError, load_bundle

    key = cache.content_key(req.__dict__, cache.code_fingerprint(
        *CODE_MODULES, *_modules(INPUT_PACKAGES), "histomoe_core.bundle.fit", "histomoe_core.bundle.format"))
    out = cache.artifact_dir("bundles", key)
    try:
        load_bundle(out)
    except BundleError:
        train_bundle(req, out)
    return out


def _jsonable(o):
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, (tuple, set)):
        return list(o)
    return str(o)


def describe(manifest: Mapping[str, Any]) -> Sequence[str]:
    """Lines a user reads after training."""
    m = manifest["model"]
    sel = m.get("selection")
    lines = [f"model {m['name']} ({m['kind']}), seed {m['seed']}, {len(manifest['genes'])} genes ({manifest['target']})"]
    if sel:
        lines.append("inner CV chose " + sel["chosen"] + " (" + ", ".join(f"{k} {v:.3f}" for k, v in sel["mean"].items()) + ")")
    secs = manifest["provenance"]["sections"]
    lines.append(f"trained on {len(secs)} sections: {', '.join(s['sample_id'] for s in secs)}; "
                 f"encoder {manifest['encoder']['name']}")
    return lines
