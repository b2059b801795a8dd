"""Gene panels of one fold: one pooled panel, or one panel per context and the model predicting their union.

``panels="pooled"`` (single-tissue datasets): one panel chosen on all training sections; every spot is scored on
every gene. ``panels="per_context"`` (collections of tissues): each context's panel is chosen on that context's
training sections only; the models predict the union of the panels, and a spot is trained and scored only on
its own context's panel (:attr:`~histomoe_core.features.FoldData.mask`). A context with no training section
(leave-context-out) is scored on the union genes its sections measure. In a collection of several species,
genes are keyed ``"<species>:<symbol>"`` (:func:`~histomoe_core.data.genes.gene_key`), so a human and a mouse gene
are never the same column.

A fixed panel is a gene list (``fixed=[...]``: one panel for every spot, as given) or a mapping context -> gene
list (``fixed={"IDC": [...], "LUNG": [...]}``, e.g. HEST's shipped ``var_50genes.json`` of each task): one panel
per context as with ``"per_context"``, control probes dropped from every list.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from histomoe_core.errors import HistoMoEError

PANEL_SCOPES = ("pooled", "per_context")


@dataclass
class FoldPanels:
    """The genes of one fold: the union (model outputs) and, per context, its panel (None: pooled)."""

    genes: list[str]
    table: pd.DataFrame  #: index gene; columns rank, score, rule (+ context for per-context panels)
    by_context: dict[str, list[str]] | None = None
    _section: dict[str, list[str]] = field(default_factory=dict, repr=False)

    def scored(self, sample_id: str) -> list[str]:
        """Genes trained and scored in a section (all genes for a pooled panel)."""
        return self._section.get(sample_id, self.genes)

    def key(self) -> list:
        """What a fit depends on: the union and which genes each section is scored on. A list either way: the unit
        and selection keys take ``list(key)``, which of a dict would keep only its two field names."""
        return self.genes if self.by_context is None else [*self.genes, {"sections": self._section}]


def context_label(sample, key: str) -> str:
    return str(sample.meta.get(key) or "unknown")


def fold_panels(samples, fold, *, target: str, n_genes: int, min_frac: float, rule: str, scope: str = "pooled",
                context_key: str = "organ", fixed: Sequence[str] | Mapping[str, Sequence[str]] | None = None
                ) -> FoldPanels:
    """The :class:`FoldPanels` of ``fold`` (chosen on its training sections only; ``fixed``: see the module
    docstring, a mapping gives per-context fixed panels whatever ``scope``)."""
    from histomoe_core.data.genes import select_panel

    if isinstance(fixed, Mapping):
        return _fixed_per_context(samples, fixed, context_key)
    if fixed is not None:
        genes = list(fixed)
        return FoldPanels(genes, pd.DataFrame({"rank": np.arange(1, len(genes) + 1)}, index=pd.Index(genes, name="gene")))
    train = [samples[i] for i in fold.train]
    if scope == "pooled":
        panel = select_panel(train, n_genes=n_genes, min_frac=min_frac, rule=rule, kind=target)
        return FoldPanels(panel.index.tolist(), panel)
    if scope != "per_context":
        raise HistoMoEError(f"unknown panel scope {scope!r}; use one of {PANEL_SCOPES}")
    return _per_context(samples, fold, train, target=target, n_genes=n_genes, min_frac=min_frac, rule=rule,
                        context_key=context_key)


def _per_context(samples, fold, train, *, target, n_genes, min_frac, rule, context_key) -> FoldPanels:
    from histomoe_core.data.genes import gene_key, select_panel, symbol_of

    prefix = len({s.species for s in samples}) > 1
    contexts = list(dict.fromkeys(context_label(s, context_key) for s in train))
    tables, by_context = [], {}
    for ctx in contexts:
        part = [s for s in train if context_label(s, context_key) == ctx]
        try:
            panel = select_panel(part, n_genes=n_genes, min_frac=min_frac, rule=rule, kind=target)
        except ValueError as e:
            raise HistoMoEError(f"fold {fold.name}, context {ctx!r}: {e}") from e
        species = part[0].species if prefix else None
        keys = [gene_key(species, g) for g in panel.index]
        by_context[ctx] = keys
        tables.append(panel.set_axis(pd.Index(keys, name="gene")).assign(context=ctx))
    genes = list(dict.fromkeys(g for keys in by_context.values() for g in keys))
    sections = {}
    for s in samples:
        ctx = context_label(s, context_key)
        if ctx in by_context:
            sections[s.sample_id] = by_context[ctx]
        else:  # a context never seen in training: the union genes this section measures, in its species
            own = set(map(str, s.adata.var_names))
            sections[s.sample_id] = [g for g in genes if symbol_of(g) in own
                                     and (not prefix or g.startswith(f"{s.species}:"))]
    return FoldPanels(genes, pd.concat(tables), by_context, sections)


def _fixed_per_context(samples, fixed: Mapping[str, Sequence[str]], context_key: str) -> FoldPanels:
    """Per-context panels given as lists (control probes dropped); every section must measure its context's list."""
    from histomoe_core.data.genes import gene_key, is_control_probe

    prefix = len({s.species for s in samples}) > 1
    by_context: dict[str, list[str]] = {}
    sections: dict[str, list[str]] = {}
    for s in samples:
        ctx = context_label(s, context_key)
        if ctx not in fixed:
            raise HistoMoEError(f"no fixed gene list for context {ctx!r} (section {s.sample_id}); lists are given "
                                f"for {sorted(fixed)}")
        genes = [str(g) for g in fixed[ctx] if not is_control_probe(g)]
        lacking = sorted(set(genes) - set(map(str, s.adata.var_names)))
        if lacking:
            raise HistoMoEError(f"section {s.sample_id} ({ctx}) does not measure {lacking[:5]} of its fixed gene list "
                                f"({len(lacking)} genes); use a computed panel (drop --gene-list) or fix the list")
        keys = [gene_key(s.species if prefix else None, g) for g in genes]
        by_context.setdefault(ctx, keys)
        sections[s.sample_id] = by_context[ctx]
    union = list(dict.fromkeys(g for keys in by_context.values() for g in keys))
    table = pd.concat([pd.DataFrame({"rank": np.arange(1, len(k) + 1), "rule": "fixed", "context": c},
                                    index=pd.Index(k, name="gene")) for c, k in by_context.items()])
    return FoldPanels(union, table, by_context, sections)
