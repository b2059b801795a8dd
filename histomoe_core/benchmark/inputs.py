"""What a run reads and how it is keyed: datasets, folds, embeddings, their digests, and the run keys."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from histomoe_core import cache
from histomoe_core.benchmark.config import BenchmarkConfig
from histomoe_core.errors import HistoMoEError

#: modules whose source is part of a run's key
CODE_MODULES = (
    "histomoe_core.benchmark.config", "histomoe_core.benchmark.inputs", "histomoe_core.benchmark.models",
    "histomoe_core.benchmark.units", "histomoe_core.benchmark.results", "histomoe_core.benchmark.runner",
    "histomoe_core.benchmark.panels", "histomoe_core.benchmark.selection",
    "histomoe_core.moe", "histomoe_core.train", "histomoe_core.baselines", "histomoe_core.evaluate", "histomoe_core.features", "histomoe_core.pca", "histomoe_core.data.genes",
    "histomoe_core.data.targets", "histomoe_core.data.splits", "histomoe_core.spatial_context",
)
RUN_VERSION = 1
#: modules whose source decides one fit (a "unit"); bump UNIT_VERSION when the unit layout changes
UNIT_MODULES = (
    "histomoe_core.benchmark.units", "histomoe_core.benchmark.selection", "histomoe_core.moe", "histomoe_core.train", "histomoe_core.baselines",
    "histomoe_core.evaluate", "histomoe_core.features", "histomoe_core.pca", "histomoe_core.data.targets",
)
UNIT_VERSION = 1
#: packages whose source decides the inputs (datasets, encoders, embeddings): part of the quick lookup key
INPUT_PACKAGES = ("histomoe_core.data", "histomoe_core.encoders", "histomoe_core.embed", "histomoe_core.embed_cache")


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
        from histomoe_core.data.hest import hest_task, shipped_genes

        task = hest_task(cfg.dataset_options.get("task", "IDC"))
        folds = task["folds"]
        if cfg.gene_list == "hest":
            fixed = shipped_genes(task["name"])
    elif cfg.scheme == "hest_pan":
        from histomoe_core.data.hest import TASK_KEY, hest_pan_folds, shipped_genes

        folds = hest_pan_folds(samples, n_folds=cfg.k)
        if cfg.gene_list == "hest":  # each task's shipped list, as a per-task panel
            fixed = {t: shipped_genes(t) for t in dict.fromkeys(s.meta[TASK_KEY] for s in samples)}
    elif cfg.scheme == "stratified":
        from histomoe_core.data.splits import stratified_folds

        folds = stratified_folds(samples, cfg.k or 3, key=cfg.context_key)
    elif cfg.scheme == "leave_context_out":
        from histomoe_core.data.splits import leave_context_out

        folds = leave_context_out(samples, key=cfg.context_key)
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


def input_digests(samples, img, meta) -> tuple[str, str, str]:
    """Digests of the dataset's counts, the image embeddings and the metadata embeddings (hashed once per run)."""
    return dataset_digest(samples), _array_digest(img), _array_digest(meta or {})


def run_key(cfg: BenchmarkConfig, digests: tuple[str, str, str]) -> str:
    data, img, meta = digests
    return cache.content_key(RUN_VERSION, cfg.as_dict(), img, meta, data, cache.code_fingerprint(*CODE_MODULES))


def normalise_embeddings(img: Mapping[str, np.ndarray], how: str = "none") -> dict[str, np.ndarray]:
    """Embeddings as they enter every model: unchanged (``"none"``) or centred per section (``"section"``)."""
    if how == "none":
        return dict(img)
    if how == "section":
        return {k: (v - v.mean(0, keepdims=True)).astype(np.float32) for k, v in img.items()}
    raise HistoMoEError(f"unknown embedding_norm {how!r}; use 'none' or 'section'")
