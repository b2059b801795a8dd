"""Fetch dataset files: local mirror directories first, then the data cache, then the network.

Every file is checked against the manifest's sha256; downloads are written to a temporary file and
renamed into place, so an interrupted fetch never leaves a half-written file under its real name.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

from histomoe_core import paths
from histomoe_core.cache import file_sha256, sha256sum
from histomoe_core.data.manifests import FileEntry, Manifest, load_manifest
from histomoe_core.errors import FetchError

HTTP_TIMEOUT_S = 10


def offline() -> bool:
    return os.environ.get("HISTOMOE_OFFLINE", "") not in ("", "0") or os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")


def _valid(path: Path, entry: FileEntry) -> bool:
    return path.is_file() and file_sha256(path) == entry.sha256


def atomic_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".part")
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _download_http(url: str, dst: Path, entry: FileEntry) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as resp:
            shutil.copyfileobj(resp, out)
        got = sha256sum(Path(tmp))
        if got != entry.sha256:
            raise FetchError(f"{url}: sha256 {got} does not match the manifest ({entry.sha256})")
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def locate(manifest: Manifest, sections=None) -> Path | None:
    """The first mirror or cache directory holding every file of the manifest (or of ``sections``), verified."""
    files = manifest.files_of(sections)
    for root in [m / manifest.name for m in paths.mirrors()] + [paths.data_dir() / manifest.name]:
        if root.is_dir() and all(_valid(root / f.path, f) for f in files):
            return root
    return None


def fetch(name: str, *, progress: bool = True, sections=None) -> Path:
    """Make every file of dataset ``name`` (or only those ``sections`` need) available and verified; return the
    directory that holds them."""
    manifest = load_manifest(name)
    if manifest.kind == "generated":
        raise FetchError(f"{name} is generated on this machine, not fetched; use `histomoe_core.data.load_dataset('{name}')`")
    if manifest.kind == "huggingface":
        from histomoe_core.data.hest import fetch_hest  # the HEST layout has its own fetcher

        return fetch_hest(manifest)
    found = locate(manifest, sections)
    if found is not None:
        return found
    dest = paths.data_dir() / name
    problems: list[str] = []
    for entry in tqdm(manifest.files_of(sections), desc=f"fetch {name}", disable=not progress, unit="file"):
        target = dest / entry.path
        if _valid(target, entry):
            continue
        problems.extend(_fetch_one(manifest, entry, target))
    if problems:
        raise FetchError(_explain(manifest, problems))
    return dest


def _fetch_one(manifest: Manifest, entry: FileEntry, target: Path) -> list[str]:
    reasons = []
    for mirror in paths.mirrors():
        src = mirror / manifest.name / entry.path
        if src.is_file():
            if _valid(src, entry):
                atomic_copy(src, target)
                return []
            reasons.append(f"{src}: sha256 mismatch")
    if offline():
        return reasons + [f"{entry.path}: not in any mirror or the cache, and HISTOMOE_OFFLINE/HF_HUB_OFFLINE is set"]
    url = manifest.source["base_url"].rstrip("/") + "/" + entry.path
    try:
        _download_http(url, target, entry)
        return []
    except (urllib.error.URLError, OSError, FetchError) as exc:
        return reasons + [f"{entry.path}: download from {url} failed ({exc})"]


def _explain(manifest: Manifest, problems: list[str]) -> str:
    lines = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
    mirrors = os.pathsep.join(str(m) for m in paths.mirrors()) or "(none)"
    return (
        f"could not fetch dataset {manifest.name!r}:\n  {lines}\n"
        f"Fix: put a copy of the files under <mirror>/{manifest.name}/ and list that mirror in HISTOMOE_MIRRORS "
        f"(now: {mirrors}), or connect to the network so they download from {manifest.source.get('base_url', manifest.source)}."
    )


def verify(name: str, sections=None) -> list[tuple[str, str]]:
    """Check every file of a dataset (or of ``sections``) where it is found; return ``(path, status)`` rows."""
    manifest = load_manifest(name)
    roots = [m / name for m in paths.mirrors()] + [paths.data_dir() / name]
    rows = []
    for entry in manifest.files_of(sections):
        status = "missing"
        for root in roots:
            p = root / entry.path
            if p.is_file():
                status = "ok" if sha256sum(p) == entry.sha256 else f"sha256 mismatch ({p})"
                if status == "ok":
                    break
        rows.append((entry.path, status))
    return rows
