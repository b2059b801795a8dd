"""One fit ("unit"): planning which fits a run needs, fitting them (here or in worker processes), and caching
each one under its own content key."""
from __future__ import annotations

import heapq
import json
import time
import warnings
from dataclasses import dataclass
from functools import partial
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
    then: Callable[[], Sequence["Job"]] | None = None  #: the jobs this one makes possible (called in the parent)


def job_cost(spec: Mapping[str, Any]) -> float:
    """Relative cost of fitting ``spec`` (a selection: every candidate in every inner fold): neural models ~10x."""
    if is_selection(spec):
        return sum(job_cost(c) for c in spec["candidates"].values()) * int(spec.get("inner_folds", 3))
    return 1.0 if is_deterministic(spec) else 10.0


class Plan:
    """Panels, folds' arrays and the artifact folder of every unit of a run.

    One unit per (target, fold, model, seed); a ``select`` model's unit is the unit of the candidate its inner-CV
    selection chose, so a choice that is also a model of the table is fit once. The inner-CV selections
    (:meth:`selection_jobs`) run together with the fits that need no selection (:meth:`fit_jobs` with
    ``selected=False``), and each selection, once done, queues the fit of its choice: no worker waits for the
    last selection while other fits are left. :meth:`fit_jobs` afterwards lists every unit (and fits any left).
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
        self._planned: set[Path] = set()  #: units some job of this plan will write

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
        """The missing inner-CV selections; each, once done, yields the fit of what it chose (``Job.then``)."""
        from histomoe_core.benchmark.selection import select_unit

        jobs = []
        for target, fold, name, spec, genes in self._cells():
            if not is_selection(spec):
                continue
            out = self._selection_dir(target, fold, name, spec, genes)
            if not cache.intact(out, "model selection"):
                jobs.append(Job(f"{target} {fold.name} {name} inner CV", select_unit,
                                (self.cfg, name, spec, self.data(target, fold)[0], out), job_cost(spec),
                                then=partial(self._chosen_jobs, target, fold, name, spec, genes)))
        return jobs

    def fit_jobs(self, *, selected: bool = True) -> tuple[dict[tuple[str, str, str, int], Path], list[Job]]:
        """The unit folder of every (target, fold, model, seed) and the fits missing from the cache; with
        ``selected=False`` only those of models that are not ``select`` models (their selections need not exist)."""
        from histomoe_core.benchmark.selection import read_selection

        done: dict[tuple[str, str, str, int], Path] = {}
        jobs: list[Job] = []
        self._planned = set()  # a fresh plan: what earlier calls planned is done by now
        for target, fold, name, spec, genes in self._cells():
            if is_selection(spec):
                if not selected:
                    continue
                spec = read_selection(self._selection_dir(target, fold, name, spec, genes))["spec"]
            jobs += self._unit_jobs(target, fold, name, spec, genes, done)
        return done, jobs

    def _chosen_jobs(self, target: str, fold, name: str, spec: Mapping[str, Any], genes) -> list[Job]:
        """After a selection: the fit of the candidate it chose, unless cached or already planned."""
        from histomoe_core.benchmark.selection import read_selection

        chosen = read_selection(self._selection_dir(target, fold, name, spec, genes))["spec"]
        return self._unit_jobs(target, fold, name, chosen, genes, {})

    def _unit_jobs(self, target: str, fold, name: str, spec: Mapping[str, Any], genes, done: dict) -> list[Job]:
        """Record the units of one (target, fold, model) in ``done``; the fits of those not cached nor planned."""
        jobs = []
        det = is_deterministic(spec)
        for seed in self.cfg.seeds[:1] if det else self.cfg.seeds:
            unit = cache.artifact_dir("benchmark_units", unit_key(self.cfg, spec, self.inputs, self.code, target,
                                                                  fold, genes, None if det else seed))
            if unit not in self._planned and not cache.intact(unit, "benchmark unit"):
                self._planned.add(unit)
                train, test = self.data(target, fold)
                jobs.append(Job(f"{target} {fold.name} {name} s{seed}", fit_unit,
                                (self.cfg, name, spec, train, test, seed, unit), job_cost(spec)))
            for s_ in (self.cfg.seeds if det else [seed]):
                done[(target, fold.name, name, s_)] = unit
        return jobs


def fit_pending(cfg: BenchmarkConfig, jobs: Sequence[Job], *, n_jobs: int, threads: int | None,
                progress: bool) -> None:
    """Run the jobs and those their ``then`` makes possible, in this process or in ``n_jobs`` spawned workers
    (each limited to ``threads``); the costliest waiting job starts whenever a worker is free."""
    from tqdm.auto import tqdm

    queue = _JobQueue(jobs)
    bar = tqdm(total=len(jobs), desc=f"benchmark {cfg.dataset}", disable=not progress or not jobs, unit="fit")

    def finished(job: Job) -> None:
        bar.set_postfix_str(job.label)
        bar.update()
        more = queue.after(job)
        if more:
            bar.total += more
            bar.refresh()

    try:
        if n_jobs <= 1 or (len(jobs) <= 1 and all(j.then is None for j in jobs)):
            while queue:
                job = queue.pop()
                job.fn(*job.args)
                finished(job)
            return
        from concurrent.futures import FIRST_COMPLETED, wait

        from histomoe_core.workers import worker_pool

        # workers end with this process (SIGKILL, SIGTERM, errors): see histomoe_core.workers
        # n_jobs workers even for fewer jobs: the pool is kept for the run's next phase and the next runs
        with worker_pool(n_jobs, initializer=_worker_init, initargs=(threads,), keep=True) as pool:
            running: dict = {}
            while queue or running:
                # a job per worker and one more, sent ahead while they work (its arrays take a while to pickle);
                # the rest wait here, costliest first, so a selection's follow-up fit does not queue behind them
                while queue and len(running) < n_jobs + 1:
                    job = queue.pop()
                    running[pool.submit(job.fn, *job.args)] = job
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for f in done:
                    job = running.pop(f)
                    if f.exception() is not None:
                        pool.shutdown(wait=True, cancel_futures=True)  # let running fits finish
                        raise HistoMoEError(f"fit {job.label} failed in a worker: {f.exception()!r}; "
                                            "finished fits are cached, a re-run resumes") from f.exception()
                    finished(job)
    finally:
        bar.close()


class _JobQueue:
    """Waiting jobs, costliest first (ties: the order they came in)."""

    def __init__(self, jobs: Sequence[Job]) -> None:
        self._heap: list = []
        self._n = 0
        for j in jobs:
            self._push(j)

    def _push(self, job: Job) -> None:
        heapq.heappush(self._heap, (-job.cost, self._n, job))
        self._n += 1

    def __bool__(self) -> bool:
        return bool(self._heap)

    def pop(self) -> Job:
        return heapq.heappop(self._heap)[2]

    def after(self, job: Job) -> int:
        """Queue the jobs ``job`` made possible; how many."""
        more = list(job.then()) if job.then is not None else []
        for j in more:
            self._push(j)
        return len(more)


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


