"""One fit ("unit"): planning which fits a run needs, fitting them (here or in worker processes), and caching
each one under its own content key."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from histomoe_core import cache
from histomoe_core.benchmark.config import BenchmarkConfig
from histomoe_core.benchmark.inputs import UNIT_MODULES, UNIT_VERSION, normalise_embeddings
from histomoe_core.benchmark.models import create_model, is_deterministic
from histomoe_core.errors import HistoMoEError
from histomoe_core.features import centre_sections


def fit_unit(cfg: BenchmarkConfig, name: str, spec: Mapping[str, Any], train, test, seed: int, unit: Path) -> None:
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
    with cache.atomic_dir(unit, checksums=True) as tmp:  # verified by plan (cache.intact)
        (tmp / "metrics.json").write_text(json.dumps({**metrics, "fit_seconds": fit_s, "centre": centre,
                                                      "info": info}, default=float))
        per_gene.to_csv(tmp / "per_gene.csv")
        per_section.to_csv(tmp / "per_section.csv")
        np.savez_compressed(tmp / "pred.npz", pred=pred, y=test.y, spot=test.spot, sample=test.sample,
                            genes=np.asarray(test.genes), **extra)
        if hasattr(est, "model"):
            torch.save({"config": est.model.cfg.as_dict(), "state_dict": est.model.state_dict(),
                        "genes": list(test.genes)}, tmp / "model.pt")


@dataclass
class Pending:
    """A fit that is not in the cache yet."""

    label: str
    name: str
    spec: Mapping[str, Any]
    data: tuple  #: (train, test) FoldData
    seed: int
    unit: Path


def plan(cfg: BenchmarkConfig, samples, folds, img, meta, fixed, digests: tuple[str, str, str]):
    """Gene panels per (target, fold), the unit folder of every (target, fold, model, seed), and the fits missing
    from the cache (fold arrays are cut only for folds with missing fits)."""
    from histomoe_core.data.genes import select_panel
    from histomoe_core.features import fold_arrays, spot_table

    table = spot_table(samples, normalise_embeddings(img, cfg.embedding_norm), meta, context_key=cfg.context_key)
    inputs = cache.content_key(cfg.dataset, dict(cfg.dataset_options), cfg.context_key, *digests, cfg.embedding_norm)
    code = cache.code_fingerprint(*UNIT_MODULES)
    panels: dict[tuple[str, str], pd.DataFrame] = {}
    done: dict[tuple[str, str, str, int], Path] = {}
    pending: list[Pending] = []
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
                det = is_deterministic(spec)
                for seed in cfg.seeds[:1] if det else cfg.seeds:
                    unit = cache.artifact_dir("benchmark_units", _unit_key(cfg, spec, inputs, code, target, fold,
                                                                            genes, None if det else seed))
                    if not cache.intact(unit, "benchmark unit"):  # absent, or corrupt: removed, fit again
                        if data is None:
                            data = fold_arrays(table, samples, fold, genes=genes, kind=target)
                        pending.append(Pending(f"{target} {fold.name} {name} s{seed}", name, spec, data, seed, unit))
                    for s_ in (cfg.seeds if det else [seed]):
                        done[(target, fold.name, name, s_)] = unit
    return panels, done, pending


def fit_pending(cfg: BenchmarkConfig, pending: Sequence[Pending], *, n_jobs: int, threads: int | None,
                 progress: bool) -> None:
    """Fit the missing units, in this process or in ``n_jobs`` spawned workers (each limited to ``threads``)."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(pending), desc=f"benchmark {cfg.dataset}", disable=not progress or not pending, unit="fit")
    try:
        if n_jobs <= 1 or len(pending) <= 1:
            for p in pending:
                bar.set_postfix_str(p.label)
                fit_unit(cfg, p.name, p.spec, p.data[0], p.data[1], p.seed, p.unit)
                bar.update()
            return
        from concurrent.futures import as_completed

        from histomoe_core.workers import worker_pool

        # workers end with this process (SIGKILL, SIGTERM, errors): see histomoe_core.workers
        with worker_pool(min(n_jobs, len(pending)), initializer=_worker_init, initargs=(threads,)) as pool:
            futures = {pool.submit(fit_unit, cfg, p.name, p.spec, p.data[0], p.data[1], p.seed, p.unit): p
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
    _WORKER_LIMITS.append(thread_limits(threads))


def _unit_key(cfg: BenchmarkConfig, spec: Mapping[str, Any], inputs: str, code: str, target: str, fold, genes,
              seed: int | None) -> str:
    """Key of one fit: inputs, fold, panel, target kind, model spec (+ training settings and seed for neural
    models), target centring, and the source of the modules a fit runs."""
    neural = not is_deterministic(spec)
    centre = cfg.centre_targets if spec.get("centre") is None else bool(spec["centre"])
    return cache.content_key(UNIT_VERSION, code, inputs, target, fold.as_dict(), list(genes), dict(spec), centre,
                             dict(cfg.train) if neural else None, seed)


class thread_limits:
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


