"""Content-addressed artifacts: a key is the hash of everything a result depends on.

``content_key(...)`` hashes JSON-able parts; ``code_fingerprint(*modules)`` hashes the source of the modules
a stage depends on, so editing that code (and only that code) invalidates the stage's artifacts.
Artifacts are written atomically: a directory is built under a temporary name and renamed into place.
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

from histomoe_core import paths


def _default(o: Any) -> Any:
    if hasattr(o, "as_dict"):
        return o.as_dict()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"cannot fingerprint {type(o).__name__}")


def content_key(*parts: Any, length: int = 16) -> str:
    blob = json.dumps(parts, sort_keys=True, default=_default).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def sha256sum(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


@lru_cache(maxsize=None)
def _memo_sha256(path: str, size: int, mtime_ns: int) -> str:
    return sha256sum(Path(path))


def file_sha256(path: Path) -> str:
    """:func:`sha256sum` memoised on (path, size, mtime) for the life of the process (slides, weight files)."""
    st = Path(path).stat()
    return _memo_sha256(str(path), st.st_size, st.st_mtime_ns)


def code_fingerprint(*modules: str) -> str:
    """Hash of the source files of the named modules (e.g. ``"histomoe_core.moe"``)."""
    h = hashlib.sha256()
    for name in sorted(modules):
        h.update(name.encode())
        h.update(inspect.getsource(importlib.import_module(name)).encode())
    return h.hexdigest()[:16]


def artifact_dir(kind: str, key: str) -> Path:
    return paths.cache_dir() / kind / key


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces ``final`` in one rename, on error it is removed."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
