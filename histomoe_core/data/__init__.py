"""Data layer: manifests and fetching, source adapters, patches, targets, gene panels and splits."""
from histomoe_core.data.sample import Sample, SampleSet
from histomoe_core.data.sources import SOURCES, load_dataset
from histomoe_core.data import her2st  # noqa: F401  (registers the adapter)
from histomoe_core.data import hest, synthetic  # noqa: F401  (register the HEST-1k and synthetic adapters)
from histomoe_core.data import ffpe, spacest, murine_colon  # noqa: F401  (register the issue-10 adapters)
from histomoe_core.data import collections  # noqa: F401  (registers the multi-dataset collections)

__all__ = ["Sample", "SampleSet", "SOURCES", "load_dataset"]
