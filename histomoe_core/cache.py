"""Content-addressed artifacts: a key is the hash of everything a result depends on.

``content_key(...)`` hashes JSON-able parts; ``code_fingerprint(*modules)`` hashes the source of the modules
a stage depends on, so editing that code (and only that code) invalidates the stage's artifacts.
Artifacts are written atomically: a directory is built under a temporary name and renamed into place.
``atomic_dir(final, checksums=True)`` also records the sha256 of every file in ``final/SHA256SUMS``;
:func:`intact` checks it, and removes (with a :class:`CorruptArtifactWarning`) a folder that fails, so the caller
recomputes it.
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import shutil
import tempfile
import warnings
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


#: checksum manifest inside an artifact folder written with ``atomic_dir(..., checksums=True)``
CHECKSUMS = "SHA256SUMS"


class CorruptArtifactWarning(UserWarning):
    """A cached artifact failed its checksums; it was removed and is recomputed."""


def write_checksums(folder: Path) -> None:
    """Record ``<sha256>  <relative path>`` of every file under ``folder`` in ``folder/SHA256SUMS``."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS)
    lines = [f"{sha256sum(p)}  {p.relative_to(folder).as_posix()}\n" for p in files]
    (folder / CHECKSUMS).write_text("".join(lines))


def checksum_problems(folder: Path) -> list[str]:
    """What is wrong with ``folder`` against its SHA256SUMS (empty: intact): a missing manifest, missing files,
    changed files, or an unreadable manifest line."""
    manifest = folder / CHECKSUMS
    if not manifest.is_file():
        return [f"no {CHECKSUMS}"]
    problems = []
    for line in manifest.read_text(errors="replace").splitlines():
        digest, _, rel = line.partition("  ")
        if len(digest) != 64 or not rel:
            problems.append(f"bad {CHECKSUMS} line {line[:40]!r}")
        elif not (folder / rel).is_file():
            problems.append(f"{rel} is missing")
        elif file_sha256(folder / rel) != digest:
            problems.append(f"{rel} changed (sha256)")
    return problems or ([] if manifest.stat().st_size else [f"empty {CHECKSUMS}"])


def intact(folder: Path, what: str = "cached artifact") -> bool:
    """True when ``folder`` exists and matches its SHA256SUMS; a folder that does not is removed with a
    :class:`CorruptArtifactWarning` (the caller recomputes it). An absent folder is False, silently."""
    if not folder.exists():
        return False
    problems = checksum_problems(folder)
    if not problems:
        return True
    warnings.warn(f"{what} {folder} is corrupt ({'; '.join(problems[:3])}); removing it and recomputing",
                  CorruptArtifactWarning, stacklevel=2)
    shutil.rmtree(folder, ignore_errors=True)
    return False


@contextmanager
def atomic_dir(final: Path, *, checksums: bool = False) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces ``final`` in one rename (with a SHA256SUMS of its
    files when ``checksums``), on error it is removed."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        yield tmp
        if checksums:
            write_checksums(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
