"""Interactive Altair charts of HistoMoE results that work offline (in the built book and in Jupyter).

Altair's default HTML loads vega from a CDN and stays blank offline; :func:`embed` instead inlines the vega
libraries into the chart's HTML (``chart.to_html(inline=True)``, via vl-convert) inside an
``<iframe srcdoc=...>``, or renders a static SVG. :func:`offline_html` refuses HTML that loads remote scripts.
"""
from __future__ import annotations

import base64
import html as html_lib
import io
import json
import re
import warnings
from typing import Literal, Sequence

import altair as alt
import anndata as ad
import numpy as np
import pandas as pd
from PIL import Image

from histomoe_core.data.sample import Sample
from histomoe_core.pl.spatial import thumbnail
from histomoe_core.tl.slots import section_index, slot_names

#: longest side (px) of the H&E crop drawn under the spots
IMAGE_PX = 640
_REMOTE = re.compile(r"<(?:script|link|img|iframe)\b[^>]*\b(?:src|href)\s*=\s*[\"']?\s*(?:https?:)?//", re.I)


def offline_html(chart: alt.TopLevelMixin) -> str:
    """The chart as a standalone HTML page with vega inlined; raises if anything would load from the network."""
    text = chart.to_html(inline=True)
    bad = _REMOTE.search(text)
    if bad:
        raise RuntimeError(f"chart HTML loads a remote resource ({bad.group(0)[:80]}...); it would be blank offline")
    return text


def _chart_height(chart: alt.TopLevelMixin) -> int:
    """Rough pixel height of a chart (for the iframe), from the heights in its spec."""
    spec = chart.to_dict()

    def h(s: dict) -> int:
        if "vconcat" in s:
            return sum(h(c) for c in s["vconcat"]) + 20 * len(s["vconcat"])
        for k in ("hconcat", "layer"):
            if k in s:
                return max(h(c) for c in s[k])
        v = s.get("height", 300)
        return v if isinstance(v, (int, float)) else 300

    return int(h(spec)) + 100  # titles, axis labels, legends and bound widgets


#: px that vega-embed's page adds around the chart: body margins, the "..." actions button on the right
FRAME_PAD_W, FRAME_PAD_H = 60, 24
#: px per widget (drop-down, radio buttons) that vega-embed puts under the chart
BINDING_PX = 34


def _bindings(spec: dict) -> int:
    """Widgets bound to parameters anywhere in the spec (a legend binding adds none)."""
    found = 0
    for p in spec.get("params", []):
        found += isinstance(p.get("bind"), dict)
    for k in ("vconcat", "hconcat", "layer", "concat"):
        found += sum(_bindings(c) for c in spec.get(k, []))
    return found


def frame_size(chart: alt.TopLevelMixin) -> tuple[int, int] | None:
    """Pixel size of the frame that shows ``chart`` whole: the chart as vega renders it (legends and titles
    included, measured on a static SVG rendering) plus its widgets and vega-embed's margins; None when it
    cannot be rendered here."""
    try:
        import vl_convert as vlc

        svg = vlc.vegalite_to_svg(chart.to_json())
    except Exception:  # noqa: BLE001 (sizing is best effort; the caller falls back to an estimate)
        return None
    m = re.search(r'<svg[^>]*\bwidth="([\d.]+)"[^>]*\bheight="([\d.]+)"', svg)
    if not m:
        return None
    w, h = float(m.group(1)), float(m.group(2))
    return int(w) + FRAME_PAD_W, int(h) + FRAME_PAD_H + BINDING_PX * _bindings(chart.to_dict())


def embed(chart: alt.TopLevelMixin, *, mode: Literal["html", "svg"] = "html", height: int | None = None):
    """Display object for a notebook: ``html`` keeps the chart interactive (iframe with vega inlined, sized to
    the chart by :func:`frame_size`; a chart wider than the page's column scrolls sideways), ``svg`` is a static
    rendering (no interaction, smallest output)."""
    from IPython.display import HTML

    if mode == "svg":
        import vl_convert as vlc

        return HTML(vlc.vegalite_to_svg(chart.to_json()))
    if mode != "html":
        raise ValueError(f"mode must be 'html' or 'svg', got {mode!r}")
    page = offline_html(chart)
    size = frame_size(chart)
    width = f"{size[0]}px" if size else "100%"
    px = height or (size[1] if size else _chart_height(chart))
    with warnings.catch_warnings():  # IPython suggests IFrame, which needs a file or URL; srcdoc keeps it inline
        warnings.simplefilter("ignore", UserWarning)
        return HTML(f'<div class="histomoe-chart" style="overflow-x:auto;max-width:100%">'
                    f'<iframe srcdoc="{html_lib.escape(page, quote=True)}" '
                    f'style="width:{width};height:{px}px;border:none;display:block" sandbox="allow-scripts"></iframe></div>')


# --- data for the charts -----------------------------------------------------------------------------------


def _image_layer(sample: Sample, xy: np.ndarray, image: tuple[np.ndarray, float] | None, margin_px: float):
    """A cropped H&E thumbnail as a data URI, the spot coordinates in its pixels, and its size."""
    img, f = image if image is not None else thumbnail(sample)
    p = xy * f
    m = margin_px * f
    x0, y0 = max(int(p[:, 0].min() - m), 0), max(int(p[:, 1].min() - m), 0)
    x1, y1 = min(int(p[:, 0].max() + m), img.shape[1]), min(int(p[:, 1].max() + m), img.shape[0])
    crop = Image.fromarray(img[y0:y1, x0:x1])
    scale = min(1.0, IMAGE_PX / max(crop.size))
    crop = crop.resize((max(1, int(crop.size[0] * scale)), max(1, int(crop.size[1] * scale))))
    buf = io.BytesIO()
    crop.save(buf, format="JPEG", quality=80)
    uri = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    coords = (p - [x0, y0]) * scale
    return uri, coords, crop.size


def _spot_frame(adata: ad.AnnData, sample: Sample, key: str, labels: str | None, image, margin_um: float = 150.0):
    rows = section_index(adata, sample)
    uri, xy, (w, h) = _image_layer(sample, sample.coords, image, margin_um / sample.pixel_size_um)
    names = slot_names(key)
    experts = [str(e) for e in adata.uns[key]["experts"]]
    gates = np.asarray(adata.obsm[names["gates"]])[rows]
    df = pd.DataFrame({"spot": sample.adata.obs_names.astype(str), "x": xy[:, 0], "y": xy[:, 1],
                       "expert": adata.obs[names["expert"]].astype(str).to_numpy()[rows],
                       "entropy": adata.obs[names["entropy"]].to_numpy(float)[rows]})
    for i, e in enumerate(experts):
        df[f"gate {e}"] = gates[:, i].astype(float)
    if labels:
        df[labels] = adata.obs[labels].astype(object).to_numpy()[rows]
        df[labels] = df[labels].where(df[labels].notna(), "unlabelled").astype(str)
    return df, experts, uri, (w, h)


def _map_base(uri: str, size: tuple[int, int], width: int) -> tuple[alt.Chart, alt.Scale, alt.Scale, int]:
    w, h = size
    height = int(width * h / w)
    xs = alt.Scale(domain=[0, w], nice=False, zero=False)
    ys = alt.Scale(domain=[0, h], nice=False, zero=False, reverse=True)
    img = alt.Chart(pd.DataFrame({"url": [uri], "x": [0], "y": [0], "x2": [w], "y2": [h]})).mark_image(aspect=False).encode(
        x=alt.X("x:Q", scale=xs, axis=None), y=alt.Y("y:Q", scale=ys, axis=None), x2="x2:Q", y2="y2:Q", url="url:N")
    return img, xs, ys, height


def _gate_tooltips(experts: Sequence[str]) -> list[alt.Tooltip]:
    return [alt.Tooltip(f"gate {e}:Q", format=".2f") for e in experts]


def spot_explorer(adata: ad.AnnData, sample: Sample, genes: Sequence[str], *, key: str = "histomoe",
                  measured: str = "target", labels: str | None = None, image: tuple[np.ndarray, float] | None = None,
                  width: int = 250) -> alt.VConcatChart:
    """Spots over the H&E coloured by a gene chosen in a drop-down (every gene of ``genes``, listed
    alphabetically, the first one shown; measured or predicted, radio buttons);
    hover a spot for its gene values, dominant expert and gate weights; drag on the scatter of predicted vs
    measured to highlight those spots on the map; the bars show the hovered spot's gate weights."""
    df, experts, uri, size = _spot_frame(adata, sample, key, labels, image)
    rows = section_index(adata, sample)
    missing = [g for g in genes if g not in adata.var_names]
    if missing:
        raise KeyError(f"genes {missing} are not in adata.var_names")
    genes = list(genes)
    # one row per spot, gene i's values in columns m<i> / p<i> (one column per gene keeps a 50-gene panel small)
    cols = adata.var_names.get_indexer(genes)
    meas = np.asarray(adata.layers[measured][rows][:, cols], float)
    pred = np.asarray(adata.layers[key][rows][:, cols], float)
    data = pd.concat([df, pd.DataFrame(np.round(meas, 4), columns=[f"m{i}" for i in range(len(genes))]),
                      pd.DataFrame(np.round(pred, 4), columns=[f"p{i}" for i in range(len(genes))])], axis=1)
    order = sorted(range(len(genes)), key=lambda i: genes[i].lower())
    gene = alt.param(name="gene", value=0, bind=alt.binding_select(options=order, labels=[genes[i] for i in order],
                                                                   name="gene "))
    show = alt.param(name="show", value="predicted",
                     bind=alt.binding_radio(options=["predicted", "measured"], name="colour by "))
    hover = alt.selection_point(name="hover", fields=["spot"], on="pointerover", empty=False, clear="pointerout")
    brush = alt.selection_interval(name="brush", encodings=["x", "y"])
    img, xs, ys, height = _map_base(uri, size, width)
    tips = ["spot:N", *([f"{labels}:N"] if labels else []), alt.Tooltip("gene_name:N", title="gene"),
            alt.Tooltip("measured:Q", format=".2f"),
            alt.Tooltip("predicted:Q", format=".2f"), alt.Tooltip("expert:N", title="dominant expert"),
            *_gate_tooltips(experts)]
    base = alt.Chart(data).transform_calculate(
        measured="datum['m' + gene]", predicted="datum['p' + gene]", gene_name=f"{json.dumps(genes)}[gene]"
    ).transform_calculate(value="show == 'measured' ? datum.measured : datum.predicted")
    spots = base.mark_circle(size=60, stroke="black").encode(
        x=alt.X("x:Q", scale=xs, axis=None), y=alt.Y("y:Q", scale=ys, axis=None),
        color=alt.Color("value:Q", scale=alt.Scale(scheme="viridis"), title="expression"),
        opacity=alt.condition(brush, alt.value(0.9), alt.value(0.15)),
        strokeWidth=alt.condition(hover, alt.value(2), alt.value(0)), tooltip=tips,
    ).add_params(hover)
    spatial = alt.layer(img, spots).properties(width=width, height=height,
                                               title=f"{sample.sample_id}: choose a gene; hover a spot")
    scatter = base.mark_circle(size=25).encode(
        x=alt.X("measured:Q", title=f"measured ({measured})", scale=alt.Scale(zero=False)),
        y=alt.Y("predicted:Q", scale=alt.Scale(zero=False)),
        color=alt.condition(brush, alt.Color("expert:N", title="dominant expert", scale=_expert_scale(experts),
                                             legend=alt.Legend(orient="bottom", direction="horizontal")),
                            alt.value("lightgrey")),
        tooltip=tips,
    ).add_params(brush).properties(width=175, height=220, title="drag to select spots")
    bars = _gate_bars(df, experts, hover)
    return alt.vconcat(alt.hconcat(spatial, scatter), bars).add_params(gene, show).resolve_scale(color="independent")


def _expert_scale(experts: Sequence[str]) -> alt.Scale:
    from matplotlib.colors import to_hex

    from histomoe_core.pl.routing import expert_palette

    pal = expert_palette(experts)
    return alt.Scale(domain=list(experts), range=[to_hex(pal[e]) for e in experts])


def _gate_bars(df: pd.DataFrame, experts: Sequence[str], hover) -> alt.Chart:
    cols = [f"gate {e}" for e in experts]
    base = alt.Chart(df[["spot", *cols]]).transform_fold(cols, as_=["gate", "weight"]).transform_filter(hover)
    return base.transform_calculate(expert="replace(datum.gate, 'gate ', '')").mark_bar().encode(
        x=alt.X("weight:Q", scale=alt.Scale(domain=[0, 1]), title="gate weight of the hovered spot"),
        y=alt.Y("expert:N", scale=alt.Scale(domain=list(experts)), title=None),
        color=alt.Color("expert:N", scale=_expert_scale(experts), legend=None),
        tooltip=["spot:N", "expert:N", alt.Tooltip("weight:Q", format=".3f")],
    ).properties(width=180, height=18 * len(experts), title="gate weights (hover a spot)")


def routing_explorer(adata: ad.AnnData, sample: Sample, *, key: str = "histomoe", labels: str | None = None,
                     image: tuple[np.ndarray, float] | None = None, width: int = 260) -> alt.HConcatChart:
    """Spots over the H&E coloured by their dominant expert; click an expert in the legend to show only its
    spots; hover a spot for its gate weights (and label); the bars show the hovered spot's gate weights and,
    with ``labels``, the mean gate weight per label."""
    df, experts, uri, size = _spot_frame(adata, sample, key, labels, image)
    img, xs, ys, height = _map_base(uri, size, width)
    pick = alt.selection_point(name="pick", fields=["expert"], bind="legend")
    hover = alt.selection_point(name="hover", fields=["spot"], on="pointerover", empty=False, clear="pointerout")
    tips = ["spot:N", *([f"{labels}:N"] if labels else []), alt.Tooltip("expert:N", title="dominant expert"),
            alt.Tooltip("entropy:Q", format=".2f", title="gate entropy"), *_gate_tooltips(experts)]
    spots = alt.Chart(df).mark_circle(size=60, stroke="black").encode(
        x=alt.X("x:Q", scale=xs, axis=None), y=alt.Y("y:Q", scale=ys, axis=None),
        color=alt.Color("expert:N", scale=_expert_scale(experts), title="dominant expert",
                        legend=alt.Legend(orient="bottom", direction="horizontal")),
        opacity=alt.condition(pick, alt.value(0.9), alt.value(0.08)),
        strokeWidth=alt.condition(hover, alt.value(2), alt.value(0)), tooltip=tips,
    ).add_params(pick, hover)
    spatial = alt.layer(img, spots).properties(width=width, height=height,
                                               title=f"{sample.sample_id}: dominant expert (click the legend)")
    right = [_gate_bars(df, experts, hover)]
    if labels:
        cols = [f"gate {e}" for e in experts]
        right.append(alt.Chart(df).transform_fold(cols, as_=["gate", "weight"]).transform_calculate(
            expert="replace(datum.gate, 'gate ', '')").mark_rect().encode(
            x=alt.X("expert:N", sort=list(experts)), y=alt.Y(f"{labels}:N", title=labels),
            color=alt.Color("mean(weight):Q", scale=alt.Scale(scheme="viridis", domain=[0, 1]), title="mean gate"),
            tooltip=[f"{labels}:N", "expert:N", alt.Tooltip("mean(weight):Q", format=".2f", title="mean gate"),
                     alt.Tooltip("count():Q", title="spots")],
        ).properties(width=150, title=f"mean gate weight per {labels}"))
    return alt.hconcat(spatial, alt.vconcat(*right).resolve_scale(color="independent")).resolve_scale(color="independent")
