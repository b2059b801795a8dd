"""Gene panels chosen on training samples only, or a fixed published list (e.g. HEST's var_50genes.json).

Panel rules (:data:`PANEL_RULES`), both run on the training sections of a fold only, both after dropping genes
not measured in every training section, genes detected in fewer than ``min_frac`` of the spots of any training
section, and Xenium control probes (:func:`is_control_probe`):

- ``"hest"`` (default): HEST-Bench's rule (``utils.get_k_genes``, criteria ``var``): the raw counts of the training
  sections stacked, log1p, then ``scanpy.pp.highly_variable_genes(flavor="seurat")``: dispersion normalised
  within bins of mean expression, so a gene is chosen for varying more than genes of its expression level.
- ``"variance"``: the genes whose targets vary most over the pooled training spots. Mostly the highest-expressed
  genes, whose spot-to-spot variation largely follows the spot's total counts (:func:`panel_stats`).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from histomoe_core.data.sample import Sample
from histomoe_core.data.targets import dense, make_targets
from histomoe_core.errors import DataError


PANEL_RULES = ("hest", "variance")
#: Xenium / panel control probes: never genes (HEST drops names containing "BLANK" or "Control")
_CONTROL = re.compile(r"BLANK|Control|^UnassignedCodeword|^DeprecatedCodeword|^Intergenic_Region|^antisense_")


def is_control_probe(name: str) -> bool:
    """True for control probes and codewords (``BLANK_0001``, ``NegControlProbe_*``, ``UnassignedCodeword_*``, ...)."""
    return bool(_CONTROL.search(str(name)))


def gene_key(species: str | None, symbol: str) -> str:
    """A gene's name in a collection that mixes species: ``"mouse:Actb"`` (bare symbol when species is None)."""
    return f"{species}:{symbol}" if species else str(symbol)


def symbol_of(key: str) -> str:
    """The symbol of a gene key (:func:`gene_key`)."""
    return str(key).split(":", 1)[1] if ":" in str(key) else str(key)


def species_of(key: str) -> str | None:
    """The species of a gene key, None for a bare symbol."""
    return str(key).split(":", 1)[0] if ":" in str(key) else None


def common_genes(samples: Sequence[Sample]) -> list[str]:
    """Genes measured in every sample, in the first sample's order."""
    shared = set(samples[0].adata.var_names)
    for s in samples[1:]:
        shared &= set(s.adata.var_names)
    return [g for g in samples[0].adata.var_names if g in shared]


def expressed_fraction(samples: Sequence[Sample], genes: Sequence[str]) -> pd.DataFrame:
    """Fraction of spots with a non-zero count, genes x samples."""
    return pd.DataFrame({s.sample_id: _detected(s.adata[:, list(genes)].X) for s in samples}, index=list(genes))


def _detected(x) -> np.ndarray:
    """Per column, the fraction of rows with a count above 0 (counted on the stored entries of a sparse matrix)."""
    import scipy.sparse as sp

    if sp.issparse(x):
        return np.asarray((x > 0).sum(axis=0), dtype=np.float64).ravel() / x.shape[0]
    return (np.asarray(x) > 0).mean(axis=0)


def select_panel(
    train: Sequence[Sample], *, n_genes: int = 50, min_frac: float = 0.1, rule: str = "hest", kind: str = "log1p"
) -> pd.DataFrame:
    """The ``n_genes`` panel of ``rule`` (see the module docstring) chosen on the ``train`` samples.

    ``kind`` is the target kind whose variance the ``"variance"`` rule ranks by (the ``"hest"`` rule always uses
    log1p of raw counts). Returns a table (index gene) with ``score`` (normalised dispersion or variance),
    ``min_expressed_frac``, ``rank`` and ``rule``; the panel is its index, in rank order.
    """
    if rule not in PANEL_RULES:
        raise ValueError(f"unknown panel rule {rule!r}; use one of {PANEL_RULES}")
    if not train:
        raise ValueError("select_panel needs at least one training sample")
    genes = [g for g in common_genes(train) if not is_control_probe(g)]
    frac = expressed_fraction(train, genes).min(axis=1)
    eligible = frac.index[frac >= min_frac].tolist()
    if len(eligible) < n_genes:
        raise DataError(f"only {len(eligible)} genes are expressed in >= {min_frac:.0%} of spots of every "
                        f"training sample; ask for at most that many (--n-genes {len(eligible)} or fewer)")
    score = _hest_dispersion(train, eligible) if rule == "hest" else _target_variance(train, eligible, kind)
    top = score.sort_values(ascending=False, kind="stable").index[:n_genes]
    return pd.DataFrame({"score": score[top], "min_expressed_frac": frac[top], "rank": np.arange(1, n_genes + 1),
                         "rule": rule})


def _target_variance(train: Sequence[Sample], genes: list[str], kind: str) -> pd.Series:
    y = np.concatenate([make_targets(s.adata, genes, kind=kind) for s in train])
    return pd.Series(y.var(axis=0), index=genes)


def _hest_dispersion(train: Sequence[Sample], genes: list[str]) -> pd.Series:
    """scanpy's 'seurat' normalised dispersion of log1p raw counts over the stacked training spots."""
    import anndata as ad
    import scanpy as sc

    x = np.concatenate([dense(s.adata[:, genes].X) for s in train])
    pooled = ad.AnnData(np.log1p(x).astype(np.float32), var=pd.DataFrame(index=genes))
    hv = sc.pp.highly_variable_genes(pooled, flavor="seurat", inplace=False)
    disp = pd.Series(np.asarray(hv["dispersions_norm"], dtype=np.float64), index=genes)
    return disp.fillna(-np.inf)  # genes alone in their mean bin have no normalised dispersion


def panel_stats(samples: Sequence[Sample], genes: Sequence[str]) -> pd.DataFrame:
    """Per gene over the pooled spots of ``samples``: detection rate, mean log1p count, and the Pearson r of the
    gene's log1p counts with the spot's log1p total counts (``depth_r``: how much of the gene is spot depth)."""
    from histomoe_core.evaluate import pearson_columns

    genes = list(genes)
    y = np.concatenate([make_targets(s.adata, genes, kind="log1p") for s in samples]).astype(np.float64)
    depth = np.concatenate([np.log1p(np.asarray(s.adata.X.sum(axis=1), dtype=np.float64).ravel()) for s in samples])
    r = pearson_columns(y, np.repeat(depth[:, None], len(genes), axis=1))
    return pd.DataFrame({"detected": (y > 0).mean(0), "mean_log1p": y.mean(0), "depth_r": r},
                        index=pd.Index(genes, name="gene"))


def read_gene_list(path: Path) -> list[str]:
    """A fixed gene list: JSON ``{"genes": [...]}`` (HEST's format), a JSON list, or one gene per line."""
    text = Path(path).read_text()
    if path.suffix == ".json":
        data = json.loads(text)
        return list(data["genes"] if isinstance(data, dict) else data)
    return [line.strip() for line in text.splitlines() if line.strip()]
