"""Tables describing a dataset: sections, patients, spots, genes, pixel size, image size, counts."""
from __future__ import annotations

import pandas as pd

from histomoe_core.data.patches import image_size
from histomoe_core.data.sample import SampleSet, total_counts


def summary_table(samples: SampleSet) -> pd.DataFrame:
    rows = []
    for s in samples:
        w, h = image_size(s.image_path) if s.image_path is not None else (None, None)
        rows.append({
            "section": s.sample_id, "patient": s.patient, "spots": s.n_spots, "genes": s.adata.n_vars,
            "um_per_px": round(s.pixel_size_um, 3), "image_w": w, "image_h": h,
            "median_counts": int(pd.Series(total_counts(s.adata)).median()),
        })
    return pd.DataFrame(rows).set_index("section")
