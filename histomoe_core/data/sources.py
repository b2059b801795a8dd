"""Registry of data sources: each turns a dataset into a :class:`~histomoe_core.data.sample.SampleSet`."""
from __future__ import annotations

from histomoe_core.data.sample import SampleSet
from histomoe_core.registry import Registry

SOURCES: Registry[SampleSet] = Registry("data source")


def load_dataset(name: str, **kwargs) -> SampleSet:
    """Load a dataset by name (``her2st``, ``hest``, ``synthetic``); keyword options go to its adapter."""
    import histomoe_core.data  # noqa: F401  (registers every adapter)

    return SOURCES.create(name, **kwargs)
