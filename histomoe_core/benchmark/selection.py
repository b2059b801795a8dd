"""Nested model selection: a ``select`` model's candidates compete in the inner CV of each training fold.

For one (target, fold, model), :func:`select_unit` fits every candidate on the inner folds of the training
sections (grouped as :func:`~histomoe_core.features.group_folds` says: patients, or sections when the training fold
has fewer than three patients), scores the HEST metric on each inner validation part (raw targets, as the test
fold is scored), and keeps the candidate with the best mean; ties go to the earlier candidate. Neural candidates
are fit with seed 0 here; the chosen one is then fit on the whole training fold with every benchmark seed. The
test fold is never read.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from histomoe_core import cache
from histomoe_core.benchmark.config import BenchmarkConfig
from histomoe_core.benchmark.inputs import UNIT_VERSION
from histomoe_core.benchmark.models import is_deterministic
from histomoe_core.errors import HistoMoEError


def selection_key(cfg: BenchmarkConfig, spec: Mapping[str, Any], inputs: str, code: str, target: str, fold,
                  genes) -> str:
    """Key of one selection: inputs, fold, panel, target kind, the candidates, and the training settings when a
    candidate is neural."""
    neural = not is_deterministic(spec)
    return cache.content_key(UNIT_VERSION, "select", code, inputs, target, fold.as_dict(), list(genes), dict(spec),
                             cfg.centre_targets, dict(cfg.train) if neural else None)


def select_unit(cfg: BenchmarkConfig, name: str, spec: Mapping[str, Any], train, out: Path) -> None:
    """Score every candidate of ``spec`` in the inner CV of ``train`` and write ``selection.json``."""
    from histomoe_core.benchmark.units import fit_model, predict_model
    from histomoe_core.evaluate import hest_metric
    from histomoe_core.features import group_folds, inner_group_by

    folds = group_folds(train, max_folds=int(spec.get("inner_folds", 3)))
    scores: dict[str, list[float]] = {}
    for cand, cspec in spec["candidates"].items():
        scores[cand] = []
        for tr, va in folds:
            est, _, _ = fit_model(cfg, f"{name}:{cand}", cspec, train.take(tr), seed=0)
            val = train.take(va)
            scores[cand].append(hest_metric(val.y, predict_model(est, val)[0], val.mask, val.scoring_context()))
    means = {c: float(np.mean(v)) for c, v in scores.items()}
    chosen = max(means, key=lambda c: (means[c], -list(means).index(c)))
    with cache.atomic_dir(out, checksums=True) as tmp:
        (tmp / "selection.json").write_text(json.dumps({
            "model": name, "chosen": chosen, "spec": spec["candidates"][chosen], "mean": means, "scores": scores,
            "inner_cv_groups": inner_group_by(train), "n_inner_folds": len(folds),
            "inner_sections": [sorted(set(train.sample[va])) for _, va in folds],
        }, indent=1, default=float))


def read_selection(out: Path) -> dict:
    """The ``selection.json`` of a finished selection."""
    path = Path(out) / "selection.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise HistoMoEError(f"model selection {path} is missing or unreadable ({e}); re-run the benchmark with "
                            "--force to recompute it") from e
