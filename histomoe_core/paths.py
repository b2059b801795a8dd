"""Where HistoMoE keeps data, caches and runs (all overridable by environment variables).

- ``HISTOMOE_HOME``: root of everything below (default ``~/.cache/histomoe``).
- ``HISTOMOE_DATA_DIR``: fetched dataset files (default ``$HISTOMOE_HOME/data``).
- ``HISTOMOE_MIRRORS``: local mirror directories checked before the network, separated by ``os.pathsep``;
  each holds ``<dataset>/<relative path>`` (e.g. ``../shared/data`` holds ``her2st/...``).
- ``HISTOMOE_CACHE_DIR``: content-addressed artifacts: embeddings, trained models (default ``$HISTOMOE_HOME/cache``).
- ``HISTOMOE_RUNS_DIR``: benchmark runs (default ``$HISTOMOE_HOME/runs``).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def home() -> Path:
    return Path(os.environ.get("HISTOMOE_HOME", Path.home() / ".cache" / "histomoe")).expanduser()


def data_dir() -> Path:
    return Path(os.environ.get("HISTOMOE_DATA_DIR", home() / "data")).expanduser()


def cache_dir() -> Path:
    return Path(os.environ.get("HISTOMOE_CACHE_DIR", home() / "cache")).expanduser()


def runs_dir() -> Path:
    return Path(os.environ.get("HISTOMOE_RUNS_DIR", home() / "runs")).expanduser()


def mirrors() -> list[Path]:
    raw = os.environ.get("HISTOMOE_MIRRORS", "")
    return [Path(p).expanduser() for p in raw.split(os.pathsep) if p.strip()]


@contextmanager
def environ(**values: str | None) -> Iterator[None]:
    """Set (or, for None, unset) environment variables inside the block and restore them afterwards."""
    old = {k: os.environ.get(k) for k in values}
    try:
        _set_environ(values)
        yield
    finally:
        _set_environ(old)


def _set_environ(values: dict[str, str | None]) -> None:
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
