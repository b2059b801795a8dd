"""Registry of data sources: each turns a dataset into a :class:`~histomoe_core.data.sample.SampleSet`."""
from __future__ import annotations

from histomoe_core.data.sample import SampleSet
from histomoe_core.registry import Registry

SOURCES: Registry[SampleSet] = Registry("data source")
#: other names of a source (its manifest name, where that differs)
ALIASES = {"hest1k": "hest"}


def load_dataset(name: str, **kwargs) -> SampleSet:
    """Load a dataset by name (a built-in one, e.g. ``her2st``, or one registered with
    :mod:`histomoe_core.data.userdata`); keyword options go to its adapter."""
    import histomoe_core.data  # noqa: F401  (registers every adapter)
    from histomoe_core.data import userdata

    name = ALIASES.get(name, name)
    if name not in SOURCES and name in userdata.registered():
        return userdata.load_registered(name, **kwargs)
    return SOURCES.create(name, **kwargs)
