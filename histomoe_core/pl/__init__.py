"""Plotting (scanpy-style ``pl``): functions take data first, keyword-only options, and return figures.

Submodules load on first use (``pl.data.sections``, ``pl.datasets.section_grid``, ``pl.routing.expert_map``, ``pl.genes``, ``pl.attributions``,
``pl.interactive``, ``pl.embeddings``, ``pl.spatial_context``, ``pl.tables``), so code that draws one kind of figure
imports only what it draws.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from histomoe_core.pl.spatial import spatial_scatter, thumbnail

#: figure modules, imported on first attribute access
SUBMODULES = ("spatial", "data", "datasets", "routing", "contexts", "genes", "attributions", "interactive",
              "embeddings", "spatial_context", "tables")

__all__ = ["spatial_scatter", "thumbnail", *SUBMODULES]


def __getattr__(name: str) -> ModuleType:
    if name in SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
