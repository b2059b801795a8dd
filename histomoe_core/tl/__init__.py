"""Tools (scanpy-style ``tl``): functions take an AnnData first, keyword-only options, and write results into
named slots (see :mod:`histomoe_core.tl.slots`) or return tables."""
from histomoe_core.tl.build import add_images, spot_adata
from histomoe_core.tl.labels import has_region_labels, read_region_labels, region_labels, true_cell_type
from histomoe_core.tl.run import best_section, fold_adata, fold_of, held_out, load_run, open_run, run_samples
from histomoe_core.tl.predict import predict
from histomoe_core.tl.routing import (
    Agreement,
    agreement,
    dominant_expert,
    expert_contrast,
    expert_genes,
    expert_usage,
    gate_entropy,
    routing_agreement,
    routing_character,
    routing_summary,
    usage_table,
)
from histomoe_core.tl.slots import read_results, slot_names, write_results

__all__ = [
    "spot_adata", "add_images", "predict", "write_results", "read_results", "slot_names",
    "has_region_labels", "read_region_labels", "region_labels", "true_cell_type",
    "load_run", "open_run", "fold_adata", "fold_of", "held_out", "best_section", "run_samples",
    "gate_entropy", "dominant_expert", "usage_table", "agreement", "Agreement", "expert_contrast",
    "expert_usage", "routing_agreement", "expert_genes", "routing_summary", "routing_character",
]
