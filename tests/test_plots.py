"""pl.routing / pl.genes / pl.attributions / pl.interactive on a small synthetic section with planted results."""
from __future__ import annotations

import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from histomoe_core import pl, tl  # noqa: E402
from histomoe_core.data.targets import make_targets  # noqa: E402

GENES = ["SYN001", "SYN002", "SYN003", "SYN004"]


@pytest.fixture(scope="module")
def section():
    from histomoe_core.data import load_dataset

    samples = load_dataset("synthetic", n_organs=2, patients_per_organ=1, spots_per_section=36, n_genes=8, patch_px=16)
    return samples[0]


@pytest.fixture(scope="module")
def results(section):
    """The section's panel genes with planted gates: e0 left half, e1 right half, e2 never dominant."""
    a = section.adata[:, GENES].copy()
    a.obs["spot_id"] = a.obs_names.astype(str)
    y = make_targets(section.adata, GENES, kind="log1p")
    a.layers["target"] = y
    left = section.coords[:, 0] < np.median(section.coords[:, 0])
    gates = np.where(left[:, None], [0.8, 0.1, 0.1], [0.1, 0.8, 0.1])
    experts = np.repeat(y[:, None, :], 3, axis=1)
    experts[:, 1, 2] += 1.0
    pred = np.einsum("ne,neg->ng", gates, experts)
    tl.write_results(a, pred, gates, genes=GENES, expert_preds=experts)
    a.obs["half"] = np.where(left, "left", "right")
    return a


def _titles(fig):
    return [ax.get_title() for ax in fig.axes]


def test_routing_figures(section, results):
    img = pl.thumbnail(section)
    fig = pl.routing.expert_usage(results, groupby="half")
    assert fig.axes[0].get_images()[0].get_array().shape == (2, 3)
    fig = pl.routing.contingency(results, "half")
    assert "NMI 1.00, ARI 1.00" in fig.axes[0].get_title()
    fig = pl.routing.gate_entropy(results, groupby="half")
    assert "median" in fig.axes[0].get_title()
    fig = pl.routing.expert_map(results, section, labels="half", image=img)
    assert [t for t in _titles(fig) if t] == [f"{section.sample_id}: H&E", "dominant expert", "half"]
    legend = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    assert legend == ["e0", "e1"]  # e2 never dominates
    fig = pl.routing.gate_maps(results, section, image=img)
    assert sum(1 for t in _titles(fig) if "gate weight" in t) == 3
    fig = pl.routing.expert_genes(results, n_top=2)
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels[0] == "SYN003"  # the planted difference of expert e1
    plt.close("all")


def test_gene_figures(section, results):
    fig = pl.genes.measured_vs_predicted(results, section, ["SYN001", "SYN003"], image=pl.thumbnail(section))
    titles = [t for t in _titles(fig) if t]
    assert titles[0] == "SYN001: measured" and titles[1].startswith("SYN001: predicted (r = ")
    fig = pl.genes.prediction_scatter(results, ["SYN001", "SYN002"], color_by="half")
    r = np.corrcoef(results.layers["target"][:, 0], results.layers["histomoe"][:, 0])[0, 1]
    assert fig.axes[0].get_title() == f"SYN001: r = {r:.2f}" and r > 0.9
    per_gene = pd.DataFrame([{"model": m, "gene": g, "fold": f, "pearson": v + 0.1 * f}
                             for m, v0 in (("HistoMoE", 0.5), ("ridge", 0.3))
                             for g, v in zip(GENES, [v0, v0 - 0.1, v0 - 0.2, v0 - 0.3])
                             for f in range(2)])
    fig = pl.genes.gene_pearson(per_gene, n_genes=3)
    heights = [p.get_height() for p in fig.axes[0].patches]
    assert heights[:3] == pytest.approx([0.55, 0.45, 0.35])  # HistoMoE bars, mean over folds, best first
    with pytest.raises(KeyError, match="models"):
        pl.genes.gene_pearson(per_gene, models=["nope"])
    plt.close("all")


def test_attribution_overlay():
    from histomoe_core.interpret import Attributions

    rng = np.random.default_rng(0)
    patches = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    res = [Attributions(values=rng.normal(size=(2, 3, 16, 16)), method=m, of="gene", target=0, target_name="G",
                        output=np.ones(2), baseline_output=np.zeros(2), delta=None if m == "occlusion" else np.zeros(2))
           for m in ("ig", "occlusion")]
    fig = pl.attributions.attribution_overlay(patches, res, row_labels=["a", "b"])
    assert len(fig.axes) == 6 + 4 and fig.axes[1].get_title() == "Integrated Gradients\ngene G"  # + a colour bar per overlay
    with pytest.raises(ValueError, match="do not match"):
        pl.attributions.attribution_overlay(patches[:1], res)
    fig = pl.attributions.convergence({4: np.array([1e-2, 2e-2]), 32: np.array([1e-3, 1e-3])})
    assert fig.axes[0].get_xlabel() == "IG steps"
    plt.close("all")


def _has_remote_script(html: str) -> bool:
    return bool(re.search(r"<script[^>]+src=[\"']?https?://", html))


def test_interactive_charts_are_offline(section, results):
    chart = pl.interactive.spot_explorer(results, section, GENES[:2], labels="half")
    spec = chart.to_dict()
    select = next(p for p in spec["params"] if p["name"] == "gene")["bind"]
    assert sorted(select["labels"]) == sorted(GENES[:2]) and len(select["options"]) == 2  # every gene given
    names = {p["name"] for p in spec.get("params", [])} | {
        p["name"] for c in spec["vconcat"][0]["hconcat"] for layer in c.get("layer", [c]) for p in layer.get("params", [])}
    assert {"gene", "show", "hover", "brush"} <= names
    html = pl.interactive.offline_html(chart)
    assert not _has_remote_script(html) and "vega-lite" in html and "data:image/jpeg;base64," in html
    cdn_page = chart.to_html()  # Altair's default page loads vega from a CDN: the guard must catch it
    assert _has_remote_script(cdn_page) and pl.interactive._REMOTE.search(cdn_page)
    routing = pl.interactive.routing_explorer(results, section, labels="half")
    shown = pl.interactive.embed(routing)
    assert '<iframe srcdoc=' in shown.data and not _has_remote_script(shown.data)
    # the frame is sized to the chart (legends, titles and the two widgets included), not a fixed box
    w, h = pl.interactive.frame_size(chart)
    assert f"width:{w}px;height:{h}px" in pl.interactive.embed(chart).data
    import vl_convert

    svg_w, svg_h = map(float, re.search(r'width="([\d.]+)" height="([\d.]+)"',
                                        vl_convert.vegalite_to_svg(chart.to_json())).groups())
    assert w >= svg_w and h >= svg_h + 2 * pl.interactive.BINDING_PX, (w, h, svg_w, svg_h)
    assert pl.interactive.frame_size(routing)[1] < h  # no widgets under the routing explorer
    svg = pl.interactive.embed(chart, mode="svg")
    assert svg.data.lstrip().startswith("<svg")



def test_inspect_command_writes_the_figures(tmp_path):
    """`histomoe inspect RUN` on a small finished synthetic benchmark run."""
    from histomoe_core.benchmark import PROFILES, TRAIN, run_benchmark
    from histomoe_core.cli import main

    models = {"histomoe": PROFILES["synthetic"]["models"]["histomoe"], "ridge_cv": {"kind": "ridge_cv"}}
    run = run_benchmark("synthetic", dataset_options={"n_organs": 2, "patients_per_organ": 2, "spots_per_section": 36,
                                                      "n_genes": 12, "patch_px": 16},
                        k=2, n_genes=6, seeds=(0,), models=models, train={**TRAIN, "epochs": 2}, progress=False)
    out = tmp_path / "insp"
    fold = run.config["folds"][1]
    assert main(["inspect", str(run.path), "--out", str(out), "--genes", "2", "--fold", fold["name"]]) == 0
    index = (out / "index.md").read_text()
    tests = fold["test"]
    for name in [f"{fold['name']}_usage.png", f"{fold['name']}_contingency_organ.png", f"{fold['name']}_gene_pearson.png",
                 f"{tests[0]}_expert_map.png", f"{tests[0]}_gate_maps.png", f"{tests[0]}_genes.png",
                 f"{tests[-1]}_spot_explorer.html", "routing_summary.csv"]:
        assert (out / name).is_file() and name in index, name
    assert not list(out.glob(f"{run.config['folds'][0]['test'][0]}_*"))  # the other fold's sections: not asked for
    html = (out / f"{tests[0]}_routing_explorer.html").read_text()
    assert not _has_remote_script(html)
    summary = pd.read_csv(out / "routing_summary.csv", index_col=0)
    folds = [fold["name"]]
    assert list(summary.index) == folds
    assert (summary["experts"] == run.load_model("histomoe", folds[0]).cfg.n_routed).all()
    assert main(["inspect", str(run.path), "--out", str(out), "--model", "ridge_cv"]) == 2  # no weights: clear error


def test_shown_table_rounds_without_negative_zero_and_names_empty_cells():
    import pandas as pd

    from histomoe_core import pl

    t = pd.DataFrame({"r": [0.12345, -0.0004, float("nan")], "n": [1, 2, 3], "s": ["a", None, "c"]},
                     index=["x", "y", "z"])
    out = pl.tables.shown(t, digits=3, missing="n/a")
    assert out["r"].tolist() == ["0.123", "0.000", "n/a"]  # the same digits in every cell, not "-0.000"
    assert pl.tables.shown(pd.DataFrame({"r": [0.19, 0.3481]}))["r"].tolist() == ["0.190", "0.348"]
    assert out["n"].tolist() == [1, 2, 3] and out["s"].tolist() == ["a", "n/a", "c"]
    assert t["r"].iloc[1] == -0.0004  # the input is left as it was
