"""``run_benchmark``: load inputs, plan the fits, fit what is missing, assemble the run folder."""
from __future__ import annotations

import time
from typing import Any, Mapping

from histomoe_core import paths
from histomoe_core.benchmark.config import BenchmarkConfig, make_config
from histomoe_core.benchmark.inputs import input_digests, load_inputs, request_key, run_key
from histomoe_core.benchmark.results import BenchmarkRun, assemble, write_index
from histomoe_core.benchmark.units import Plan, fit_pending, thread_limits
from histomoe_core.errors import HistoMoEError


def run_benchmark(profile: str | BenchmarkConfig | Mapping[str, Any] = "her2st", *, progress: bool = True,
                  threads: int | None = 1, n_jobs: int | None = None, force: bool = False,
                  **overrides: Any) -> BenchmarkRun:
    """Run (or load) a benchmark; see the module docstring for what is written where.

    ``threads`` caps BLAS and torch threads per fit (default 1: these problems are small and CPUs are often
    shared; None or 0 keeps the libraries' defaults). ``n_jobs`` fits that many units at once in worker
    processes (None: :func:`resolve_jobs`); results do not depend on it.
    """
    cfg = make_config(profile, **overrides)
    limiter = thread_limits(threads)
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
            write_index(index, final)
            return BenchmarkRun(final)
        work = Plan(cfg, samples, folds, img, meta, fixed, digests)
        jobs = resolve_jobs(n_jobs)
        # selections and the fits that need none at once; each selection then queues the fit of its choice
        _, independent = work.fit_jobs(selected=False)
        fit_pending(cfg, work.selection_jobs() + independent, n_jobs=jobs, threads=threads, progress=progress)
        done, fits = work.fit_jobs()  # every unit is cached by now, except those of selections read from the cache
        fit_pending(cfg, fits, n_jobs=jobs, threads=threads, progress=progress)
        assemble(cfg, folds, {k: p.table for k, p in work.panels.items()}, done, final, key, time.perf_counter() - t_start,
                 selections=work.selections, notes={"inner_cv_groups": inner_cv_groups(samples, folds)})
        write_index(index, final)
        return BenchmarkRun(final)
    finally:
        limiter.unregister()


def inner_cv_groups(samples, folds) -> dict[str, str]:
    """Per fold, what its inner CV groups by: "patient", or "section" when the training fold has fewer than
    :data:`~histomoe_core.features.MIN_INNER_PATIENTS` patients."""
    from histomoe_core.features import MIN_INNER_PATIENTS

    return {f.name: "patient" if len({samples[i].patient for i in f.train}) >= MIN_INNER_PATIENTS else "section"
            for f in folds}


def resolve_jobs(n_jobs: int | None) -> int:
    """Worker processes for fits: ``n_jobs``, else ``$HISTOMOE_JOBS``, else 1 when a GPU is visible (fits run on it
    one after the other) and the usable CPUs (at most 8) when not."""
    import os

    import torch

    if n_jobs is None:
        env = os.environ.get("HISTOMOE_JOBS")
        if env:
            try:
                n_jobs = int(env)
            except ValueError:
                raise HistoMoEError(f"HISTOMOE_JOBS={env!r} is not a number of worker processes; set it to 1 or more "
                                    "or unset it") from None
        elif torch.cuda.is_available():
            n_jobs = 1
        else:
            n_jobs = min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1), 8)
    if n_jobs < 1:
        raise HistoMoEError(f"n_jobs (--jobs, HISTOMOE_JOBS) must be >= 1, got {n_jobs}")
    return int(n_jobs)


