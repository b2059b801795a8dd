"""The evaluation protocol: HEST's panel rule on training sections, control probes never in a panel, nested
selection inside the training folds, and paired bootstrap comparisons."""
from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc

from histomoe_core.data.genes import is_control_probe, select_panel
from histomoe_core.data.sample import Sample

SYN = dict(n_organs=3, patients_per_organ=3, spots_per_section=60, n_genes=60, patch_px=32)


@pytest.fixture(scope="module")
def samples():
    from histomoe_core.data import load_dataset

    return load_dataset("synthetic", **SYN)


def _with_genes(s: Sample, extra: dict[str, np.ndarray]) -> Sample:
    """A copy of ``s`` with extra count columns."""
    x = np.asarray(s.adata.X.toarray() if hasattr(s.adata.X, "toarray") else s.adata.X, dtype=np.float32)
    cols = np.column_stack([x, *extra.values()]).astype(np.float32)
    a = ad.AnnData(cols, obs=s.adata.obs.copy(), var=pd.DataFrame(index=[*s.adata.var_names, *extra]),
                   obsm=dict(s.adata.obsm), uns=dict(s.adata.uns))
    return Sample(**{**s.__dict__, "adata": a})


def _hest_reference(train, k: int) -> set[str]:
    """HEST's get_k_genes as its paper describes it, written independently: per sample keep genes detected in
    >= 10 % of spots, intersect, drop BLANK / Control names, stack raw counts, log1p, seurat HVG top k."""
    keep = None
    for s in train:
        x = s.adata.X.toarray() if hasattr(s.adata.X, "toarray") else np.asarray(s.adata.X)
        ok = set(np.asarray(s.adata.var_names)[(x > 0).mean(0) >= 0.1])
        keep = ok if keep is None else keep & ok
    genes = [g for g in train[0].adata.var_names if g in keep and "BLANK" not in g and "Control" not in g]
    stacked = ad.concat([s.adata[:, genes] for s in train])
    stacked.X = np.log1p(np.asarray(stacked.X.toarray() if hasattr(stacked.X, "toarray") else stacked.X, dtype=np.float32))
    sc.pp.highly_variable_genes(stacked, n_top_genes=k, flavor="seurat")
    return set(stacked.var_names[stacked.var["highly_variable"]])


def test_hest_panel_rule_matches_an_independent_reference(samples):
    train = list(samples)[:6]
    panel = select_panel(train, n_genes=15, rule="hest")
    assert set(panel.index) == _hest_reference(train, 15)
    assert list(panel["rank"]) == list(range(1, 16)) and (panel["rule"] == "hest").all()
    assert panel["score"].is_monotonic_decreasing
    # the variance rule is a different panel (same filters)
    assert set(select_panel(train, n_genes=15, rule="variance").index) != set(panel.index)
    with pytest.raises(ValueError, match="unknown panel rule"):
        select_panel(train, rule="top")


def test_control_probes_never_enter_a_panel(samples):
    rng = np.random.default_rng(0)
    probes = ["BLANK_0001", "NegControlProbe_00042", "NegControlCodeword_0500", "UnassignedCodeword_0007"]
    noisy = [_with_genes(s, {p: rng.poisson(rng.uniform(0.5, 40), size=s.n_spots) for p in probes})
             for s in list(samples)[:6]]
    assert all(is_control_probe(p) for p in probes) and not is_control_probe("ERBB2")
    for rule in ("hest", "variance"):
        panel = select_panel(noisy, n_genes=20, rule=rule)
        assert not set(probes) & set(panel.index), rule


@pytest.fixture(scope="module")
def selection_run(tmp_path_factory):
    import os

    import histomoe_core.benchmark as bm

    os.environ["HISTOMOE_HOME"] = str(tmp_path_factory.mktemp("protocol"))
    # a known answer: retrieval of every training spot predicts one constant (no correlation), ridge does not
    models = {"ridge_cv": bm.models.select({"mean": {"kind": "knn", "k": 10**6, "centre": False},
                                            "raw": {"kind": "ridge_cv", "centre": False}}),
              "ridge_raw": {"kind": "ridge_cv", "centre": False},
              "ridge_hest": {"kind": "ridge_hest", "centre": False}}
    return bm.run_benchmark("synthetic", dataset_options=SYN, text_encoder="onehot", seeds=(0, 1),
                            targets=("log1p",), n_genes=12, models=models, progress=False, n_jobs=1)


def test_nested_selection_chooses_inside_the_training_folds(selection_run):
    run = selection_run
    sel = pd.read_csv(run.path / "selections.csv")
    folds = {f["name"]: f for f in run.config["folds"]}
    assert set(sel["fold"]) == set(folds) and set(sel["candidate"]) == {"mean", "raw"}
    assert (sel.groupby("fold")["chosen"].sum() == 1).all()
    chosen = sel[sel["chosen"]].set_index("fold")["candidate"]
    assert (chosen == "raw").all(), chosen
    assert (sel[sel["chosen"]]["inner_pearson"].to_numpy()
            >= sel[~sel["chosen"]]["inner_pearson"].to_numpy()).all()
    # the selected model is exactly its chosen candidate fit on the whole training fold (one shared unit)
    r = run.results.set_index(["model", "fold", "seed"])["pearson"]
    assert np.allclose(r.loc["ridge_cv"], r.loc["ridge_raw"])
    assert set(run.results.loc[run.results["model"] == "ridge_cv", "selected"]) == {"raw"}
    assert "Choices made inside the training folds" in run.summary_markdown()
    assert run.config["inner_cv_groups"] == {f: "patient" for f in folds}  # two training patients per organ x 3


def test_selection_reads_no_test_section(selection_run):
    import json

    from histomoe_core import cache

    run = selection_run
    train = {f["name"]: set(f["train"]) for f in run.config["folds"]}
    found = 0
    for p in (cache.artifact_dir("benchmark_selections", "x").parent).glob("*/selection.json"):
        sel = json.loads(p.read_text())
        inner = {s for part in sel["inner_sections"] for s in part}
        # the inner validation parts cover exactly the training sections of one fold: no test section is read
        assert sum(inner == t for t in train.values()) == 1
        found += 1
    assert found == len(train)


def test_paired_bootstrap_difference(selection_run):
    from histomoe_core.benchmark.compare import bootstrap_difference, compare_to, fold_differences

    run = selection_run
    same = bootstrap_difference(run, "ridge_cv", "ridge_raw", target="log1p", n_boot=200)
    assert same["diff"] == pytest.approx(0.0, abs=1e-9) and same["lo"] == same["hi"] == pytest.approx(0.0, abs=1e-9)
    assert same["verdict"] == "tie"
    b = bootstrap_difference(run, "ridge_cv", "ridge_hest", target="log1p", n_boot=500)
    f = fold_differences(run, "ridge_cv", "ridge_hest", target="log1p")
    # the point estimate is the difference of the run's own headline numbers
    assert b["diff"] == pytest.approx(f["diff"].mean(), abs=1e-5)
    assert b["lo"] <= b["diff"] <= b["hi"] and b["n_sections"] == run.per_section["section"].nunique()
    assert b["verdict"] == ("tie" if b["lo"] <= 0 <= b["hi"] else "better" if b["lo"] > 0 else "worse")
    table = compare_to(run, "ridge_cv", ["ridge_raw", "ridge_hest"], target="log1p", n_boot=200)
    assert table.loc["ridge_raw", "verdict"] == "tie" and table.loc["ridge_raw", "folds_won"] == "0/3"


def test_panel_stats_measure_how_much_a_gene_follows_spot_depth(samples):
    from histomoe_core.data.genes import panel_stats

    rng = np.random.default_rng(1)
    two = []
    for s in list(samples)[:2]:
        total = np.asarray(s.adata.X.sum(axis=1)).ravel()
        two.append(_with_genes(s, {"DEEP": 1000 * total, "FLAT": rng.poisson(5, size=s.n_spots)}))
    st = panel_stats(two, ["DEEP", "FLAT"])
    assert st.loc["DEEP", "depth_r"] > 0.99 and abs(st.loc["FLAT", "depth_r"]) < 0.3
    assert st.loc["DEEP", "detected"] == pytest.approx(float(np.mean([(s.adata.X.sum(axis=1) > 0).mean() for s in list(samples)[:2]])))


@pytest.mark.parametrize("with_raw", [True, False], ids=["choice-in-table", "choice-not-in-table"])
def test_selections_and_fits_run_in_one_queue(tmp_path, monkeypatch, with_raw):
    """The selections run together with every fit that needs none (costliest first); a finished selection
    queues the fit of its choice, unless that unit is a model of the table, planned already (known answer:
    ridge beats a constant, see above)."""
    import histomoe_core.benchmark as bm
    from histomoe_core.benchmark.config import make_config
    from histomoe_core.benchmark.inputs import input_digests, load_inputs
    from histomoe_core.benchmark.units import Job, Plan, fit_pending

    monkeypatch.setenv("HISTOMOE_HOME", str(tmp_path))
    models = {"ridge_cv": bm.models.select({"mean": {"kind": "knn", "k": 10**6, "centre": False},
                                            "raw": {"kind": "ridge_cv", "centre": False}}),
              **({"ridge_raw": {"kind": "ridge_cv", "centre": False}} if with_raw else {}),
              "ridge_hest": {"kind": "ridge_hest", "centre": False}}
    cfg = make_config("synthetic", dataset_options=SYN, text_encoder="onehot", targets=("log1p",), n_genes=12,
                      models=models)
    samples, folds, img, meta, fixed = load_inputs(cfg, progress=False)
    work = Plan(cfg, samples, folds, img, meta, fixed, input_digests(samples, img, meta))
    order: list[str] = []

    def logged(job: Job) -> Job:  # the same job, recording when it runs
        then = job.then and (lambda: [logged(j) for j in job.then()])
        return Job(job.label, lambda *a: (order.append(job.label), job.fn(*a)), job.args, job.cost, then)

    done, independent = work.fit_jobs(selected=False)  # no selection exists yet: select models are left out
    assert {k[2] for k in done} == set(models) - {"ridge_cv"}
    selections = work.selection_jobs()
    assert len(selections) == len(folds) and len(independent) == (len(models) - 1) * len(folds)
    cheap = Job("cheap", lambda: order.append("cheap"), (), 0.5)
    fit_pending(cfg, [logged(j) for j in [cheap, *independent, *selections]], n_jobs=1, threads=1, progress=False)
    n = len(folds)
    assert all(lab.endswith("inner CV") for lab in order[:n]) and order[-1] == "cheap"
    follow = [lab for lab in order if lab.endswith("ridge_cv s0")]
    assert len(follow) == (0 if with_raw else n)  # planned once: the table's ridge_raw unit is the choice
    done, rest = work.fit_jobs()
    assert rest == [] and {k[2] for k in done} == set(models)
    if with_raw:
        assert all(done[("log1p", f.name, "ridge_cv", 0)] == done[("log1p", f.name, "ridge_raw", 0)] for f in folds)
