"""HEST-Bench as data: its tasks (patient splits and shipped gene lists from the tasks manifest) and the
pan-cancer collection ``hest_pan`` (several tasks in one benchmark, folds combining each task's own splits)."""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Literal, Sequence

import pandas as pd

from histomoe_core.data.manifests import Manifest, load_manifest
from histomoe_core.data.sample import Sample, SampleSet
from histomoe_core.data.sources import SOURCES
from histomoe_core.data.splits import Fold
from histomoe_core.errors import DataError

#: the manifest that lists HEST-1k's files and HEST-Bench's tasks
MANIFEST = "hest1k"


def read_hest_bench(path: Path) -> dict[str, dict]:
    """Tasks from a HEST-Bench folder (``<task>/splits/{train,test}_<k>.csv``, ``<task>/var_50genes.json``).

    Returns ``{task: {"samples": [...], "folds": [{"train": [...], "test": [...]}, ...], "genes": [...]}}``;
    this is how ``data_manifests/hest1k.yaml`` was transcribed.
    """
    out: dict[str, dict] = {}
    for task_dir in sorted(p for p in Path(path).iterdir() if (p / "splits").is_dir()):
        k = 0
        folds = []
        while (task_dir / "splits" / f"test_{k}.csv").exists():
            train = pd.read_csv(task_dir / "splits" / f"train_{k}.csv")["sample_id"].astype(str).tolist()
            test = pd.read_csv(task_dir / "splits" / f"test_{k}.csv")["sample_id"].astype(str).tolist()
            folds.append({"train": train, "test": test})
            k += 1
        genes = json.loads((task_dir / "var_50genes.json").read_text())["genes"]
        samples = sorted({s for f in folds for s in f["test"]}, key=_natural)
        out[task_dir.name] = {"samples": samples, "folds": folds, "genes": list(genes)}
    return out


def _natural(s: str) -> tuple:
    head = s.rstrip("0123456789")
    return (head, int(s[len(head):]) if s[len(head):] else -1)


def task_names() -> list[str]:
    return list(load_manifest(MANIFEST).extra["tasks"])


def _task(task: str, manifest: Manifest | None = None) -> tuple[str, dict]:
    tasks = (manifest or load_manifest(MANIFEST)).extra["tasks"]
    by_upper = {t.upper(): t for t in tasks}
    name = by_upper.get(str(task).upper())
    if name is None:
        raise DataError(f"unknown HEST-Bench task {task!r}; tasks: {', '.join(tasks)}")
    return name, tasks[name]


def hest_task(task: str) -> dict:
    """A HEST-Bench task: ``name``, ``samples``, ``folds`` (list of :class:`Fold`, by patient) and ``genes``.

    ``genes`` is HEST's shipped 50-gene list, chosen on all samples of the task (test folds included).
    """
    name, t = _task(task)
    folds = [Fold(f"split{k}", tuple(f["train"]), tuple(f["test"])) for k, f in enumerate(t["folds"])]
    return {"name": name, "samples": list(t["samples"]), "folds": folds, "genes": list(t["genes"])}


def shipped_genes(task: str) -> list[str]:
    """HEST's shipped gene list of ``task`` (``var_50genes.json``) without Xenium control probes
    (:func:`~histomoe_core.data.genes.is_control_probe`), whatever the list holds."""
    from histomoe_core.data.genes import is_control_probe

    genes = hest_task(task)["genes"]
    dropped = [g for g in genes if is_control_probe(g)]
    if dropped:
        warnings.warn(f"HEST-Bench task {task}: dropping control probes {dropped} from the shipped gene list", stacklevel=2)
    return [g for g in genes if not is_control_probe(g)]


def _fold_groups(manifest: Manifest) -> dict[str, str]:
    """sample id -> ``<task>-fold<k>`` of the test fold holding it (HEST-Bench folds are patient groups)."""
    groups = {}
    for name, t in manifest.extra.get("tasks", {}).items():
        for k, f in enumerate(t["folds"]):
            for s in f["test"]:
                groups.setdefault(s, f"{name}-fold{k}")
    return groups


# --- locating and fetching ----------------------------------------------------------------------------------


#: the nine HEST-Bench tasks (HCC was dropped from HEST-Bench; it stays loadable as a task of its own)
BENCH_TASKS = ("IDC", "PRAD", "PAAD", "SKCM", "COAD", "READ", "CCRCC", "LUNG", "LYMPH_IDC")
#: ``meta`` field holding a section's HEST-Bench task in ``hest_pan`` (its context: the cancer type)
TASK_KEY = "hest_task"


def pan_tasks(tasks: Sequence[str] | None = None) -> list[str]:
    """Canonical names of ``tasks`` (case-insensitive, default :data:`BENCH_TASKS`), each once; unknown names refused."""
    names = [_task(t)[0] for t in (BENCH_TASKS if tasks is None else tasks)]
    if not names:
        raise DataError(f"hest_pan needs at least one task; tasks: {', '.join(task_names())}")
    return list(dict.fromkeys(names))


@SOURCES.register("hest_pan")
def load_hest_pan(
    *, tasks: Sequence[str] | None = None, root: Path | None = None, unpatched: Literal["drop", "error"] = "drop",
    progress: bool = False,
) -> SampleSet:
    """The samples of several HEST-Bench tasks (default all nine), ``meta["hest_task"]`` set to each one's task.

    Patients are those of :func:`load_hest` (study + patient), so HEST's "patient 2" of two studies stays two
    people. A sample listed by two of the tasks is refused (its context would be ambiguous).
    """
    names = pan_tasks(tasks)
    out: list[Sample] = []
    owner: dict[str, str] = {}
    for name in names:
        for s in _load_hest(task=name, root=root, unpatched=unpatched, progress=progress):
            if s.sample_id in owner:
                raise DataError(f"sample {s.sample_id} belongs to HEST-Bench tasks {owner[s.sample_id]} and {name}; "
                                "choose one of them with --tasks")
            owner[s.sample_id] = name
            s.meta[TASK_KEY] = name
            out.append(s)
    return SampleSet("hest_pan", out)


def hest_pan_folds(samples: SampleSet, n_folds: int | None = None) -> list[Fold]:
    """Folds of a pan-cancer run that combine HEST-Bench's own per-task patient splits.

    Fold ``k`` (``fold<k>``, ``k < n_folds``, default: the most splits of any task present) tests, for every task
    ``t`` among the samples (``meta["hest_task"]``), the test samples of HEST split ``k mod n_splits(t)``: a task
    with fewer splits than folds has its splits tested again in order (PRAD's 2 splits in folds 0 2 4 next to
    CCRCC's 6). Training is every other sample whose patient is not tested in fold ``k`` (a patient held out by
    one task never trains the fold through another); no patient is ever on both sides (checked).
    """
    by_task: dict[str, list[str]] = {}
    for s in samples:
        if TASK_KEY not in s.meta:
            raise DataError(f"{s.sample_id}: no meta['{TASK_KEY}']; load the samples with load_dataset('hest_pan')")
        by_task.setdefault(s.meta[TASK_KEY], []).append(s.sample_id)
    splits = {t: hest_task(t)["folds"] for t in by_task}
    n = n_folds or max(len(f) for f in splits.values())
    if n < 1:
        raise DataError(f"hest_pan needs at least one fold, got {n_folds}")
    patient = {s.sample_id: s.patient for s in samples}
    folds = []
    for k in range(n):
        held = {i for t, fs in splits.items() for i in fs[k % len(fs)].test if i in patient}
        out = {patient[i] for i in held}
        test = tuple(s.sample_id for s in samples if s.sample_id in held)
        train = tuple(s.sample_id for s in samples if patient[s.sample_id] not in out)
        _check_fold(f"fold{k}", train, test, patient, by_task)
        folds.append(Fold(f"fold{k}", train, test))
    return folds


def _check_fold(name: str, train: Sequence[str], test: Sequence[str], patient: dict[str, str],
                by_task: dict[str, list[str]]) -> None:
    """A fold with a patient on both sides, or a task with nothing held out, is a bug: refuse it."""
    shared = {patient[i] for i in train} & {patient[i] for i in test}
    if shared:
        raise DataError(f"{name} puts patient(s) {sorted(shared)} in both train and test")
    untested = [t for t, ids in by_task.items() if not set(ids) & set(test)]
    if untested:
        raise DataError(f"{name} holds out no sample of task(s) {untested}; its HEST splits do not match the samples")
    skipped = set(patient) - set(train) - set(test)
    if skipped:
        warnings.warn(f"{name}: {sorted(skipped)} left out of training: their patients are tested in this fold "
                      "through another task", stacklevel=3)


def _load_hest(**kw) -> SampleSet:
    from histomoe_core.data.hest import load_hest  # the adapter imports this module

    return load_hest(**kw)
