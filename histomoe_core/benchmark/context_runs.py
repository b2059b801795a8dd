"""Runs that differ only in their spatial context stage, seen as one run so that
:mod:`~histomoe_core.benchmark.compare` can pair their models (with and without context) on the same folds,
panels and test spots: model ``m`` of the run labelled ``L`` is ``"m@L"``."""
from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd

from histomoe_core.benchmark.results import BenchmarkRun
from histomoe_core.errors import HistoMoEError

SEP = "@"


class CombinedRuns:
    """Several :class:`BenchmarkRun` by label; refuses runs whose folds or gene panels differ (their models
    would not be scored on the same spots and genes)."""

    def __init__(self, runs: Mapping[str, BenchmarkRun]) -> None:
        if not runs:
            raise HistoMoEError("CombinedRuns needs at least one run")
        self.runs = dict(runs)
        first = next(iter(self.runs.values()))
        self.config = first.config
        for label, run in self.runs.items():
            if SEP in label:
                raise HistoMoEError(f"run label {label!r} may not contain {SEP!r}")
            self._check_same_protocol(first, run, label)

    @staticmethod
    def _check_same_protocol(a: BenchmarkRun, b: BenchmarkRun, label: str) -> None:
        ca, cb = a.config["config"], b.config["config"]
        if a.config["folds"] != b.config["folds"] or list(ca["targets"]) != list(cb["targets"]):
            raise HistoMoEError(f"run {label!r} has other folds or targets than the first run")
        for t in ca["targets"]:
            for f in a.config["folds"]:
                if not a.panel(t, f["name"]).index.equals(b.panel(t, f["name"]).index):
                    raise HistoMoEError(f"run {label!r}: panel of {t} / {f['name']} differs from the first run's")

    def _stack(self, attr: str) -> pd.DataFrame:
        parts = []
        for label, run in self.runs.items():
            df = getattr(run, attr).copy()
            df["model"] = df["model"].astype(str) + SEP + label
            parts.append(df)
        return pd.concat(parts, ignore_index=True)

    @property
    def results(self) -> pd.DataFrame:
        return self._stack("results")

    @property
    def per_section(self) -> pd.DataFrame:
        return self._stack("per_section")

    def predictions(self, model: str, fold: str, seed: int = 0, target: str | None = None) -> dict[str, np.ndarray]:
        name, _, label = model.rpartition(SEP)
        if label not in self.runs:
            raise HistoMoEError(f"model {model!r}: no run labelled {label!r} (runs: {', '.join(self.runs)})")
        return self.runs[label].predictions(name, fold, seed=seed, target=target)
