"""One fit ("unit"): planning which fits a run needs, fitting them (here or in worker processes), and caching
each one under its own content key."""
from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from histomoe_core import cache
from histomoe_core.benchmark.config import BenchmarkConfig
from histomoe_core.benchmark.inputs import UNIT_MODULES, UNIT_VERSION, normalise_embeddings
from histomoe_core.benchmark.models import create_model, is_deterministic, is_selection
from histomoe_core.benchmark.panels import fold_panels
from histomoe_core.errors import HistoMoEError
from histomoe_core.features import centre_sections


def fit_model(cfg: BenchmarkConfig, name: str, spec: Mapping[str, Any], train, *, seed: int):
    """``(estimator, centre, fit_seconds)``: the model of ``spec`` fit on ``train`` (section-centred targets when
    the spec, or else the config, says so). Inner-CV choices on the edge of their grid are kept in
    ``estimator.grid_warnings`` (and the unit's info) instead of being printed once per fit."""
    from histomoe_core.baselines import GridEdgeWarning

    est = create_model(spec, name=name, train=cfg.train)
    centre = spec.get("centre")
    centre = cfg.centre_targets if centre is None else bool(centre)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", GridEdgeWarning)
        est.fit(centre_sections(train) if centre else train, seed=seed)
    est.grid_warnings = sorted({str(w.message) for w in caught if issubclass(w.category, GridEdgeWarning)})
    for w in caught:
        if not issubclass(w.category, GridEdgeWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return est, centre, time.perf_counter() - t0


def predict_model(est, test) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Predictions on ``test`` and, for MoE models, their gates and per-expert predictions."""
    if hasattr(est, "predict_full"):
        full = est.predict_full(test)
        return full["pred"].astype(np.float32), {"gates": full["gates"].astype(np.float32),
                                                 "expert_preds": full["expert_preds"].astype(np.float32)}
    return est.predict(test).astype(np.float32), {}


def fit_unit(cfg: BenchmarkConfig, name: str, spec: Mapping[str, Any], train, test, seed: int, unit: Path) -> None:
    """Fit one model on one fold (one seed), score it, and write the unit folder."""
    import torch

    from histomoe_core.evaluate import context_metrics, context_scores, score

    est, centre, fit_s = fit_model(cfg, name, spec, train, seed=seed)
    pred, extra = predict_model(est, test)
    metrics, per_gene, per_section = score(test.y, pred, test.sample, test.genes, mask=test.mask)
    per_context = None
    if test.mask is not None:  # per-context panels: the table once, the headline (macro mean) from it
        per_context = context_scores(test.y, pred, test.context_names(), mask=test.mask, sections=test.sample)
        if test.scoring_context() is not None:
            metrics.update(context_metrics(per_context))
    info = {**(est.info() if hasattr(est, "info") else {}),
            **({"grid_edge": est.grid_warnings} if est.grid_warnings else {})}
    with cache.atomic_dir(unit, checksums=True) as tmp:  # verified by Plan.fit_jobs (cache.intact)
        (tmp / "metrics.json").write_text(json.dumps({**metrics, "fit_seconds": fit_s, "centre": centre,
                                                      "info": info}, default=float))
        per_gene.to_csv(tmp / "per_gene.csv")
        per_section.to_csv(tmp / "per_section.csv")
        if per_context is not None:
            per_context.to_csv(tmp / "per_context.csv")
        if test.mask is not None:  # per-context panels: which entries are scored, and each spot's context
            extra = {**extra, "mask": test.mask, "context": test.context_names().astype(str)}
        np.savez_compressed(tmp / "pred.npz", pred=pred, y=test.y, spot=test.spot, sample=test.sample,
                            genes=np.asarray(test.genes), **extra)
        if hasattr(est, "model"):
            torch.save({"config": est.model.cfg.as_dict(), "state_dict": est.model.state_dict(),
                        "genes": list(test.genes)}, tmp / "model.pt")


def wide_embedder(cfg: BenchmarkConfig, samples) -> Callable:
    """PatchSpec -> embeddings of every sample by the run's encoder (cached as the spot patches are)."""
    def embed(spec):
        from histomoe_core.embed import embed_samples

        return embed_samples(samples, cfg.encoder, spec=spec, progress=False)
    return embed


def context_digest(cfg: BenchmarkConfig, table) -> tuple[str, ...]:
    """Digest of the features the spatial context stage produced (nothing without a stage: keys unchanged)."""
    from histomoe_core.benchmark.inputs import _array_digest

    if not cfg.spatial_context:
        return ()
    arrays = {"x": table.x, **({} if table.spatial is None else {"spatial": table.spatial})}
    return (_array_digest(arrays),)


@dataclass
class Job:
    """Work that is not in the cache yet: ``fn(*args)`` writes one artifact folder."""

    label: str
    fn: Callable
    args: tuple
    cost: float = 1.0  #: a rough relative cost: longest first, so a worker is not left alone with a long last fit


def job_cost(spec: Mapping[str, Any]) -> float:
    """Relative cost of fitting ``spec`` (a selection: every candidate in every inner fold): neural models ~10x."""
    if is_selection(spec):
        return sum(job_cost(c) for c in spec["candidates"].values()) * int(spec.get("inner_folds", 3))
    return 1.0 if is_deterministic(spec) else 10.0


class Plan:
    """Panels, folds' arrays and the artifact folder of every unit of a run.

    Phase 1 (:meth:`selection_jobs`): the inner-CV selections of ``select`` models. Phase 2 (:meth:`fit_jobs`,
    after phase 1 is done): one unit per (target, fold, model, seed); a ``select`` model's unit is the unit of the
    candidate its selection chose, so a choice that is also a model of the table is fit once.
    """

    def __init__(self, cfg: BenchmarkConfig, samples, folds, img, meta, fixed, digests: tuple[str, str, str]) -> None:
        from histomoe_core.features import spot_table
        from histomoe_core.spatial_context import apply_context

        self.cfg, self.samples, self.folds, self.fixed = cfg, samples, folds, fixed
        table = spot_table(samples, normalise_embeddings(img, cfg.embedding_norm), meta, context_key=cfg.context_key)
        self.table = apply_context(table, samples, cfg.spatial_context, embed=wide_embedder(cfg, samples))
        self.inputs = cache.content_key(cfg.dataset, dict(cfg.dataset_options), cfg.context_key, *digests,
                                        cfg.embedding_norm, *context_digest(cfg, self.table))
        self.code = cache.code_fingerprint(*UNIT_MODULES)
        self.panels = {(t, f.name): fold_panels(samples, f, target=t, n_genes=cfg.n_genes, min_frac=cfg.min_frac,
                                                rule=cfg.panel_rule, scope=cfg.panels, context_key=cfg.context_key,
                                                fixed=fixed)
                       for t in cfg.targets for f in folds}
        self._data: dict[tuple[str, str], tuple] = {}
        self.selections: dict[tuple[str, str, str], Path] = {}

    def data(self, target: str, fold) -> tuple:
        """(train, test) FoldData of a fold on its panel(s) (cut once, only when a job needs it)."""
        from histomoe_core.features import fold_arrays

        if (target, fold.name) not in self._data:
            p = self.panels[(target, fold.name)]
            self._data[(target, fold.name)] = fold_arrays(self.table, self.samples, fold, genes=p.genes, kind=target,
                                                          scored=None if p.by_context is None else p.scored)
        return self._data[(target, fold.name)]

    def _cells(self):
        for target in self.cfg.targets:
            for fold in self.folds:
                for name, spec in self.cfg.models.items():
                    yield target, fold, name, spec, self.panels[(target, fold.name)].key()

    def _selection_dir(self, target: str, fold, name: str, spec: Mapping[str, Any], genes) -> Path:
        """The artifact folder of one ``select`` model's inner-CV choice (recorded in :attr:`selections`)."""
        from histomoe_core.benchmark.selection import selection_key

        out = cache.artifact_dir("benchmark_selections", selection_key(self.cfg, spec, self.inputs, self.code, target,
                                                                       fold, genes))
        self.selections[(target, fold.name, name)] = out
        return out

    def selection_jobs(self) -> list[Job]:
        from histomoe_core.benchmark.selection import select_unit

        jobs = []
        for target, fold, name, spec, genes in self._cells():
            if not is_selection(spec):
                continue
            out = self._selection_dir(target, fold, name, spec, genes)
            if not cache.intact(out, "model selection"):
                jobs.append(Job(f"{target} {fold.name} {name} inner CV", select_unit,
                                (self.cfg, name, spec, self.data(target, fold)[0], out), job_cost(spec)))
        return jobs

    def fit_jobs(self) -> tuple[dict[tuple[str, str, str, int], Path], list[Job]]:
        """The unit folder of every (target, fold, model, seed) and the fits missing from the cache."""
        from histomoe_core.benchmark.selection import read_selection

        done: dict[tuple[str, str, str, int], Path] = {}
        jobs: list[Job] = []
        planned: set[Path] = set()
        for target, fold, name, spec, genes in self._cells():
            selected = None
            if is_selection(spec):
                selected = read_selection(self._selection_dir(target, fold, name, spec, genes))
                spec = selected["spec"]
            det = is_deterministic(spec)
            for seed in self.cfg.seeds[:1] if det else self.cfg.seeds:
                unit = cache.artifact_dir("benchmark_units", unit_key(self.cfg, spec, self.inputs, self.code, target,
                                                                      fold, genes, None if det else seed))
                if unit not in planned and not cache.intact(unit, "benchmark unit"):
                    planned.add(unit)
                    train, test = self.data(target, fold)
                    jobs.append(Job(f"{target} {fold.name} {name} s{seed}", fit_unit,
                                    (self.cfg, name, spec, train, test, seed, unit), job_cost(spec)))
                for s_ in (self.cfg.seeds if det else [seed]):
                    done[(target, fold.name, name, s_)] = unit
        return done, jobs


def fit_pending(cfg: BenchmarkConfig, jobs: Sequence[Job], *, n_jobs: int, threads: int | None,
                progress: bool, what: str = "fit") -> None:
    """Run the jobs, in this process or in ``n_jobs`` spawned workers (each limited to ``threads``)."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs), desc=f"benchmark {cfg.dataset}", disable=not progress or not jobs, unit=what)
    try:
        if n_jobs <= 1 or len(jobs) <= 1:
            for j in jobs:
                bar.set_postfix_str(j.label)
                j.fn(*j.args)
                bar.update()
            return
        from concurrent.futures import as_completed

        from histomoe_core.workers import worker_pool

        # workers end with this process (SIGKILL, SIGTERM, errors): see histomoe_core.workers
        # n_jobs workers even for fewer jobs: the pool is kept for the run's next phase and the next runs
        with worker_pool(n_jobs, initializer=_worker_init, initargs=(threads,), keep=True) as pool:
            futures = {pool.submit(j.fn, *j.args): j for j in sorted(jobs, key=lambda j: -j.cost)}
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


def unit_key(cfg: BenchmarkConfig, spec: Mapping[str, Any], inputs: str, code: str, target: str, fold, genes,
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


