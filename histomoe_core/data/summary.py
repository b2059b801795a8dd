"""Tables describing a dataset: sections, patients, spots, genes, pixel size, patch size, image size, counts."""
from __future__ import annotations

import warnings
from typing import Mapping

import pandas as pd

from histomoe_core.data.patches import PatchSpec, image_size
from histomoe_core.data.sample import Sample, SampleSet, total_counts

#: a patch spanning fewer source pixels than this is mostly interpolation once resized for the encoder
LOW_SOURCE_PX = 32


def patch_source_px(sample: Sample, spec: PatchSpec = PatchSpec()) -> int:
    """Source-image pixels across one patch of ``spec.size_um`` (warns when fewer than :data:`LOW_SOURCE_PX`)."""
    px = spec.crop_px(sample.pixel_size_um)
    if px < LOW_SOURCE_PX:
        warnings.warn(
            f"{sample.sample_id}: a {spec.size_um:g} µm patch spans only {px} source pixels "
            f"({sample.pixel_size_um:.2f} µm/px), upsampled to {spec.out_px}; use a higher-resolution image if one exists",
            stacklevel=2,
        )
    return px


def summary_table(samples: SampleSet, spec: PatchSpec = PatchSpec()) -> pd.DataFrame:
    """One row per section; ``patch_px`` is the source pixels across a ``spec.size_um`` patch (warns when few)."""
    rows = []
    for s in samples:
        w, h = image_size(s.image_path) if s.image_path is not None else (None, None)
        rows.append({
            "section": s.sample_id, "patient": s.patient, "species": s.meta.get("species"),
            "tissue": s.meta.get("tissue") or s.meta.get("organ"), "spots": s.n_spots, "genes": s.adata.n_vars,
            "um_per_px": round(s.pixel_size_um, 3), "patch_px": spec.crop_px(s.pixel_size_um), "image_w": w, "image_h": h,
            "median_counts": int(pd.Series(total_counts(s.adata)).median()),
        })
    low = [r["section"] for r in rows if r["patch_px"] < LOW_SOURCE_PX]
    if low:
        warnings.warn(
            f"{len(low)} sections have {spec.size_um:g} µm patches under {LOW_SOURCE_PX} source pixels "
            f"({', '.join(low)}): they are upsampled to {spec.out_px} px", stacklevel=2,
        )
    return pd.DataFrame(rows).set_index("section")


def context_of(sample: Sample) -> str:
    """A short name of the sample's tissue context, e.g. ``"human Breast: HER2+ invasive ductal carcinoma"``."""
    m = sample.meta
    detail = m.get("tissue") or m.get("cancer_type") or m.get("disease_state")
    state = m.get("disease_state")
    if m.get("tissue") and state and str(state).lower() not in ("healthy", "cancer"):
        detail = f"{detail} ({state})"
    head = " ".join(str(v) for v in (m.get("species"), m.get("organ")) if v)
    return f"{head}: {detail}" if detail else head or "unknown"


def overview_table(datasets: Mapping[str, SampleSet], spec: PatchSpec = PatchSpec(), *,
                   patch_qc: pd.DataFrame | None = None) -> pd.DataFrame:
    """:func:`summary_table` of several datasets stacked, with ``dataset`` and ``context`` columns (no warning
    about low-resolution patches: the ``patch_px`` column shows them). With ``patch_qc`` (a table with ``section``
    and ``is_background`` per spot, e.g. ``pl.data.patch_qc_table``), a ``background`` column counts the
    patches flagged as mostly background."""
    parts = []
    for name, samples in datasets.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = summary_table(samples, spec)
        t = t.drop(columns="tissue")
        t.insert(0, "context", [context_of(s) for s in samples])
        t.insert(0, "dataset", name)
        parts.append(t)
    out = pd.concat(parts)
    if patch_qc is not None:
        flagged = patch_qc.groupby("section", observed=True)["is_background"].sum()
        out.insert(out.columns.get_loc("patch_px") + 1, "background", flagged.reindex(out.index).fillna(0).astype(int))
    return out
