"""Spatial context as a feature stage: what lies around a spot, added to its image embedding.

Three optional kinds, each computed per section from images only (never from expression), for every spot of
the section at once, so a spot's context is the same whatever fold, subset or batch it is used in:

- ``"neighbours"``: the mean (or Gaussian distance-weighted mean) of the spot embeddings of the spatial
  neighbours within rings of ``radius_um`` (one radius: one disc; a list: ring outer edges), the spot itself
  excluded; neighbours come from a :class:`scipy.spatial.cKDTree` on the section's own spot centres in um, so
  they never cross sections. A ring without neighbours takes the spot's own embedding.
- ``"wide"``: the same encoder on a larger patch (``size_um``, default 336 um) around the spot, embedded and
  cached as the spot patches are (:func:`~histomoe_core.embed.embed_samples` with another
  :class:`~histomoe_core.data.patches.PatchSpec`; crops leaving the image are padded the same way).
- ``"section"``: the mean spot embedding of the section. TRANSDUCTIVE in the same sense as
  ``embedding_norm="section"``: a test section's summary reads all of its images before predicting it.

Each kind says where it goes (``use``): ``"features"`` (concatenated to the image features every model reads),
``"router"`` (:attr:`~histomoe_core.features.SpotTable.spatial`, read only by a HistoMoE router with
``router_input="spatial"`` or ``"image+spatial"``) or ``"both"``. A spec looks like::

    {"neighbours": {"radius_um": [250, 450], "weight": "mean", "use": "features"},
     "wide": {"size_um": 336, "use": "router"},
     "section": {"use": "features"}}
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from scipy import sparse
from scipy.spatial import cKDTree

from histomoe_core.errors import HistoMoEError

KINDS = ("neighbours", "wide", "section")
USES = ("features", "router", "both")
WEIGHTS = ("mean", "gaussian")
#: relative tolerance on ring edges: a neighbour at exactly the grid pitch stays inside a ring of that radius
EDGE_TOL = 1e-6
#: default field of view of the "wide" kind (3 x the 112 um spot patch)
WIDE_UM = 336.0

Embed = Callable[[Any], Mapping[str, np.ndarray]]


def check_spec(spec: Mapping[str, Mapping[str, Any]]) -> dict[str, dict]:
    """The spec with defaults filled in; unknown kinds, uses, weights or options are refused."""
    known = {"neighbours": {"radius_um", "weight", "sigma_um", "use"}, "wide": {"size_um", "out_px", "use"},
             "section": {"use"}}
    out: dict[str, dict] = {}
    for kind, opts in dict(spec or {}).items():
        if kind not in KINDS:
            raise HistoMoEError(f"unknown spatial context kind {kind!r}; kinds: {', '.join(KINDS)}")
        opts = dict(opts or {})
        extra = set(opts) - known[kind]
        if extra:
            raise HistoMoEError(f"spatial context {kind!r}: unknown options {sorted(extra)}; known: {sorted(known[kind])}")
        opts.setdefault("use", "features")
        if opts["use"] not in USES:
            raise HistoMoEError(f"spatial context {kind!r}: use must be one of {USES}, got {opts['use']!r}")
        if kind == "neighbours":
            opts["radius_um"] = ring_edges(opts.get("radius_um", 250.0))
            opts.setdefault("weight", "mean")
            if opts["weight"] not in WEIGHTS:
                raise HistoMoEError(f"spatial context 'neighbours': weight must be one of {WEIGHTS}")
        if kind == "wide":
            opts.setdefault("size_um", WIDE_UM)
        out[kind] = opts
    return out


def ring_edges(radius_um: float | Sequence[float]) -> list[float]:
    """Outer edges (um) of the rings, increasing and positive."""
    edges = [float(radius_um)] if np.isscalar(radius_um) else [float(r) for r in radius_um]
    if not edges or edges[0] <= 0 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise HistoMoEError(f"neighbour radius_um must be positive and increasing, got {radius_um!r}")
    return edges


# ------------------------------------------------------------------------------------------------ neighbours
def neighbour_rings(xy_um: np.ndarray, radius_um: float | Sequence[float], *, weight: str = "mean",
                    sigma_um: float | None = None) -> list[sparse.csr_matrix]:
    """One row-normalised (n, n) weight matrix per ring over the spots at ``xy_um`` (one section).

    Ring k holds the spots j != i with ``edges[k-1] < d(i, j) <= edges[k]`` (``edges[-1] = 0``); weights are
    equal (``"mean"``) or ``exp(-d^2 / 2 sigma^2)`` (``"gaussian"``, sigma default half the outer edge). A row
    with no neighbours in a ring is all zero.
    """
    edges = np.asarray(ring_edges(radius_um)) * (1 + EDGE_TOL)
    xy = np.asarray(xy_um, dtype=np.float64)
    n = len(xy)
    pairs = cKDTree(xy).query_pairs(float(edges[-1]), output_type="ndarray")
    i = np.concatenate([pairs[:, 0], pairs[:, 1]]) if len(pairs) else np.zeros(0, int)
    j = np.concatenate([pairs[:, 1], pairs[:, 0]]) if len(pairs) else np.zeros(0, int)
    d = np.linalg.norm(xy[i] - xy[j], axis=1)
    ring = np.searchsorted(edges, d, side="left")
    sigma = float(sigma_um or edges[-1] / 2)
    w = np.ones_like(d) if weight == "mean" else np.exp(-(d ** 2) / (2 * sigma ** 2))
    out = []
    for k in range(len(edges)):
        m = ring == k
        mat = sparse.csr_matrix((w[m], (i[m], j[m])), shape=(n, n))
        tot = np.asarray(mat.sum(1)).ravel()
        out.append(sparse.diags(np.where(tot > 0, 1.0 / np.where(tot > 0, tot, 1.0), 0.0)) @ mat)
    return out


def aggregate(x: np.ndarray, rings: Sequence[sparse.csr_matrix]) -> np.ndarray:
    """``(n, len(rings) * D)``: per ring the weighted mean of the neighbours' rows of ``x`` (own row if none)."""
    x64 = np.asarray(x, dtype=np.float64)
    blocks = []
    for w in rings:
        agg = np.asarray(w @ x64)
        empty = np.asarray(w.sum(1)).ravel() == 0
        agg[empty] = x64[empty]
        blocks.append(agg)
    return np.concatenate(blocks, axis=1).astype(np.float32)


def section_coords_um(sample) -> np.ndarray:
    """Spot centres of a section in um (pixel coordinates times the pixel size)."""
    return sample.coords * float(sample.pixel_size_um)


# ------------------------------------------------------------------------------------------------ the stage
def context_blocks(table, samples, spec: Mapping[str, Mapping[str, Any]], *, embed: Embed | None = None
                   ) -> dict[str, np.ndarray]:
    """Kind -> (N, D_kind) float32 rows aligned with ``table`` (a :class:`~histomoe_core.features.SpotTable`),
    each computed section by section. ``embed(PatchSpec)`` gives ``{sample_id: embeddings}`` for the "wide"
    kind (the benchmark passes :func:`~histomoe_core.embed.embed_samples` with its encoder)."""
    spec = check_spec(spec)
    out = {k: None for k in spec}
    wide = None
    if "wide" in spec:
        if embed is None:
            raise HistoMoEError("spatial context 'wide' needs an embed function (PatchSpec -> embeddings)")
        wide = embed(wide_patch(spec["wide"]))
    for sid in dict.fromkeys(table.sample.tolist()):
        rows = np.flatnonzero(table.sample == sid)
        x = table.x[rows]
        parts = {}
        if "neighbours" in spec:
            o = spec["neighbours"]
            parts["neighbours"] = aggregate(x, neighbour_rings(section_coords_um(samples[sid]), o["radius_um"],
                                                               weight=o["weight"], sigma_um=o.get("sigma_um")))
        if wide is not None:
            parts["wide"] = np.asarray(wide[sid], dtype=np.float32)
        if "section" in spec:
            parts["section"] = np.broadcast_to(x.astype(np.float64).mean(0).astype(np.float32), x.shape)
        for k, v in parts.items():
            if len(v) != len(rows):
                raise HistoMoEError(f"{sid}: {k} context has {len(v)} rows for {len(rows)} spots")
            if out[k] is None:
                out[k] = np.zeros((len(table.x), v.shape[1]), np.float32)
            out[k][rows] = v
    return out


def wide_patch(opts: Mapping[str, Any]):
    """The :class:`~histomoe_core.data.patches.PatchSpec` of the "wide" kind (padded at image borders)."""
    from histomoe_core.data.patches import PatchSpec

    return PatchSpec(size_um=float(opts.get("size_um", WIDE_UM)), out_px=int(opts.get("out_px", 224)))


def apply_context(table, samples, spec: Mapping[str, Mapping[str, Any]] | None, *, embed: Embed | None = None):
    """``table`` with the context kinds of ``spec`` appended: to ``x`` (use "features"/"both", in the order of
    :data:`KINDS`) and to ``spatial`` (use "router"/"both"). An empty spec returns ``table`` unchanged."""
    spec = check_spec(spec or {})
    if not spec:
        return table
    blocks = context_blocks(table, samples, spec, embed=embed)
    feats = [blocks[k] for k in KINDS if k in spec and spec[k]["use"] in ("features", "both")]
    route = [blocks[k] for k in KINDS if k in spec and spec[k]["use"] in ("router", "both")]
    x = np.concatenate([table.x, *feats], axis=1) if feats else table.x
    spatial = np.concatenate(route, axis=1) if route else None
    return replace(table, x=np.ascontiguousarray(x, dtype=np.float32), spatial=spatial)
