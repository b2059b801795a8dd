"""Gene panels chosen on training samples only, or a fixed published list (e.g. HEST's var_50genes.json)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from histomoe_core.data.sample import Sample
from histomoe_core.data.targets import dense, make_targets


def common_genes(samples: Sequence[Sample]) -> list[str]:
    """Genes measured in every sample, in the first sample's order."""
    shared = set(samples[0].adata.var_names)
    for s in samples[1:]:
        shared &= set(s.adata.var_names)
    return [g for g in samples[0].adata.var_names if g in shared]


def expressed_fraction(samples: Sequence[Sample], genes: Sequence[str]) -> pd.DataFrame:
    """Fraction of spots with a non-zero count, genes x samples."""
    cols = {s.sample_id: (dense(s.adata[:, list(genes)].X) > 0).mean(axis=0) for s in samples}
    return pd.DataFrame(cols, index=list(genes))


def select_panel(
    train: Sequence[Sample], *, n_genes: int = 50, min_frac: float = 0.1, kind: str = "log1p"
) -> pd.DataFrame:
    """Top-``n_genes`` most variable genes among those expressed in >= ``min_frac`` of spots of every
    training sample. Variance is of the targets (``kind``) over the pooled training spots.

    Returns a table (index gene) with ``variance``, ``min_expressed_frac`` and ``rank``; the panel is its index.
    """
    if not train:
        raise ValueError("select_panel needs at least one training sample")
    genes = common_genes(train)
    frac = expressed_fraction(train, genes).min(axis=1)
    eligible = frac.index[frac >= min_frac].tolist()
    if len(eligible) < n_genes:
        raise ValueError(f"only {len(eligible)} genes are expressed in >= {min_frac:.0%} of spots of every training sample")
    y = np.concatenate([make_targets(s.adata, eligible, kind=kind) for s in train])
    var = pd.Series(y.var(axis=0), index=eligible).sort_values(ascending=False, kind="stable")
    top = var.index[:n_genes]
    return pd.DataFrame({"variance": var[top], "min_expressed_frac": frac[top], "rank": np.arange(1, n_genes + 1)})


def read_gene_list(path: Path) -> list[str]:
    """A fixed gene list: JSON ``{"genes": [...]}`` (HEST's format), a JSON list, or one gene per line."""
    text = Path(path).read_text()
    if path.suffix == ".json":
        data = json.loads(text)
        return list(data["genes"] if isinstance(data, dict) else data)
    return [line.strip() for line in text.splitlines() if line.strip()]
