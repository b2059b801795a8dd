"""Data layer: manifests and fetching, source adapters, patches, targets, gene panels and splits."""
from histomoe_core.data.sample import Sample, SampleSet
from histomoe_core.data.sources import SOURCES, load_dataset
from histomoe_core.data import her2st  # noqa: F401  (registers the adapter)

__all__ = ["Sample", "SampleSet", "SOURCES", "load_dataset"]
