"""Patient-grouped splits: leave-one-patient-out, k-fold over patients, or a published manifest of splits."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from histomoe_core.data.sample import SampleSet


@dataclass(frozen=True)
class Fold:
    name: str
    train: tuple[str, ...]  # sample ids
    test: tuple[str, ...]

    def as_dict(self) -> dict:
        return {"name": self.name, "train": list(self.train), "test": list(self.test)}


def _check(folds: list[Fold], samples: SampleSet) -> list[Fold]:
    patient = {s.sample_id: s.patient for s in samples}
    for f in folds:
        shared = {patient[i] for i in f.train} & {patient[i] for i in f.test}
        if shared:
            raise ValueError(f"fold {f.name} puts patient(s) {sorted(shared)} in both train and test")
    return folds


def leave_one_patient_out(samples: SampleSet) -> list[Fold]:
    folds = []
    for p in samples.patients:
        test = tuple(s.sample_id for s in samples if s.patient == p)
        train = tuple(s.sample_id for s in samples if s.patient != p)
        folds.append(Fold(f"test_{p}", train, test))
    return _check(folds, samples)


def patient_kfold(samples: SampleSet, k: int, *, seed: int = 0) -> list[Fold]:
    """``k`` folds over shuffled patients; every patient is tested exactly once."""
    patients = np.array(samples.patients)
    if not 2 <= k <= len(patients):
        raise ValueError(f"k must be between 2 and the number of patients ({len(patients)}), got {k}")
    order = np.random.default_rng(seed).permutation(patients)
    folds = []
    for i, group in enumerate(np.array_split(order, k)):
        g = set(group)
        test = tuple(s.sample_id for s in samples if s.patient in g)
        train = tuple(s.sample_id for s in samples if s.patient not in g)
        folds.append(Fold(f"fold{i}_" + "-".join(sorted(g)), train, test))
    return _check(folds, samples)


def make_folds(samples: SampleSet, scheme: str = "lopo", *, k: int | None = None, seed: int = 0) -> list[Fold]:
    if scheme == "lopo":
        return leave_one_patient_out(samples)
    if scheme == "kfold":
        return patient_kfold(samples, k or 2, seed=seed)
    raise ValueError(f"unknown split scheme {scheme!r}; use 'lopo' or 'kfold'")


def stratified_folds(samples, k: int, *, key: str = "organ"):
    """``k`` patient-grouped folds in which every context (``meta[key]``) with at least two patients has held-out
    patients: each context's patients are dealt round-robin over the folds. A context with one patient (one
    section) stays in training in every fold: it can be learnt from but not scored."""
    ctx: dict[str, list[str]] = {}
    for s in samples:
        pats = ctx.setdefault(str(s.meta.get(key) or "unknown"), [])
        if s.patient not in pats:
            pats.append(s.patient)
    group = {p: i % k for pats in ctx.values() if len(pats) > 1 for i, p in enumerate(sorted(pats))}
    folds = []
    for i in range(k):
        test = tuple(s.sample_id for s in samples if group.get(s.patient) == i)
        train = tuple(s.sample_id for s in samples if group.get(s.patient) != i)
        if test and train:
            folds.append(Fold(f"fold{i}", train, test))
    return folds


def leave_context_out(samples, *, key: str = "organ", contexts=None):
    """One fold per context (or per context in ``contexts``): all its sections held out, every other trained on."""
    names = list(dict.fromkeys(str(s.meta.get(key) or "unknown") for s in samples))
    folds = []
    for c in names if contexts is None else [c for c in names if c in set(contexts)]:
        test = tuple(s.sample_id for s in samples if str(s.meta.get(key) or "unknown") == c)
        train = tuple(s.sample_id for s in samples if s.sample_id not in test)
        folds.append(Fold("out_" + c.replace(" ", "_"), train, test))
    return folds
