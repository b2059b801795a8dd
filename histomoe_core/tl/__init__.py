"""Tools (scanpy-style ``tl``): functions take an AnnData first, keyword-only options, and write results into
named slots (see :mod:`histomoe_core.tl.slots`) or return tables.

The functions live in small submodules and load on first use (``tl.load_run`` imports :mod:`.run` only), so code
that uses a few tools depends on those alone.
"""
from __future__ import annotations

import importlib
from typing import Any

#: public name -> submodule that defines it
EXPORTS: dict[str, str] = {
    **dict.fromkeys(["spot_adata", "add_images"], "build"),
    **dict.fromkeys(["has_region_labels", "read_region_labels", "region_labels", "true_cell_type"], "labels"),
    **dict.fromkeys(["best_section", "fold_adata", "fold_of", "held_out", "load_run", "open_run", "run_samples"], "run"),
    "predict": "prediction",
    **dict.fromkeys(["ig_convergence", "ig_trend"], "attribution"),
    **dict.fromkeys(["Agreement", "agreement", "dominant_expert", "expert_contrast", "expert_genes", "expert_usage",
                     "gate_entropy", "routing_agreement", "routing_character", "routing_summary", "usage_table"],
                    "routing"),
    **dict.fromkeys(["read_results", "slot_names", "write_results"], "slots"),
}
SUBMODULES = ("attribution", "build", "labels", "run", "prediction", "routing", "slots")

__all__ = sorted(EXPORTS)


def __getattr__(name: str) -> Any:
    if name in EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{EXPORTS[name]}"), name)
    if name in SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*EXPORTS, *SUBMODULES})
