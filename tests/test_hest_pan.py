"""Pan-cancer HEST-Bench (profile hest-pan) on a HEST-layout fixture: three tasks / organs with real HEST-Bench
sample ids, a Visium-like whole transcriptome (COAD) and Xenium-like targeted panels with control probes (LUNG,
PAAD); HEST's per-task splits combined into folds; per-task panels, computed or shipped."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from histomoe_core.data.genes import is_control_probe
from histomoe_core.data.hest import BENCH_TASKS, TASK_KEY, hest_pan_folds, hest_task, pan_tasks
from histomoe_core.data.sample import SampleSet
from histomoe_core.errors import DataError, HistoMoEError

TASKS = ["LUNG", "PAAD", "COAD"]
#: quick models: a pooled ridge, one ridge per task, and a shared expert + per-task corrections routed by the task
MODELS = {
    "ridge_cv": {"kind": "ridge_cv", "centre": False},
    "per_context": {"kind": "per_context", "centre": False},
    "moe": {"kind": "histomoe", "n_experts": "contexts", "expert": "linear", "router_input": "meta", "top_k": 1,
            "guide_weight": 0.1, "shared_expert": True, "init": "ridge", "freeze_init": True, "centre": False},
}


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    from histomoe_core.data.synthetic import make_hest_pan

    root = tmp_path_factory.mktemp("panmirror")
    make_hest_pan(root / "hest1k")
    mp = pytest.MonkeyPatch()
    mp.setenv("HISTOMOE_MIRRORS", str(root))
    yield root
    mp.undo()


@pytest.fixture(scope="module")
def pan(mirror) -> SampleSet:
    from histomoe_core.data import load_dataset

    return load_dataset("hest_pan", tasks=["lung", "paad", "Coad"])


def test_fixture_has_three_organs_whose_panels_differ(pan):
    assert {s.meta[TASK_KEY] for s in pan} == set(TASKS) and len({s.meta["organ"] for s in pan}) == 3
    assert {s.meta["technology"] for s in pan} == {"Visium", "Xenium"}
    features = {s.meta[TASK_KEY]: set(s.adata.var_names) for s in pan}
    assert len({frozenset(f) for f in features.values()}) == 3
    for s in pan:
        assert set(hest_task(s.meta[TASK_KEY])["genes"]) <= set(s.adata.var_names)  # shipped lists are measured
        controls = [g for g in s.adata.var_names if is_control_probe(g)]
        if s.meta["technology"] == "Xenium":
            assert any(g.startswith("BLANK_") for g in controls) and any(g.startswith("NegControlProbe_") for g in controls)
            detected = (s.adata[:, controls].X.toarray() > 0).mean(0)
            assert (detected >= 0.1).all()  # eligible by detection: only the control filter keeps them out
        else:
            assert not controls
    # HEST's "patient 1" recurs across studies; qualified by the study, they are different people
    assert sum(s.meta["patient"] == "patient 1" for s in pan) == 3 and len(pan.patients) == len(pan)


def test_pan_tasks_default_to_the_nine_and_refuse_unknown_names():
    assert pan_tasks() == list(BENCH_TASKS) and "HCC" not in pan_tasks()
    assert pan_tasks(["lung", "LUNG", "ccrcc"]) == ["LUNG", "CCRCC"]
    with pytest.raises(DataError, match="unknown HEST-Bench task 'GLIOMA'"):
        pan_tasks(["IDC", "GLIOMA"])


def test_folds_hold_out_every_task_by_split_k_mod_n(pan):
    folds = hest_pan_folds(pan)
    assert [f.name for f in folds] == ["fold0", "fold1", "fold2"]  # PAAD has 3 splits, LUNG and COAD 2
    task = {s.sample_id: s.meta[TASK_KEY] for s in pan}
    patient = {s.sample_id: s.patient for s in pan}
    splits = {t: hest_task(t)["folds"] for t in TASKS}
    for k, f in enumerate(folds):
        assert {task[i] for i in f.test} == set(TASKS)
        for t in TASKS:
            assert {i for i in f.test if task[i] == t} == set(splits[t][k % len(splits[t])].test)
        assert {patient[i] for i in f.train}.isdisjoint({patient[i] for i in f.test})
        assert set(f.train) | set(f.test) == set(pan.ids)
    assert folds[2].test == tuple(i for i in pan.ids if i in set(splits["LUNG"][0].test) | set(splits["COAD"][0].test)
                                  | set(splits["PAAD"][2].test))
    assert len(hest_pan_folds(pan, n_folds=2)) == 2


def test_a_patient_tested_through_one_task_never_trains_that_fold(pan):
    # TENX141 (LUNG, tested in fold0) and TENX126 (PAAD, trained in fold0) made the same person
    same = SampleSet("pan", [replace(s, patient="one person", adata=s.adata.copy()) if s.sample_id in ("TENX141", "TENX126")
                             else s for s in pan])
    with pytest.warns(UserWarning, match=r"fold0: \['TENX126'\] left out of training"):
        fold0 = hest_pan_folds(same)[0]
    assert "TENX141" in fold0.test and "TENX126" not in fold0.train + fold0.test
    with pytest.raises(DataError, match="no meta\\['hest_task'\\]"):
        hest_pan_folds(SampleSet("x", [replace(pan["TENX118"], meta={}, adata=pan["TENX118"].adata.copy())]))


def test_shipped_lists_are_per_task_panels_without_control_probes(pan, monkeypatch):
    import histomoe_core.data.hest as hest
    from histomoe_core.benchmark.panels import fold_panels

    fold = hest_pan_folds(pan)[0]
    shipped = {t: hest_task(t)["genes"] for t in TASKS}
    with_controls = {t: g + ["BLANK_0001", "NegControlProbe_00001"] if t != "COAD" else g for t, g in shipped.items()}
    p = fold_panels(pan, fold, target="log1p", n_genes=50, min_frac=0.1, rule="hest", context_key=TASK_KEY,
                    fixed=with_controls)
    assert p.by_context == shipped
    assert not any(is_control_probe(g) for g in p.genes)
    assert all(p.scored(s.sample_id) == shipped[s.meta[TASK_KEY]] for s in pan)
    assert set(p.table["context"]) == set(TASKS) and (p.table["rule"] == "fixed").all()
    with pytest.raises(HistoMoEError, match="no fixed gene list for context 'COAD'"):
        fold_panels(pan, fold, target="log1p", n_genes=50, min_frac=0.1, rule="hest", context_key=TASK_KEY,
                    fixed={t: shipped[t] for t in ("LUNG", "PAAD")})
    with pytest.raises(HistoMoEError, match=r"TENX118 \(LUNG\) does not measure \['NOTAGENE'\]"):
        fold_panels(pan, fold, target="log1p", n_genes=50, min_frac=0.1, rule="hest", context_key=TASK_KEY,
                    fixed={**shipped, "LUNG": shipped["LUNG"] + ["NOTAGENE"]})
    # the manifest's lists hold no control probe; one that did would lose it, with a warning
    import histomoe_core.data.hest_bench as bench

    real = bench.hest_task
    monkeypatch.setattr(bench, "hest_task", lambda t: {**real(t), "genes": ["BLANK_0042", *real(t)["genes"]]})
    with pytest.warns(UserWarning, match=r"dropping control probes \['BLANK_0042'\]"):
        assert hest.shipped_genes("LUNG") == shipped["LUNG"]


def test_per_context_panel_keys_hold_the_genes(pan):
    """Unit and selection keys hash ``list(panels.key())``: two different panels must give different lists."""
    from histomoe_core.benchmark.panels import fold_panels

    fold = hest_pan_folds(pan)[0]
    keys = [list(fold_panels(pan, fold, target="log1p", n_genes=n, min_frac=0.1, rule="hest", scope="per_context",
                             context_key=TASK_KEY).key()) for n in (10, 20)]
    assert keys[0] != keys[1] and set(keys[0][-1]["sections"]) == set(pan.ids)


def test_hest_pan_benchmark_end_to_end(pan, tmp_path, monkeypatch):
    import histomoe_core.benchmark as bm

    monkeypatch.setenv("HISTOMOE_HOME", str(tmp_path))
    common = dict(dataset_options={"tasks": TASKS}, encoder="tiny", text_encoder="onehot", seeds=(0,), models=MODELS,
                  train={"epochs": 3, "patience": 2}, progress=False, n_jobs=1)
    run = bm.run_benchmark("hest-pan", n_genes=20, **common)
    assert run.config["config"]["scheme"] == "hest_pan"
    task = {s.sample_id: s.meta[TASK_KEY] for s in pan}
    patient = {s.sample_id: s.patient for s in pan}
    folds = run.config["folds"]
    assert len(folds) == 3
    for f in folds:
        assert {task[i] for i in f["test"]} == set(TASKS)  # every fold holds out patients of every task
        assert {patient[i] for i in f["train"]}.isdisjoint({patient[i] for i in f["test"]})
        panel = run.panel("log1p", f["name"])
        by_task = {t: set(g.index) for t, g in panel.groupby("context")}
        assert set(by_task) == set(TASKS) and all(len(g) == 20 for g in by_task.values())
        assert len({frozenset(g) for g in by_task.values()}) == 3  # per-task panels differ
        assert not any(is_control_probe(g) for g in panel.index)
    pc = run.per_context
    assert set(pc["context"]) == set(TASKS)
    assert (pc.groupby(["model", "fold"])["context"].nunique() == 3).all()  # per-task scores, every model and fold
    assert np.isfinite(pc["pearson"]).all() and (pc["n_genes"] == 20).all()
    # HEST's shipped lists, one per task: what is scored is exactly those genes (not the cached computed panels)
    shipped = bm.run_benchmark("hest-pan", gene_list="hest", **common)
    genes = set(shipped.per_gene["gene"])
    assert genes == set().union(*(hest_task(t)["genes"] for t in TASKS))
    assert (shipped.per_context["n_genes"] == 50).all()


def test_cli(mirror, tmp_path, monkeypatch, capsys):
    from histomoe_core.cli import main

    monkeypatch.setenv("HISTOMOE_HOME", str(tmp_path))
    assert main(["data", "summary", "hest", "--task", "lung"]) == 0
    assert "TENX118" in capsys.readouterr().out
    assert main(["embed", "hest", "--task", "PAAD", "--encoder", "tiny", "--no-progress"]) == 0
    assert main(["embed", "hest", "--samples", "TENX111", "--encoder", "tiny", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["benchmark", "hest-pan", "--tasks", "LUNG", "GLIOMA"]) == 2
    assert "unknown HEST-Bench task 'GLIOMA'" in capsys.readouterr().err
    assert main(["benchmark", "her2st", "--tasks", "LUNG"]) == 2
    assert "--tasks applies to hest-pan only" in capsys.readouterr().err
    assert main(["benchmark", "hest-pan", "--task", "LUNG"]) == 2
    assert "hest-pan takes --tasks" in capsys.readouterr().err
    assert main(["benchmark", "hest-pan", "--tasks", "lung", "paad", "coad", "--encoder", "tiny", "--text-encoder",
                 "onehot", "--models", "ridge_cv", "--seeds", "0", "--n-genes", "10", "--no-progress"]) == 0
    assert "per fold" in capsys.readouterr().out.lower()
