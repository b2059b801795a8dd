"""Registry of data sources: each turns a dataset into a :class:`~histomoe_core.data.sample.SampleSet`."""
from __future__ import annotations

from histomoe_core.data.sample import SampleSet
from histomoe_core.registry import Registry

SOURCES: Registry[SampleSet] = Registry("data source")
#: other names of a source (its manifest name, where that differs)
ALIASES = {"hest1k": "hest"}


def load_dataset(name: str, *, max_spots: int | None = None, **kwargs) -> SampleSet:
    """Load a dataset by name (a built-in one, e.g. ``her2st``, or one registered with
    :mod:`histomoe_core.data.userdata`); keyword options go to its adapter. ``max_spots``: keep at most that many
    spots per section (a seeded uniform subset, :meth:`SampleSet.cap_spots`), for quicker runs on large sections."""
    import histomoe_core.data  # noqa: F401  (registers every adapter)
    from histomoe_core.data import userdata
    from histomoe_core.data.sample import check_max_spots

    if max_spots is not None:
        check_max_spots(max_spots)  # before the load, which may take minutes
    name = ALIASES.get(name, name)
    if name not in SOURCES and name in userdata.registered():
        samples = userdata.load_registered(name, **kwargs)
    else:
        samples = SOURCES.create(name, **kwargs)
    return samples if max_spots is None else samples.cap_spots(max_spots)
