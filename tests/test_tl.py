"""tl: AnnData slots written by predict, routing statistics with known answers, her2st region labels."""
from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from histomoe_core import tl
from histomoe_core.moe import HistoMoE, MoEConfig


# --------------------------------------------------------------------------- routing statistics, known answers


def test_gate_entropy_known_values():
    gates = np.array([[0.25, 0.25, 0.25, 0.25], [1, 0, 0, 0], [0.5, 0.5, 0, 0]])
    np.testing.assert_allclose(tl.gate_entropy(gates), [1.0, 0.0, 0.5], atol=1e-12)
    np.testing.assert_allclose(tl.gate_entropy(gates, normalize=False), [np.log(4), 0.0, np.log(2)], atol=1e-12)
    with pytest.raises(ValueError, match="sum"):
        tl.gate_entropy(np.array([[0.5, 0.2]]))


def test_usage_table_mean_and_dominant():
    gates = np.array([[0.9, 0.1], [0.7, 0.3], [0.2, 0.8], [0.4, 0.6]])
    groups = ["a", "a", "b", "b"]
    mean = tl.usage_table(gates, groups)
    np.testing.assert_allclose(mean.loc["a"].to_numpy(), [0.8, 0.2])
    np.testing.assert_allclose(mean.loc["b"].to_numpy(), [0.3, 0.7])
    dom = tl.usage_table(gates, groups, kind="dominant", experts=["x", "y"])
    assert list(dom.columns) == ["x", "y"]
    np.testing.assert_allclose(dom.to_numpy(), [[1, 0], [0, 1]])
    np.testing.assert_allclose(mean.sum(axis=1), 1.0)


def test_agreement_perfect_independent_and_table():
    labels = np.array(["tumour", "stroma", "fat"] * 10)
    experts = pd.Series(labels).map({"tumour": "e2", "stroma": "e0", "fat": "e1"}).to_numpy()  # a relabelling
    a = tl.agreement(experts, labels)
    assert a.nmi == pytest.approx(1.0) and a.ari == pytest.approx(1.0)
    assert a.table.loc["tumour", "e2"] == 10 and a.table.to_numpy().sum() == 30
    assert (a.table.to_numpy() > 0).sum() == 3
    # balanced and independent: every (label, expert) pair occurs equally often
    lab = np.repeat(["a", "b"], 4)
    exp = np.tile(["e0", "e1"], 4)
    b = tl.agreement(exp, lab)
    assert b.nmi == pytest.approx(0.0, abs=1e-12)
    assert b.ari <= 0.0
    np.testing.assert_array_equal(b.table.to_numpy(), [[2, 2], [2, 2]])


def test_expert_contrast_finds_the_planted_gene():
    rng = np.random.default_rng(0)
    n, e, g = 200, 3, 5
    base = rng.normal(size=(n, 1, g))
    preds = np.repeat(base, e, axis=1)
    preds[:, 1, 3] += 2.0  # expert 1 predicts gene 3 two units higher than the others
    table = tl.expert_contrast(preds, standardize=False, genes=list("ABCDE"))
    assert table.loc["D", "e1"] == pytest.approx(2.0)
    assert table.loc["D", "e0"] == pytest.approx(-1.0)  # others' mean includes expert 1
    assert np.abs(table.drop(index="D").to_numpy()).max() < 1e-12
    # gate weighting: an expert never used contributes a row of zeros of weight, still finite
    gates = np.tile([0.5, 0.5, 0.0], (n, 1))
    assert np.isfinite(tl.expert_contrast(preds, gates).to_numpy()).all()


# --------------------------------------------------------------------------- slots written by predict


def _router_model(n_genes: int = 3) -> HistoMoE:
    """Two linear experts; the router sends x0 > 0 to e0 and x0 < 0 to e1 (hard, by large logits)."""
    cfg = MoEConfig(in_dim=2, n_genes=n_genes, n_experts=2, expert="linear", dropout=0.0)
    m = HistoMoE(cfg).eval()
    with torch.no_grad():
        m.router.net.weight.copy_(torch.tensor([[50.0, 0.0], [-50.0, 0.0]]))
        m.router.net.bias.zero_()
        m.experts.weight.zero_()
        m.experts.bias.copy_(torch.tensor([[1.0] * n_genes, [-1.0] * n_genes]))
    return m


def _adata(n: int = 40, genes=("G0", "G1", "G2", "G3")) -> ad.AnnData:
    rng = np.random.default_rng(1)
    a = ad.AnnData(rng.poisson(3, (n, len(genes))).astype(np.float32))
    a.var_names = list(genes)
    a.obs_names = [f"s{i}" for i in range(n)]
    x0 = np.where(np.arange(n) % 2 == 0, 1.0, -1.0)
    a.obsm["X_embedding"] = np.stack([x0, rng.normal(size=n)], 1).astype(np.float32)
    a.obsm["spatial"] = rng.uniform(0, 100, (n, 2))
    a.obs["side"] = np.where(x0 > 0, "right", "left")
    return a


def test_predict_writes_named_slots_and_roundtrips(tmp_path):
    a = _adata()
    m = _router_model()
    panel = ["G2", "G0", "G3"]
    tl.predict(a, m, genes=panel)
    assert a.layers["histomoe"].shape == a.shape
    assert np.isnan(a.layers["histomoe"][:, 1]).all()  # G1 is outside the panel
    assert a.var["histomoe_panel"].tolist() == [True, False, True, True]
    assert a.obsm["histomoe_gates"].shape == (a.n_obs, 2)
    assert a.obsm["histomoe_experts"].shape == (a.n_obs, 2, 3)
    assert a.uns["histomoe"]["genes"] == panel and a.uns["histomoe"]["experts"] == ["e0", "e1"]
    assert a.uns["histomoe"]["params"]["model_config"]["n_experts"] == 2
    # the stored predictions equal the model's own output, column by gene name
    with torch.no_grad():
        direct = m(torch.as_tensor(a.obsm["X_embedding"])).pred.numpy()
    np.testing.assert_allclose(a[:, "G3"].layers["histomoe"].ravel(), direct[:, 2], rtol=1e-6)
    # known routing: even spots (x0 > 0) -> e0 predicts +1, odd -> e1 predicts -1
    assert a.obs["histomoe_expert"].astype(str).tolist() == ["e0", "e1"] * (a.n_obs // 2)
    np.testing.assert_allclose(a.obs["histomoe_gate_entropy"], 0.0, atol=1e-6)
    np.testing.assert_allclose(a[:, "G0"].layers["histomoe"].ravel(), np.tile([1.0, -1.0], a.n_obs // 2), atol=1e-5)
    # routing statistics through the AnnData tools
    agr = tl.routing_agreement(a, "side")
    assert agr.nmi == pytest.approx(1.0) and agr.ari == pytest.approx(1.0)
    usage = tl.expert_usage(a, groupby="side", kind="dominant")
    np.testing.assert_allclose(usage.loc[["right", "left"]].to_numpy(), [[1, 0], [0, 1]])
    # h5ad round trip keeps every slot; scanpy reads the layer like any other
    path = tmp_path / "pred.h5ad"
    a.write_h5ad(path)
    b = ad.read_h5ad(path)
    res = tl.read_results(b)
    assert res["genes"] == panel and res["expert_preds"].shape == (a.n_obs, 2, 3)
    np.testing.assert_allclose(res["pred"], direct, rtol=1e-6)
    import scanpy as sc

    df = sc.get.obs_df(b, keys=["G2", "histomoe_expert"], layer="histomoe")
    np.testing.assert_allclose(df["G2"].to_numpy(), direct[:, 0], rtol=1e-6)


def test_routing_summary_known_values():
    a = _adata()
    tl.predict(a, _router_model(), genes=["G0", "G1", "G2"])
    summary = tl.routing_summary(a, ["side", "missing_column"])
    assert summary["experts"] == 2 and summary["routing"] == "sharp"
    assert summary["median_entropy"] == pytest.approx(0.0, abs=1e-6)
    assert summary["median_top_gate"] == pytest.approx(1.0)
    assert summary["least_used"] == pytest.approx(0.5) and summary["most_used"] == pytest.approx(0.5)
    assert summary["nmi_side"] == pytest.approx(1.0) and "nmi_missing_column" not in summary
    assert [tl.routing_character(h) for h in (1.0, 0.9, 0.5, 0.1)] == ["near-uniform", "near-uniform", "soft", "sharp"]


def test_predict_copy_and_errors():
    a = _adata()
    m = _router_model()
    out = tl.predict(a, m, genes=["G0", "G1", "G2"], copy=True, key_added="moe", store_experts=False)
    assert "moe" not in a.layers and "moe" in out.layers and "moe_experts" not in out.obsm
    with pytest.raises(KeyError, match="X_other"):
        tl.predict(a, m, genes=["G0", "G1", "G2"], use_rep="X_other")
    with pytest.raises(ValueError, match="predicts 3"):
        tl.predict(a, m, genes=["G0", "G1"])
    with pytest.raises(KeyError, match="not in adata.var_names"):
        tl.predict(a, m, genes=["G0", "G1", "NOPE"])
    with pytest.raises(KeyError, match="tl.predict"):
        tl.routing_agreement(_adata(), "side")


def test_section_index_matches_spot_ids():
    from histomoe_core.tl.slots import section_index

    class S:  # the two attributes section_index reads
        sample_id = "B"
        adata = ad.AnnData(np.zeros((3, 1), np.float32), obs=pd.DataFrame(index=["x2", "x0", "x1"]))

    obs = pd.DataFrame({"sample_id": ["A", "A", "B", "B", "B"], "spot_id": ["x0", "x1", "x0", "x1", "x2"]},
                       index=[f"r{i}" for i in range(5)])
    a = ad.AnnData(np.zeros((5, 1), np.float32), obs=obs)
    np.testing.assert_array_equal(section_index(a, S), [4, 2, 3])


# --------------------------------------------------------------------------- her2st pathologist labels


def test_region_labels_of_a1(her2st):
    labels = tl.read_region_labels(her2st["A1"])
    assert labels.index.equals(her2st["A1"].adata.obs_names)
    counts = labels.value_counts()
    # counts of the 346 A1 spots with expression, from the label file joined on the array grid
    assert counts["invasive cancer"] == 282 and counts["cancer in situ"] == 21
    assert counts["connective tissue"] == 24 and counts["adipose tissue"] == 12
    assert labels.notna().all()
    with pytest.raises(Exception, match="no pathologist labels"):
        tl.read_region_labels(her2st["B4"])


def test_spot_adata_and_labels_over_sections(her2st):
    sub = her2st.subset(["A1", "B4"])
    a = tl.spot_adata(sub, ["ERBB2", "KRT19"], kind="log1p", images=["A1"], split={"A1": "test"})
    assert a.n_obs == her2st["A1"].n_spots + her2st["B4"].n_spots and list(a.var_names) == ["ERBB2", "KRT19"]
    assert a.obs_names[0] == f"A1_{her2st['A1'].adata.obs_names[0]}"
    assert a.obs["split"].astype(str).tolist().count("unused") == her2st["B4"].n_spots
    np.testing.assert_allclose(a.layers["target"][: her2st["A1"].n_spots, 0],
                               np.log1p(her2st["A1"].adata[:, "ERBB2"].X.toarray().ravel()), rtol=1e-6)
    lib = a.uns["spatial"]["A1"]
    assert lib["images"]["hires"].ndim == 3 and 0 < lib["scalefactors"]["tissue_hires_scalef"] <= 1
    assert "B4" not in a.uns["spatial"]
    region = tl.region_labels(a, sub)
    assert region.notna().sum() == her2st["A1"].n_spots and pd.isna(region.iloc[-1])
    assert (region[a.obs["sample_id"] == "A1"].value_counts()["cancer in situ"]) == 21


def test_ig_convergence_wording_follows_the_measured_trend():
    import pandas as pd
    from torch import nn

    from histomoe_core import tl

    conv = pd.DataFrame({"m": [0.2, 0.05], "smooth": [0.2, 0.01], "flat": [0.1, 0.12]}, index=[8, 128])
    enc = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    kw = dict(retrieval_share=0.3, encoder=enc, min_gap_share=0.02)
    assert tl.ig_trend(conv["m"]) == "shrinks" and tl.ig_trend(conv["m"][::-1]) == "grows"
    assert tl.ig_trend(conv["flat"]) == "stays within a factor of two"
    assert "numerical integral" in tl.ig_convergence(conv, model="m", smooth_model=None, has_retrieval=True, **kw)[1]
    trend, why = tl.ig_convergence(conv, model="flat", smooth_model="smooth", has_retrieval=True, **kw)
    assert trend == "stays within a factor of two" and "retrieval experts' jumps (up to 30%" in why
    _, why = tl.ig_convergence(conv, model="flat", smooth_model="flat", has_retrieval=True, **kw)
    assert "does not converge either" in why and "ReLU" in why and "2.0%" in why
