"""Registry of data sources: each turns a dataset into a :class:`~histomoe_core.data.sample.SampleSet`."""
from __future__ import annotations

import copy
import json
from collections import OrderedDict
from dataclasses import replace

from histomoe_core.data.sample import SampleSet
from histomoe_core.errors import HistoMoEError
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
        key = _memo_key(name, kwargs)
        if key is None:
            samples = SOURCES.create(name, **kwargs)
        else:
            if key not in _LOADED:
                _LOADED[key] = SOURCES.create(name, **kwargs)
                while len(_LOADED) > MEMO_SIZE:
                    _LOADED.popitem(last=False)
            _LOADED.move_to_end(key)
            samples = _copy(_LOADED[key])
    return samples if max_spots is None else samples.cap_spots(max_spots)


#: the last datasets of downloaded files parsed in this process, by :func:`_memo_key`: a notebook loads the same
#: datasets for several runs and parsing them takes seconds each time; callers get copies
_LOADED: "OrderedDict[tuple, SampleSet]" = OrderedDict()
MEMO_SIZE = 6


def _memo_key(name: str, kwargs: dict) -> tuple | None:
    """What decides a load of dataset ``name`` from its downloaded files: the options, where its files are and each
    file's size and modification time. None (never kept) for generated, Hugging Face or user datasets and for an
    explicit ``root``."""
    from histomoe_core.data.fetch import locate
    from histomoe_core.data.manifests import load_manifest

    if "root" in kwargs:
        return None
    try:
        manifest = load_manifest(name)
    except (HistoMoEError, OSError, ValueError):
        return None
    root = locate(manifest) if manifest.kind == "http" else None
    if root is None:
        return None
    files = []
    for f in manifest.files_of(None):
        st = (root / f.path).stat()
        files.append((f.path, st.st_size, st.st_mtime_ns))
    return name, json.dumps(kwargs, sort_keys=True, default=str), str(root), tuple(files)


def _copy(samples: SampleSet) -> SampleSet:
    return SampleSet(samples.name, [replace(s, adata=s.adata.copy(), meta=copy.deepcopy(s.meta)) for s in samples])
