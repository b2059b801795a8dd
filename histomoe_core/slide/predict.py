"""Predict expression for a slide with a model bundle: spots (a tissue grid or given), embeddings, predictions.

:func:`predict_slide` returns an AnnData (``X`` predicted expression, ``var`` the panel, ``obsm["spatial"]``
level-0 slide pixels, ``obs`` x_um / y_um, the HistoMoE slots of :mod:`histomoe_core.tl.slots`, ``uncertainty``
(gate-weighted spread of the experts' predictions) and ``novelty`` (distance to the nearest training embedding))
and the thumbnail it worked on. Embeddings go through the embedding cache: an interrupted run resumes.
"""
from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from histomoe_core.errors import DataError
from histomoe_core.slide.tissue import TissueParams


@dataclass
class SlidePrediction:
    adata: ad.AnnData
    thumbnail: np.ndarray  #: RGB uint8
    downsample: float  #: level-0 px per thumbnail px
    mask: np.ndarray | None = None  #: tissue mask on the thumbnail (grid mode)
    info: dict = field(default_factory=dict)


def read_spots(path: Path) -> pd.DataFrame:
    """Spot centres in level-0 px from a CSV: columns ``x``, ``y`` (optional ``spot`` / ``barcode`` id), or a
    Space Ranger ``tissue_positions(.csv|_list.csv)`` (``pxl_col_in_fullres``, ``pxl_row_in_fullres``, in-tissue
    spots only), or a Space Ranger output folder holding one under ``spatial/``."""
    path = spaceranger_positions(Path(path)) if Path(path).is_dir() else Path(path)
    try:
        df = pd.read_csv(path)
    except (OSError, ValueError, pd.errors.ParserError) as e:
        raise DataError(f"--spots {path}: cannot read it as CSV ({e})") from e
    if "pxl_col_in_fullres" not in df.columns and len(df.columns) == 6 and "x" not in df.columns:
        df = pd.read_csv(path, header=None, names=["barcode", "in_tissue", "array_row", "array_col",
                                                    "pxl_row_in_fullres", "pxl_col_in_fullres"])
    if "pxl_col_in_fullres" in df.columns:
        df = df[df["in_tissue"] == 1] if "in_tissue" in df.columns else df
        df = df.rename(columns={"pxl_col_in_fullres": "x", "pxl_row_in_fullres": "y"})
    if not {"x", "y"} <= set(df.columns):
        raise DataError(f"--spots {path}: needs columns x and y (level-0 pixels) or Space Ranger's "
                        "pxl_col_in_fullres / pxl_row_in_fullres")
    ids = next((df[c].astype(str) for c in ("spot", "barcode", "id") if c in df.columns), None)
    out = pd.DataFrame({"x": df["x"].to_numpy(float), "y": df["y"].to_numpy(float)},
                       index=pd.Index(ids if ids is not None else [f"s{i}" for i in range(len(df))], name="spot"))
    if out.empty or not np.isfinite(out[["x", "y"]].to_numpy()).all():
        raise DataError(f"--spots {path}: no spots, or non-finite coordinates")
    return out


#: Space Ranger's spot positions file (``tissue_positions_list.csv`` before Space Ranger 2.0)
POSITIONS_FILES = ("tissue_positions.csv", "tissue_positions_list.csv")


def spaceranger_positions(folder: Path) -> Path:
    """The tissue positions file of a Space Ranger output folder (``outs/`` or the folder above it)."""
    for sub in ("spatial", "outs/spatial", "."):
        for name in POSITIONS_FILES:
            if (folder / sub / name).is_file():
                return folder / sub / name
    raise DataError(f"--spots {folder}: no spatial/tissue_positions.csv (or tissue_positions_list.csv) in this "
                    "folder; pass a Space Ranger outs/ folder or a CSV of x, y")


def slide_sample(path: Path, spots: pd.DataFrame, um_per_px: float, meta: Mapping[str, str], name: str | None = None):
    """A :class:`~histomoe_core.data.sample.Sample` of the slide's spots (no counts), named ``name`` (default: the
    file name's stem; the name is part of the embedding cache's file name, so a dataset's own name reuses its
    cached embeddings)."""
    from histomoe_core.data.sample import Sample

    adata = ad.AnnData(X=sp.csr_matrix((len(spots), 0), dtype=np.float32), obs=spots.copy())
    adata.obsm["spatial"] = spots[["x", "y"]].to_numpy(float)
    return Sample(sample_id=name or Path(path).name.split(".")[0], patient="unknown", adata=adata, pixel_size_um=um_per_px,
                  image_path=Path(path), meta=dict(meta))


def _metadata(bundle, sample, n: int) -> np.ndarray:
    from histomoe_core.embed import embed_metadata

    md = bundle.manifest["metadata"]
    dim = int(md["meta_dim"])
    if not sample.meta:
        if bundle.reads_metadata():
            texts = sorted(set(md["train_texts"].values()))
            raise DataError(f"this bundle's model reads the slide's metadata; pass --meta key=value ... "
                            f"(training sections read e.g. {texts[0]!r}: --meta organ=... cancer_type=...)")
        return np.zeros((n, dim), np.float32)
    if dim == 0:
        return np.zeros((n, 0), np.float32)
    encoder = md["text_encoder"]
    if encoder == "onehot":  # its vocabulary is the training sections' texts (an unseen text encodes as zeros)
        from histomoe_core.encoders import create_text_encoder

        encoder = create_text_encoder("onehot", vocab=sorted(set(md["train_texts"].values())))
    v = embed_metadata([sample], encoder)[sample.sample_id]
    return np.broadcast_to(v, (n, len(v))).astype(np.float32)


def _context(bundle, meta: Mapping[str, str], n: int) -> np.ndarray:
    key = bundle.manifest["context_key"]
    ctx = bundle.contexts
    name = str(meta.get(key) or "")
    if name in ctx:
        return np.full(n, ctx.index(name), np.int64)
    if bundle.manifest["model"]["kind"] == "per_context":
        raise DataError(f"this bundle has one model per {key} ({', '.join(ctx)}); pass --meta {key}=<one of them>")
    return np.zeros(n, np.int64)


def expert_spread(gates: np.ndarray, experts: np.ndarray) -> np.ndarray:
    """Per spot: sqrt of the gate-weighted mean squared distance of each expert's prediction from the mixture
    (averaged over genes): 0 when the experts agree."""
    g = gates.astype(np.float64)
    e = experts.astype(np.float64)
    mix = np.einsum("ne,neg->ng", g, e)
    return np.sqrt(np.einsum("ne,neg->n", g, (e - mix[:, None, :]) ** 2) / e.shape[2]).astype(np.float32)


def novelty(bundle, x: np.ndarray, *, chunk: int = 2048) -> np.ndarray:
    """Euclidean distance, in training-standardised units, from each embedding to the nearest training one."""
    import torch

    ref = torch.as_tensor((bundle.train_x - bundle.x_mean) / bundle.x_sd, dtype=torch.float32)
    q = torch.as_tensor((x - bundle.x_mean) / bundle.x_sd, dtype=torch.float32)
    out = [torch.cdist(q[s : s + chunk], ref).min(1).values for s in range(0, len(q), chunk)]
    return (torch.cat(out).numpy() / np.sqrt(x.shape[1])).astype(np.float32)


def embed_spots(sample, slide, bundle, *, batch_size: int, device, progress: bool):
    """``(embeddings (n_spots, D), EmbedStats)`` (cached, resumable); JPEG / PNG go through the dataset path (same pixels, same
    cache entries as ``histomoe embed``), tiled slides through :class:`~histomoe_core.slide.patches.SlidePatches`."""
    from histomoe_core.data.patches import PatchSpec
    from histomoe_core.embed import run_embedding
    from histomoe_core.slide.patches import SlidePatches

    reader = None if slide.backend == "pillow" else SlidePatches(slide)
    emb, stats = run_embedding([sample], bundle.encoder, spec=PatchSpec(**bundle.patch), batch_size=batch_size,
                               device=device, progress=progress, reader=reader)
    return emb[sample.sample_id], stats


def place_spots(slide, thumb: np.ndarray, ds: float, crop: int, spots: pd.DataFrame | None,
                tissue: TissueParams) -> tuple[pd.DataFrame, np.ndarray | None]:
    """``(spots, tissue mask)``: a grid over the tissue of the thumbnail when ``spots`` is None (mask None
    otherwise); spots outside the slide are refused."""
    from histomoe_core.slide.tissue import grid_spots, tissue_mask

    mask = None
    if spots is None:
        mask = tissue_mask(thumb, ds * slide.um_per_px, tissue)
        spots = grid_spots(mask, ds, slide.size, crop, min_tissue=tissue.min_tissue) if mask.any() else None
        if spots is None or spots.empty:
            raise DataError(f"no tissue found in {slide.path.name} (Otsu on the thumbnail's saturation); lower "
                            "--min-tissue / --min-saturation, check --um-per-px, or pass --spots FILE")
    w, h = slide.size
    outside = ~((spots["x"] >= 0) & (spots["y"] >= 0) & (spots["x"] < w) & (spots["y"] < h))
    if outside.any():
        raise DataError(f"{int(outside.sum())} spots lie outside the {w}x{h} px slide (e.g. {spots.index[outside][0]}); "
                        "spot coordinates must be level-0 pixels of this slide")
    return spots, mask


def predict_slide(path: Path, bundle, *, spots: pd.DataFrame | None = None, meta: Mapping[str, str] | None = None,
                  um_per_px: float | None = None, tissue: TissueParams = TissueParams(), batch_size: int = 32,
                  device: str | None = None, progress: bool = True, name: str | None = None) -> SlidePrediction:
    """Predict ``bundle``'s genes at ``spots`` (level-0 px; None: a grid at the patch spacing over tissue)."""
    from histomoe_core.benchmark.units import predict_model
    from histomoe_core.data.patches import PatchSpec
    from histomoe_core.features import FoldData
    from histomoe_core.slide.reader import open_slide_image, thumbnail

    meta = dict(meta or {})
    slide = open_slide_image(path, um_per_px=um_per_px)
    try:
        crop = PatchSpec(**bundle.patch).crop_px(slide.um_per_px)
        thumb, ds = thumbnail(slide, max_px=tissue.thumb_px)
        spots, mask = place_spots(slide, thumb, ds, crop, spots, tissue)
        sample = slide_sample(path, spots, slide.um_per_px, meta, name)
        n = len(spots)
        meta_rows = _metadata(bundle, sample, n)  # refuse a missing --meta before the long part
        context = _context(bundle, meta, n)
        x, stats = embed_spots(sample, slide, bundle, batch_size=batch_size, device=device, progress=progress)
        info = _info(slide, sample, bundle, crop, mask is not None, tissue, stats, meta)
    finally:
        slide.close()
    if bundle.manifest["normalisation"]["embedding_norm"] == "section":
        x = x - x.mean(0, keepdims=True)
    data = FoldData(x=x.astype(np.float32), meta=meta_rows, context=context,
                    y=np.zeros((n, len(bundle.genes)), np.float32), sample=np.full(n, sample.sample_id),
                    patient=np.full(n, "unknown"), spot=np.asarray(spots.index, str), genes=tuple(bundle.genes),
                    contexts=tuple(bundle.contexts))
    pred, extra = predict_model(bundle.estimator, data)
    return SlidePrediction(build_adata(spots, pred, extra, x, bundle, info), thumb, ds, mask, info)


def _info(slide, sample, bundle, crop: int, grid: bool, tissue: TissueParams, stats, meta: dict) -> dict:
    """What a prediction was made from (stored as provenance)."""
    from histomoe_core.cache import file_sha256

    return {"name": sample.sample_id, "slide": str(Path(slide.path).resolve()),
            "slide_sha256": file_sha256(Path(slide.path)), "backend": slide.backend, "size_px": list(slide.size),
            "downsamples": list(slide.downsamples), "um_per_px": float(slide.um_per_px), "crop_px": crop,
            "mode": "grid" if grid else "spots", "tissue": tissue.as_dict() if grid else None,
            "embedding": {"n_patches": stats.n_patches, "seconds": stats.seconds, "forward_s": stats.forward_s,
                          "starved_s": stats.starved_s, "from_cache": bool(stats.cached)},
            "meta": meta, "bundle": str(Path(bundle.path).resolve()),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


#: the metadata keys a sample's description for the text encoder is made of (``Sample.metadata_text``)
TEXT_KEYS = ("organ", "cancer_type", "er", "pgr", "grade", "node_status")


def sample_metadata(sample) -> dict[str, str]:
    """The ``--meta`` a dataset sample would be given: its describing metadata (same text for the encoder)."""
    return {k: str(sample.meta[k]) for k in TEXT_KEYS if sample.meta.get(k)}


def predict_sample(sample, bundle, **kwargs) -> SlidePrediction:
    """:func:`predict_slide` on a dataset sample's image at its own spots with its own metadata (same ids, pixels
    and pixel size, so a JPEG / PNG sample reuses the embeddings ``histomoe embed`` cached)."""
    if sample.image_path is None:
        raise DataError(f"{sample.sample_id} has no slide image to predict from")
    spots = pd.DataFrame({"x": sample.coords[:, 0], "y": sample.coords[:, 1]}, index=sample.adata.obs_names.copy())
    kwargs.setdefault("meta", sample_metadata(sample))
    return predict_slide(sample.image_path, bundle, spots=spots, um_per_px=sample.pixel_size_um,
                         name=sample.sample_id, **kwargs)


def build_adata(spots: pd.DataFrame, pred: np.ndarray, extra: dict, x: np.ndarray, bundle, info: dict) -> ad.AnnData:
    """The prediction AnnData (see the module docstring)."""
    from histomoe_core.tl.prediction import model_expert_names
    from histomoe_core.tl.slots import write_results

    um = info["um_per_px"]
    obs = spots.copy()
    obs["x_um"], obs["y_um"] = obs["x"] * um, obs["y"] * um
    obs = obs.drop(columns=["x", "y"])
    adata = ad.AnnData(X=pred.astype(np.float32), obs=obs, var=pd.DataFrame(index=pd.Index(bundle.genes, name="gene")))
    adata.obsm["spatial"] = spots[["x", "y"]].to_numpy(float)
    if extra:
        model = bundle.estimator.model
        write_results(adata, pred, extra["gates"], genes=bundle.genes, expert_preds=extra["expert_preds"],
                      experts=model_expert_names(model), params={"bundle": info["bundle"]})
        adata.obs["uncertainty"] = expert_spread(extra["gates"], extra["expert_preds"])
    else:
        adata.obs["uncertainty"] = np.full(adata.n_obs, np.nan, np.float32)
    adata.obs["novelty"] = novelty(bundle, x)
    man = bundle.manifest
    adata.uns["provenance"] = json.dumps({"prediction": info, "bundle": {k: man[k] for k in (
        "created", "package_version", "encoder", "patch", "target", "model", "provenance")}}, default=str)
    adata.uns["histomoe_bundle"] = {"model": man["model"]["name"], "kind": man["model"]["kind"],
                                    "target": man["target"], "encoder": man["encoder"]["name"]}
    return adata
