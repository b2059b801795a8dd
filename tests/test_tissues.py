"""Several tissues in one benchmark: per-context panels and masks, masked models, context folds, collections."""
from __future__ import annotations

import numpy as np
import pytest

from histomoe_core.data.splits import Fold

SYN = dict(n_organs=3, patients_per_organ=3, spots_per_section=60, n_genes=60, patch_px=32)


@pytest.fixture(scope="module")
def samples():
    from histomoe_core.data import load_dataset

    return load_dataset("synthetic", **SYN)


@pytest.fixture(scope="module")
def fold_data(samples):
    from histomoe_core.benchmark.panels import fold_panels
    from histomoe_core.embed import embed_samples
    from histomoe_core.features import fold_arrays, spot_table

    test = tuple(s.sample_id for s in samples if s.patient.endswith("P3"))
    fold = Fold("P3", tuple(s.sample_id for s in samples if s.sample_id not in test), test)
    panels = fold_panels(samples, fold, target="log1p", n_genes=8, min_frac=0.1, rule="hest", scope="per_context",
                         context_key="organ")
    table = spot_table(samples, embed_samples(samples, "tiny", progress=False), context_key="organ")
    return panels, fold_arrays(table, samples, fold, genes=panels.genes, kind="log1p", scored=panels.scored)


def test_per_context_panels_and_masks(samples, fold_data):
    from histomoe_core.data.genes import select_panel

    panels, (train, test) = fold_data
    assert set(panels.by_context) == {s.meta["organ"] for s in samples}
    for organ, genes in panels.by_context.items():
        part = [s for s in samples if s.meta["organ"] == organ and s.sample_id in set(train.sample)]
        assert genes == select_panel(part, n_genes=8).index.tolist()  # chosen on that context's training sections
    assert panels.genes == list(dict.fromkeys(g for gs in panels.by_context.values() for g in gs))
    for data in (train, test):
        assert data.mask.shape == data.y.shape == (len(data), len(panels.genes))
        for i in np.random.default_rng(0).choice(len(data), 20, replace=False):
            organ = data.contexts[data.context[i]]
            expected = np.isin(panels.genes, panels.by_context[organ])
            assert (data.mask[i] == expected).all()
        assert (data.y[~data.mask] == 0).all()


def test_masked_ridge_fits_each_gene_on_the_spots_that_measure_it(fold_data):
    from sklearn.linear_model import Ridge

    from histomoe_core.baselines import masked_ridge_path

    _, (train, _) = fold_data
    z = np.random.default_rng(0).normal(size=(len(train), 5))
    coefs, b = masked_ridge_path(z, train.y.astype(np.float64), [3.0], train.mask)
    for g in (0, len(train.genes) - 1):
        rows = train.mask[:, g]
        ref = Ridge(alpha=3.0).fit(z[rows], train.y[rows, g])
        assert np.allclose(coefs[0, :, g], ref.coef_, atol=1e-6) and np.isclose(b[0, g], ref.intercept_, atol=1e-6)


def test_masked_knn_averages_only_neighbours_that_measure_the_gene():
    from histomoe_core.baselines import knn_predict

    bank = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    y = np.array([[1.0, 5.0], [3.0, 0.0], [10.0, 7.0]])
    mask = np.array([[True, True], [True, False], [True, True]])
    out = knn_predict(bank, y, np.array([[1.0, 0.05]]), [2], bank_mask=mask)[2]
    assert np.allclose(out, [[2.0, 5.0]])  # gene 1: only the nearest neighbour measures it


def test_masked_loss_ignores_unmeasured_entries():
    import torch

    from histomoe_core.moe import HistoMoE, MoEConfig, MoEOutput

    m = HistoMoE(MoEConfig(in_dim=4, n_genes=2))
    out = MoEOutput(pred=torch.tensor([[1.0, 100.0]]), gates=torch.ones(1, 1), expert_preds=torch.zeros(1, 1, 2), aux={})
    loss, parts = m.loss(out, torch.tensor([[0.0, 0.0]]), torch.tensor([[True, False]]))
    assert parts["mse"] == pytest.approx(1.0)


def test_context_folds(samples):
    from histomoe_core.data.sample import SampleSet
    from histomoe_core.data.splits import leave_context_out, stratified_folds

    # one organ with a single patient: it trains in every fold and is never tested
    ss = [s for s in samples if not (s.meta["organ"] == samples[0].meta["organ"] and not s.patient.endswith("P1"))]
    lone = samples[0].meta["organ"]
    folds = stratified_folds(SampleSet("x", ss), 2, key="organ")
    lone_ids = {s.sample_id for s in ss if s.meta["organ"] == lone}
    assert len(folds) == 2 and all(lone_ids <= set(f.train) and not lone_ids & set(f.test) for f in folds)
    for organ in {s.meta["organ"] for s in ss} - {lone}:
        ids = {s.sample_id for s in ss if s.meta["organ"] == organ}
        assert all(ids & set(f.test) for f in folds)  # >= 2 patients: held out in every fold
    lco = leave_context_out(samples, key="organ")
    assert len(lco) == len({s.meta["organ"] for s in samples})
    for f in lco:
        organs_test = {samples[i].meta["organ"] for i in f.test}
        assert len(organs_test) == 1 and not organs_test & {samples[i].meta["organ"] for i in f.train}


def test_species_keys_never_match_human_and_mouse_genes(samples):
    from dataclasses import replace

    from histomoe_core.benchmark.panels import fold_panels
    from histomoe_core.data.genes import species_of, symbol_of
    from histomoe_core.data.sample import SampleSet

    organs = sorted({s.meta["organ"] for s in samples})
    mixed = SampleSet("mixed", [replace(s, meta={**s.meta, "species": "mouse" if s.meta["organ"] == organs[0] else "human"})
                                for s in samples])
    fold = Fold("f", tuple(s.sample_id for s in mixed if not s.patient.endswith("P3")),
                tuple(s.sample_id for s in mixed if s.patient.endswith("P3")))
    p = fold_panels(mixed, fold, target="log1p", n_genes=8, min_frac=0.1, rule="hest", scope="per_context",
                    context_key="organ")
    assert all(species_of(g) == "mouse" for g in p.by_context[organs[0]])
    assert all(species_of(g) == "human" for o in organs[1:] for g in p.by_context[o])
    # a symbol chosen in both species stays two genes (one column each), and each species reads its own
    mouse = {symbol_of(g) for g in p.by_context[organs[0]]}
    human = {symbol_of(g) for o in organs[1:] for g in p.by_context[o]}
    assert len(p.genes) == len(mouse) + len(human) and len(set(p.genes)) == len(p.genes)
    m_sample = next(s for s in mixed if s.meta["organ"] == organs[0])
    assert all(species_of(g) == "mouse" for g in p.scored(m_sample.sample_id))


def test_per_context_benchmark_scores_each_context_on_its_panel(tmp_path, monkeypatch):
    import histomoe_core.benchmark as bm

    monkeypatch.setenv("HISTOMOE_HOME", str(tmp_path))
    models = {"ridge_cv": {"kind": "ridge_cv", "centre": False}, "per_context": {"kind": "per_context", "centre": False},
              "moe": {"kind": "histomoe", "n_experts": "contexts", "expert": "linear", "router_input": "meta",
                      "top_k": 1, "guide_weight": 0.1, "shared_expert": True, "init": "ridge", "freeze_init": True,
                      "centre": False}}
    run = bm.run_benchmark("synthetic", dataset_options=SYN, text_encoder="onehot", seeds=(0,), targets=("log1p",),
                           n_genes=8, models=models, panels="per_context", train={"epochs": 4, "patience": 2},
                           progress=False, n_jobs=1)
    pc = run.per_context
    assert pc["context"].nunique() == 3
    # the headline is the macro mean over contexts of the per-context HEST metric
    macro = pc.groupby(["model", "fold"])["pearson"].mean()
    res = run.results.set_index(["model", "fold"])["pearson"]
    assert np.allclose(res.loc[macro.index], macro, atol=1e-9)
    assert (pc["n_genes"] <= 8).all()  # each context scored on its own panel only
    panel = run.panel("log1p", run.config["folds"][0]["name"])
    assert "context" in panel.columns and panel.groupby("context").size().max() == 8
    # routing read back from the stored gates
    from histomoe_core.benchmark.compare import bootstrap_difference, per_context_table
    from histomoe_core.benchmark.routing import dominant_counts, expert_usage, routing_stats, top_spots

    stats = routing_stats(run, "moe", target="log1p")
    assert set(stats.index) == {f["name"] for f in run.config["folds"]} and ((stats["nmi"] >= 0) & (stats["nmi"] <= 1)).all()
    usage = expert_usage(run, "moe", target="log1p")
    assert np.allclose(usage.sum(1), 1.0, atol=1e-5) and len(usage) == 3
    counts = dominant_counts(run, "moe", target="log1p")
    assert counts.to_numpy().sum() == int(run.results.query("model == 'moe'")["n_test_spots"].sum())
    top = top_spots(run, "moe", target="log1p", n=2)
    assert (top.groupby("expert").size() <= 2).all() and top.groupby("expert")["gate"].apply(
        lambda g: g.is_monotonic_decreasing).all()
    with pytest.raises(ValueError, match="no gates"):
        routing_stats(run, "ridge_cv", target="log1p")
    # per-context comparison: one context, its own sections; the table's macro row is the mean of the contexts
    table = per_context_table(run, target="log1p")
    assert np.isclose(table.loc["macro mean", "moe"], table.drop(index=["macro mean", "worst context"])["moe"].mean())
    ctx = pc["context"].iloc[0]
    b = bootstrap_difference(run, "moe", "ridge_cv", target="log1p", context=ctx, n_boot=200)
    assert b["lo"] < b["hi"] and b["n_sections"] == pc[pc["context"] == ctx]["n_sections"].groupby(
        pc["fold"]).first().sum()
