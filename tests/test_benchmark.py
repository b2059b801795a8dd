"""Benchmark on synthetic data: specialisation of HistoMoE with metadata routing (known organs), and the
run folder (tables, predictions, models, panels chosen on the training fold, content-addressed reload)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from histomoe_core.data.splits import Fold
from histomoe_core.errors import HistoMoEError

#: six organs with organ-specific gene programs; 3 patients each, so two train patients per organ remain
SYN = dict(n_organs=6, patients_per_organ=3, spots_per_section=60, n_genes=60, patch_px=32)


@pytest.fixture(scope="module")
def synthetic():
    from histomoe_core.data import load_dataset
    from histomoe_core.embed import embed_metadata, embed_samples

    samples = load_dataset("synthetic", **SYN)
    return samples, embed_samples(samples, "tiny", progress=False), embed_metadata(samples, "onehot")


@pytest.fixture(scope="module")
def fold_data(synthetic):
    from histomoe_core.data.genes import select_panel
    from histomoe_core.features import fold_arrays, spot_table

    samples, img, meta = synthetic
    test = tuple(s.sample_id for s in samples if s.patient.endswith("P3"))
    train = tuple(s.sample_id for s in samples if s.sample_id not in test)
    genes = select_panel([samples[i] for i in train], n_genes=20).index.tolist()
    return fold_arrays(spot_table(samples, img, meta), samples, Fold("P3", train, test), genes=genes)


def test_metadata_routed_moe_specialises_and_beats_a_single_mlp(fold_data):
    from sklearn.metrics import normalized_mutual_info_score

    from histomoe_core.baselines import BASELINES
    from histomoe_core.evaluate import score
    from histomoe_core.moe import count_parameters
    from histomoe_core.train import MoERegressor

    tr, te = fold_data
    train = dict(epochs=60, patience=10, lr=3e-3)
    moe = MoERegressor(n_experts=6, hidden=32, router_input="meta", top_k=1, guide_weight=0.1, train=train).fit(tr)
    mlp = BASELINES.get("mlp")(hidden=32, match_experts=6, train=train).fit(tr)
    assert abs(count_parameters(moe.model) - count_parameters(mlp.model)) < 0.05 * count_parameters(mlp.model)
    out = moe.predict_full(te)
    r_moe = score(te.y, out["pred"], te.sample, te.genes)[0]["pearson"]
    r_mlp = score(te.y, mlp.predict(te), te.sample, te.genes)[0]["pearson"]
    assert r_moe > r_mlp + 0.1, (r_moe, r_mlp)
    # the routing recovers the organs of unseen patients
    nmi = normalized_mutual_info_score(te.context, out["gates"].argmax(1))
    assert nmi >= 0.9, nmi
    assert ((out["gates"] > 0).sum(1) == 1).all()  # top-1: one expert per spot


def test_load_run_includes_the_seed_a_chapter_opens(monkeypatch):
    """A chapter run with ``-p seed=1`` opens seed 1's model: its run trains that seed too, whatever ``n_seeds``."""
    import histomoe_core.benchmark as bm
    from histomoe_core import tl
    from histomoe_core.benchmark.config import make_config

    seen = []
    monkeypatch.setattr(bm, "run_benchmark", lambda dataset, **kw: seen.append(kw.get("seeds")))
    assert make_config("synthetic").seeds == (0, 1, 2)
    for kw in ({"seed": 1}, {"seed": 4}, {"n_seeds": 1, "seed": 0}, {"n_seeds": 1, "seed": 1},
               {"n_seeds": 3, "seed": 1}, {"n_seeds": 1, "seed": 3}, {"n_seeds": 2}):
        tl.load_run("synthetic", progress=False, **kw)
    assert seen == [None, (0, 1, 2, 4), (0,), (0, 1), (0, 1, 2), (0, 3), (0, 1)]


def test_run_benchmark_writes_a_complete_reloadable_run(monkeypatch):
    import histomoe_core.benchmark as bm
    from histomoe_core.data.genes import select_panel

    models = {"ridge_hest": {"kind": "ridge_hest", "centre": False}, "knn": {"kind": "knn"},
              "histomoe": {"kind": "histomoe", "n_experts": 6, "hidden": 16, "router_input": "meta", "top_k": 1,
                           "guide_weight": 0.1}}
    kw = dict(dataset_options=SYN, text_encoder="onehot", seeds=(0, 1), targets=("log1p", "log1p_norm"),
              n_genes=15, models=models, train={"epochs": 4, "patience": 2})
    run = bm.run_benchmark("synthetic", progress=False, **kw)
    cfg = run.config
    res = run.results
    n_folds = len(cfg["folds"])
    assert n_folds == 3
    assert len(res) == 2 * n_folds * 3 * 2  # targets x folds x models x seeds
    assert set(res["model"]) == set(models) and res["pearson"].notna().all()
    # deterministic models are fit once per fold: identical rows for every seed
    knn = res[res["model"] == "knn"].pivot_table(index=["target", "fold"], columns="seed", values="pearson")
    assert np.allclose(knn[0], knn[1])
    pg, ps = run.per_gene, run.per_section
    assert len(pg) == len(res) * 15
    first = cfg["folds"][0]
    assert set(ps[(ps["fold"] == first["name"])]["section"]) == set(first["test"])
    # the panel is chosen on the training sections of each fold
    from histomoe_core.data import load_dataset

    samples = load_dataset("synthetic", **SYN)
    ref = select_panel([samples[i] for i in first["train"]], n_genes=15, kind="log1p")
    assert list(run.panel("log1p", first["name"]).index) == list(ref.index)
    # predictions and the MoE weights are saved and reload
    p = run.predictions("histomoe", first["name"], seed=1, target="log1p")
    assert p["pred"].shape == p["y"].shape == (len(p["spot"]), 15)
    assert p["gates"].shape == (len(p["spot"]), 6) and np.allclose(p["gates"].sum(1), 1, atol=1e-5)
    model = run.load_model("histomoe", first["name"], seed=1, target="log1p")
    assert model.cfg.n_genes == 15 and model.cfg.top_k == 1
    for opener in (run.predictions, run.load_model):  # a seed the run did not train: one clear line, the fix
        with pytest.raises(HistoMoEError, match=r"seed 2 is not one of this run's training seeds \(0, 1\).*n_seeds=3"):
            opener("histomoe", first["name"], seed=2)
    assert run.saved_models() == ["histomoe"]
    # one held-out section rebuilt through the metadata router (a one-hot vocabulary of the whole dataset)
    from histomoe_core import tl

    one = tl.fold_adata(run, first["name"], model="histomoe", seed=1, target="log1p", sections=[first["test"][0]])
    assert one.n_obs == SYN["spots_per_section"] and one.obsm["X_meta"].shape[1] == model.cfg.meta_dim > 1
    assert one.uns["histomoe"]["params"]["max_abs_diff_vs_run"] < 1e-4
    md = run.summary_markdown()
    assert "## Targets: log1p_norm" in md and "histomoe" in md
    assert json.loads((run.path / "config.json").read_text())["config"]["seeds"] == [0, 1]

    # a second call with nothing changed loads the run without fitting anything
    def boom(*a, **k):
        raise AssertionError("refit on an unchanged run")

    monkeypatch.setattr(bm.units, "fit_unit", boom)
    again = bm.run_benchmark("synthetic", progress=False, **kw)
    assert again.path == run.path
    # a run with a subset of the models is a new run, assembled from the cached fits
    subset = bm.run_benchmark("synthetic", progress=False, **{**kw, "models": {"knn": models["knn"]}})
    assert subset.path != run.path and set(subset.results["model"]) == {"knn"}
    assert np.allclose(subset.results["pearson"], res[res["model"] == "knn"]["pearson"])
    # a change in the config gives a new run
    with pytest.raises(AssertionError, match="refit"):
        bm.run_benchmark("synthetic", progress=False, **{**kw, "n_genes": 14})


def test_parallel_fits_equal_serial_fits(monkeypatch, tmp_path):
    import histomoe_core.benchmark as bm

    models = {"ridge_cv": {"kind": "ridge_cv"},
              "histomoe": {"kind": "histomoe", "n_experts": 3, "hidden": 8, "router_input": "meta", "top_k": 1}}
    kw = dict(dataset_options=SYN, text_encoder="onehot", seeds=(0, 1), targets=("log1p",), n_genes=10,
              models=models, train={"epochs": 3, "patience": 2}, progress=False)
    monkeypatch.setenv("HISTOMOE_HOME", str(tmp_path / "serial"))
    serial = bm.run_benchmark("synthetic", n_jobs=1, **kw)
    monkeypatch.setenv("HISTOMOE_HOME", str(tmp_path / "parallel"))
    parallel = bm.run_benchmark("synthetic", n_jobs=2, **kw)
    assert (tmp_path / "parallel" / "runs") in parallel.path.parents
    a, b = serial.results, parallel.results
    assert len(a) == len(b) == 3 * 2 * 2
    assert np.allclose(a["pearson"], b["pearson"], atol=1e-6, equal_nan=True)
    with pytest.raises(HistoMoEError, match="n_jobs"):
        bm.resolve_jobs(0)
    import torch

    monkeypatch.delenv("HISTOMOE_JOBS")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert bm.resolve_jobs(None) == 1  # with a GPU the fits run on it, one after the other
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bm.resolve_jobs(None) >= 1 and bm.resolve_jobs(3) == 3
    monkeypatch.setenv("HISTOMOE_JOBS", "1")
    # a fit that fails in a worker names the fit; nothing of the run is written
    monkeypatch.setenv("HISTOMOE_HOME", str(tmp_path / "failing"))
    bad = {**models, "knn": {"kind": "knn", "no_such_option": 1}}  # fails inside the worker
    with pytest.raises(HistoMoEError, match="fit log1p .* knn .* failed in a worker"):
        bm.run_benchmark("synthetic", n_jobs=2, **{**kw, "models": bad})
    assert not list((tmp_path / "failing" / "runs").glob("synthetic-*/summary.md"))


def test_fold_adata_sees_the_embeddings_the_run_trained_on(tmp_path, monkeypatch):
    import histomoe_core.benchmark as bm
    from histomoe_core import tl

    monkeypatch.setenv("HISTOMOE_HOME", str(tmp_path))
    models = {"histomoe": {"kind": "histomoe", "n_experts": 2, "hidden": 8, "router_input": "image"}}
    run = bm.run_benchmark("synthetic", dataset_options=SYN, text_encoder="onehot", seeds=(0,), targets=("log1p",),
                           n_genes=10, models=models, train={"epochs": 2, "patience": 1}, embedding_norm="section",
                           progress=False)
    fold = run.config["folds"][0]
    one = tl.fold_adata(run, fold["name"], sections=[fold["test"][0]])  # raises if the inputs differ from the run's
    assert one.uns["histomoe"]["params"]["max_abs_diff_vs_run"] < 1e-4


def test_profiles_and_unknown_names():
    from histomoe_core.benchmark import PROFILES, make_config
    from histomoe_core.errors import HistoMoEError

    assert {"her2st", "synthetic", "hest"} <= set(PROFILES)
    cfg = make_config("her2st", models=["ridge_cv", "histomoe"], seeds=[0])
    assert list(cfg.models) == ["ridge_cv", "histomoe"] and cfg.seeds == (0,) and cfg.scheme == "lopo"
    assert len(make_config("her2st").seeds) >= 3
    assert make_config("hest").scheme == "hest"
    with pytest.raises(HistoMoEError, match="unknown models"):
        make_config("her2st", models=["nope"])
    with pytest.raises(HistoMoEError, match="unknown benchmark profile"):
        make_config("nope")


def test_cli_parses_the_benchmark_command():
    from histomoe_core.cli import build_parser

    args = build_parser().parse_args(["benchmark", "her2st", "--encoder", "tiny", "--seeds", "0", "1", "--models",
                                      "ridge_cv", "knn", "--targets", "log1p"])
    assert args.dataset == "her2st" and args.encoder == "tiny" and args.seeds == [0, 1]
    assert args.models == ["ridge_cv", "knn"] and args.func.__module__ == "histomoe_core.commands.benchmark"


def test_stratified_folds_hold_out_every_organ(synthetic):
    from histomoe_core.benchmark import stratified_folds

    samples, _, _ = synthetic
    organ = {s.sample_id: s.meta["organ"] for s in samples}
    patient = {s.sample_id: s.patient for s in samples}
    folds = stratified_folds(samples, 3, key="organ")
    assert len(folds) == 3
    assert sorted(i for f in folds for i in f.test) == sorted(samples.ids)  # every section tested once
    for f in folds:
        assert {organ[i] for i in f.test} == set(organ.values())
        assert not {patient[i] for i in f.test} & {patient[i] for i in f.train}


def test_job_cost_orders_inner_cv_then_neural_then_closed_form_fits():
    from histomoe_core.benchmark.models import MODELS, TISSUE_MODELS
    from histomoe_core.benchmark.units import job_cost

    assert job_cost(MODELS["histomoe"]) == 4 * 10 * 3  # four neural candidates, three inner folds
    assert job_cost(MODELS["histomoe"]) > job_cost(MODELS["mlp"]) > job_cost(TISSUE_MODELS["mlp"]) \
        > job_cost(MODELS["ridge_cv"]) > job_cost(TISSUE_MODELS["ridge_cv"]) == 1.0
