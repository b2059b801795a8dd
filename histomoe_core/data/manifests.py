"""Dataset manifests (``data_manifests/<name>.yaml``): public source, license, citation, files and sha256.

A manifest is data. Its ``source.kind`` says how files are fetched when no local copy exists:
``http`` (``source.base_url`` + relative path), ``huggingface`` (dataset repo at a pinned revision) or
``generated`` (made on this machine, e.g. the synthetic dataset).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from histomoe_core.errors import FetchError


def manifests_dir() -> Path:
    """``$HISTOMOE_MANIFESTS`` or the repository's ``data_manifests/`` folder."""
    env = os.environ.get("HISTOMOE_MANIFESTS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "data_manifests"


@dataclass(frozen=True)
class FileEntry:
    path: str
    sha256: str
    size: int | None = None


@dataclass
class Manifest:
    name: str
    title: str
    source: dict
    license: str
    citation: str
    files: list[FileEntry] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.source.get("kind", "http")

    @property
    def sections(self) -> dict:
        return self.extra.get("sections") or {}

    def files_of(self, sections=None) -> list[FileEntry]:
        """The files that ``sections`` need (all files when None): each section's own files plus the shared ones.

        A file belongs to a section when it lies under one of the section's ``files`` prefixes, is its ``image``,
        or its name starts with ``<section>.`` / ``<section>_`` (her2st: ``A1.tsv.gz``, ``A1_selection.tsv``).
        """
        if sections is None:
            return list(self.files)
        unknown = sorted(set(sections) - set(self.sections))
        if unknown:
            raise FetchError(f"{self.name} has no section {unknown}; sections: {', '.join(self.sections)}")
        owner = {f.path: self._owner(f.path) for f in self.files}
        return [f for f in self.files if owner[f.path] is None or owner[f.path] in set(sections)]

    def _owner(self, path: str) -> str | None:
        base = path.rsplit("/", 1)[-1]
        for sid, info in self.sections.items():
            info = info or {}
            if any(path.startswith(p) for p in info.get("files", [])) or path == info.get("image"):
                return sid
            if base.startswith((f"{sid}.", f"{sid}_")):
                return sid
        return None

    def file(self, path: str) -> FileEntry:
        for f in self.files:
            if f.path == path:
                return f
        raise KeyError(f"{path!r} is not listed in manifest {self.name!r}")


def list_manifests() -> list[str]:
    return sorted(p.stem for p in manifests_dir().glob("*.yaml"))


def load_manifest(name: str) -> Manifest:
    path = manifests_dir() / f"{name}.yaml"
    if not path.exists():
        raise FetchError(f"no manifest {path}; known datasets: {', '.join(list_manifests()) or 'none'}")
    raw = yaml.safe_load(path.read_text())
    missing = [k for k in ("name", "title", "source", "license", "citation") if k not in raw]
    if missing:
        raise FetchError(f"manifest {path} lacks {missing}")
    files = [FileEntry(f["path"], f["sha256"], f.get("size")) for f in raw.get("files", [])]
    known = {"name", "title", "source", "license", "citation", "files"}
    return Manifest(
        name=raw["name"], title=raw["title"], source=raw["source"], license=raw["license"],
        citation=raw["citation"], files=files, extra={k: v for k, v in raw.items() if k not in known},
    )
