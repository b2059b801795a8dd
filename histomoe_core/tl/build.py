"""One spatial AnnData for the spots of several sections, ready for ``tl.predict`` and for scanpy / squidpy."""
from __future__ import annotations

from typing import Mapping, Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from histomoe_core.data.sample import Sample, SampleSet
from histomoe_core.data.targets import make_targets

#: measured spot diameter per technology (µm), for scanpy's spot size
SPOT_DIAMETER_UM = {"ST": 100.0, "Visium": 55.0, "Visium HD": 2.0}
#: obs columns copied from each sample's metadata when present
META_OBS = ("organ", "cancer_type", "oncotree_code")


def spot_adata(
    samples: SampleSet | Sequence[Sample],
    genes: Sequence[str],
    *,
    kind: str = "log1p",
    embeddings: Mapping[str, np.ndarray] | None = None,
    meta_embeddings: Mapping[str, np.ndarray] | None = None,
    images: bool | Sequence[str] = False,
    split: Mapping[str, str] | None = None,
) -> ad.AnnData:
    """Spots of ``samples`` x ``genes``: raw counts in ``X``, the regression target in ``layers["target"]``.

    ``obs`` has ``sample_id``, ``patient``, ``spot_id`` (the sample's spot id; obs names are
    ``<sample>_<spot>``), the organ / cancer type, and ``split`` (e.g. train / test) when given; ``obsm["spatial"]``
    holds pixel coordinates; ``embeddings`` (sample id -> spots x D) go to ``obsm["X_embedding"]`` and
    ``meta_embeddings`` (sample id -> vector) to ``obsm["X_meta"]`` (one row per spot).
    With ``images`` (True, or the sample ids to include) each section's H&E thumbnail is stored in scanpy's
    layout (``uns["spatial"][sample_id]``), so ``sc.pl.spatial(adata[...], library_id=sid)`` draws over it.
    """
    parts = []
    for s in samples:
        a = s.adata[:, list(genes)]
        obs = pd.DataFrame({"sample_id": s.sample_id, "patient": s.patient, "spot_id": s.adata.obs_names.astype(str)},
                           index=[f"{s.sample_id}_{o}" for o in s.adata.obs_names])
        for k in META_OBS:
            if k in s.meta:
                obs[k] = str(s.meta[k])
        if split is not None:
            obs["split"] = split.get(s.sample_id, "unused")
        part = ad.AnnData(X=sp.csr_matrix(a.X), obs=obs, var=pd.DataFrame(index=list(genes)))
        part.layers["target"] = make_targets(s.adata, list(genes), kind=kind)
        part.obsm["spatial"] = s.coords
        if embeddings is not None:
            if s.sample_id not in embeddings:
                raise KeyError(f"no embeddings for sample {s.sample_id}; embed it with histomoe_core.embed.embed_samples")
            part.obsm["X_embedding"] = np.asarray(embeddings[s.sample_id], dtype=np.float32)
        if meta_embeddings is not None:
            m = np.asarray(meta_embeddings[s.sample_id], dtype=np.float32).ravel()
            part.obsm["X_meta"] = np.tile(m, (part.n_obs, 1))
        parts.append(part)
    adata = ad.concat(parts, merge="same")
    for col in ("sample_id", "patient", *(c for c in ("split", *META_OBS) if c in adata.obs)):
        adata.obs[col] = pd.Categorical(adata.obs[col].astype(str))
    adata.uns["target_kind"] = kind
    if images:
        wanted = [s.sample_id for s in samples] if images is True else list(images)
        add_images(adata, [s for s in samples if s.sample_id in wanted])
    return adata


def add_images(adata: ad.AnnData, samples: Sequence[Sample]) -> None:
    """Store each sample's H&E thumbnail and scale factors in ``uns["spatial"]`` (scanpy / squidpy layout)."""
    from histomoe_core.pl.spatial import thumbnail

    spatial = adata.uns.setdefault("spatial", {})
    for s in samples:
        img, f = thumbnail(s)
        diameter_um = s.meta.get("spot_diameter_um") or SPOT_DIAMETER_UM.get(str(s.meta.get("technology")), 100.0)
        spatial[s.sample_id] = {
            "images": {"hires": img},
            "scalefactors": {"tissue_hires_scalef": float(f), "spot_diameter_fullres": float(diameter_um / s.pixel_size_um)},
            "metadata": {"pixel_size_um": float(s.pixel_size_um)},
        }
