"""Registry of data sources: each turns a dataset into a :class:`~histomoe_core.data.sample.SampleSet`."""
from __future__ import annotations

from histomoe_core.data.sample import SampleSet
from histomoe_core.registry import Registry

SOURCES: Registry[SampleSet] = Registry("data source")
#: other names of a source (its manifest name, where that differs)
ALIASES = {"hest1k": "hest"}


def load_dataset(name: str, **kwargs) -> SampleSet:
    """Load a dataset by name (``her2st``, ``hest``, ``synthetic``); keyword options go to its adapter."""
    import histomoe_core.data  # noqa: F401  (registers every adapter)

    return SOURCES.create(ALIASES.get(name, name), **kwargs)
