"""Plotting (scanpy-style ``pl``): functions take data first, keyword-only options, and return figures."""
from histomoe_core.pl.spatial import spatial_scatter, thumbnail

__all__ = ["spatial_scatter", "thumbnail"]
