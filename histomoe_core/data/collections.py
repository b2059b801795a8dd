"""Collections: benchmark datasets built from several datasets, every section labelled with its biological context.

A collection is data (:data:`COLLECTIONS`): for each member dataset, the context label of its sections, either
one label for the whole dataset or a label per value of one metadata field. The context of a spot is its
tissue and species; it is what experts are meant to specialise in and what the per-context metrics group by.

Loaded collections keep each section as its dataset gives it, and add

- ``meta["context"]``: the context label (e.g. ``"human breast cancer"``);
- ``meta["collection"]``: the collection's name;
- a patient id unique across datasets (``"<dataset>:<patient>"``): her2st's patient "A" and another dataset's
  "A" are different people.

Genes stay as each dataset names them, tagged with their species (``var["species"]``); human and mouse symbols
are never matched (:func:`histomoe_core.data.genes.gene_key`).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Mapping

from histomoe_core.data.sample import Sample, SampleSet
from histomoe_core.data.sources import SOURCES, load_dataset
from histomoe_core.errors import DataError

#: collection -> dataset -> a context label, or (metadata field, {value: context label})
COLLECTIONS: dict[str, dict[str, str | tuple[str, Mapping[str, str]]]] = {
    "tissues": {
        "her2st": "human breast cancer",
        "ffpe_analysis": ("group", {"lung_SARS-CoV-2": "human COVID-19 lung", "kidneyorganoid": "human kidney organoid",
                                    "lungorganoid": "human lung organoid", "mousebrain": "mouse brain"}),
        "spacest": "mouse olfactory bulb",
        "murine_colon_explorer": "mouse colon",
    },
}


def context_of(sample: Sample, rule: str | tuple[str, Mapping[str, str]]) -> str:
    """The context label a collection's rule gives one section."""
    if isinstance(rule, str):
        return rule
    key, labels = rule
    value = sample.meta.get(key)
    if value not in labels:
        raise DataError(f"{sample.sample_id}: no context for {key}={value!r}; the collection knows {sorted(labels)}")
    return labels[value]


def load_collection(name: str, *, species: str | None = None, datasets: Mapping[str, dict] | None = None) -> SampleSet:
    """Every section of the collection ``name`` (only those of ``species`` when given), contexts set.

    ``datasets`` passes loader options per member dataset (e.g. ``{"murine_colon_explorer": {"zoom": 3}}``).
    """
    if name not in COLLECTIONS:
        raise DataError(f"unknown collection {name!r}; collections: {', '.join(COLLECTIONS)}")
    out: list[Sample] = []
    for dataset, rule in COLLECTIONS[name].items():
        for s in load_dataset(dataset, **dict((datasets or {}).get(dataset, {}))):
            if species is not None and s.species != species:
                continue
            meta = {**s.meta, "context": context_of(s, rule), "collection": name, "dataset": dataset}
            out.append(replace(s, patient=f"{dataset}:{s.patient}", meta=meta, adata=s.adata.copy()))
    if not out:
        raise DataError(f"collection {name!r} has no {species} sections; species present: human, mouse")
    return SampleSet(name if species is None else f"{name}_{species}", out)


@SOURCES.register("tissues")
def load_tissues(**kwargs) -> SampleSet:
    """Every tissue context on the mirrors: her2st, ffpe_analysis, spacest, murine_colon_explorer."""
    return load_collection("tissues", **kwargs)


@SOURCES.register("tissues_human")
def load_tissues_human(**kwargs) -> SampleSet:
    """The human contexts of ``tissues``."""
    return load_collection("tissues", species="human", **kwargs)


@SOURCES.register("tissues_mouse")
def load_tissues_mouse(**kwargs) -> SampleSet:
    """The mouse contexts of ``tissues``."""
    return load_collection("tissues", species="mouse", **kwargs)
