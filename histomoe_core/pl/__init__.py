"""Plotting (scanpy-style ``pl``): functions take data first, keyword-only options, and return figures."""
from histomoe_core.pl.spatial import spatial_scatter, thumbnail
from histomoe_core.pl import data  # noqa: F401  (dataset figures: pl.data.sections, pl.data.spot_qc_distributions, ...)
from histomoe_core.pl import routing, genes, attributions, interactive  # noqa: F401  (pl.routing.expert_map, pl.genes.measured_vs_predicted, ...)
from histomoe_core.pl import embeddings  # noqa: F401  (pl.embeddings.umap, pl.embeddings.encoder_comparison, ...)

__all__ = ["spatial_scatter", "thumbnail"]
