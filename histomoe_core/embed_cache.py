"""On-disk embedding cache: one ``.npz`` per (encoder key, sample), written atomically, with resumable chunks.

Layout under ``paths.cache_dir()/embeddings``::

    <encoder>-<encoder_key>/
        <sample_id>-<sample_key>.npz          # finished: spot_ids (str), emb (n, D) float32, key (str)
        <sample_id>-<sample_key>.part/        # unfinished: one chunk-*.npz per embedded batch (idx, emb, key)

``encoder_key`` hashes the encoder's identity (name, weights sha256 or a digest of random-init tensors,
mean/std, resize), the :class:`~histomoe_core.data.patches.PatchSpec`, the compute precision, the source of
the patch-cropping code and the cache format version. ``sample_key`` is :func:`sample_content_key`: the
sha256 of the image (or HEST patch) file, the spot ids, their pixel coordinates and the pixel size, i.e.
everything that decides which pixels each patch holds (the file path does not count: moving the data keeps
the cache). A changed input gives a new file name, so stale vectors are never returned.

Every file is written to a temporary name and renamed into place, and carries its full key; a file that
cannot be read, has the wrong key, wrong shape, non-finite values or unknown spot ids is deleted and
recomputed. A run killed mid-sample keeps its finished chunks and recomputes only the rest. Computing a sample
holds ``<sample_id>-<sample_key>.npz.lock`` (:func:`locked`), so a second run on the same cache waits and reuses.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import uuid
import warnings
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from histomoe_core import paths
from histomoe_core.cache import code_fingerprint, content_key, file_sha256
from histomoe_core.data.patches import PatchSpec, patch_source
from histomoe_core.data.sample import Sample
from histomoe_core.encoders.base import VisionEncoder

#: bump when the file layout or the meaning of a stored vector changes
FORMAT_VERSION = 1


class CorruptCacheWarning(UserWarning):
    """A cache file was unreadable or inconsistent; it was removed and will be recomputed."""


def embeddings_root() -> Path:
    return paths.cache_dir() / "embeddings"


def encoder_key(encoder: VisionEncoder | dict, spec: PatchSpec, precision: str, threads: int | None = None) -> str:
    """Key of an encoder's embeddings: its ``cache_id()`` (or that dict itself), the patch spec, the precision,
    the CPU threads the encoder ran with (CPU kernels sum in a thread-dependent order; None on a GPU),
    the patch-cropping code and the format version."""
    ident = encoder if isinstance(encoder, dict) else encoder.cache_id()
    return content_key({
        "encoder": ident, "spec": spec.as_dict(), "precision": precision, "threads": threads,
        "patch_code": code_fingerprint("histomoe_core.data.patches"), "format": FORMAT_VERSION,
    })


def sample_content_key(sample: Sample, spec: PatchSpec = PatchSpec()) -> str:
    """Hash of what decides a sample's patches: the bytes of the file they are read from (slide or HEST patch
    file, :func:`~histomoe_core.data.patches.patch_source`), spot ids, coordinates, pixel size (not paths)."""
    src = patch_source(sample, spec)
    file_hash = file_sha256(Path(src)) if src is not None else None
    coords = np.round(sample.coords, 4).astype("<f8")
    return content_key({
        "file": file_hash, "spot_ids": list(map(str, sample.adata.obs_names)),
        "coords": hashlib.sha256(coords.tobytes()).hexdigest(), "pixel_size_um": round(float(sample.pixel_size_um), 8),
        "patch_size_um": sample.meta.get("patch_size_um") if sample.image_path is None else None,
    })


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")[:60] or "encoder"


@dataclass(frozen=True)
class CacheEntry:
    """Where one sample's embeddings live for one encoder key."""

    sample_id: str
    key: str  #: full key stored inside every file: encoder key + sample key
    final: Path
    part_dir: Path

    @classmethod
    def of(cls, sample: Sample, enc_name: str, enc_key: str, spec: PatchSpec = PatchSpec()) -> "CacheEntry":
        skey = sample_content_key(sample, spec)
        folder = embeddings_root() / f"{_slug(enc_name)}-{enc_key}"
        stem = f"{_slug(sample.sample_id)}-{skey}"
        return cls(sample.sample_id, f"{enc_key}/{skey}", folder / f"{stem}.npz", folder / f"{stem}.part")


def atomic_savez(path: Path, *, durable: bool = True, **arrays: np.ndarray) -> None:
    """Write an ``.npz`` under a temporary name in the same folder, then rename it into place; ``durable``: flushed
    to disk first (a chunk need not be: after a crash a lost or torn chunk is found by its checks and recomputed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _read(path: Path, key: str, names: tuple[str, ...]) -> dict[str, np.ndarray] | None:
    """Arrays of an ``.npz`` if it opens, holds ``names`` and carries ``key``; otherwise None (file removed)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {n: z[n] for n in names + ("key",)}
        if str(out["key"]) != key:
            raise ValueError(f"key {str(out['key'])!r} != {key!r}")
        emb = out.get("emb")
        if emb is not None and (emb.ndim != 2 or emb.dtype != np.float32 or not np.isfinite(emb).all()):
            raise ValueError(f"bad embedding array {emb.shape} {emb.dtype}")
        return out
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        warnings.warn(f"embedding cache file {path} is corrupt ({exc}); removing it and recomputing", CorruptCacheWarning,
                      stacklevel=3)
        path.unlink(missing_ok=True)
        return None


def read_final(entry: CacheEntry, sample: Sample, embed_dim: int) -> np.ndarray | None:
    """(n_spots, D) float32 in ``obs_names`` order (NaN rows for dropped spots), or None if absent/corrupt."""
    if not entry.final.exists():
        return None
    z = _read(entry.final, entry.key, ("spot_ids", "emb"))
    if z is None:
        return None
    ids, emb = z["spot_ids"].astype(str), z["emb"]
    pos = sample.adata.obs_names.get_indexer(ids)
    if len(ids) != len(emb) or emb.shape[1] != embed_dim or (pos < 0).any() or len(set(pos)) != len(pos):
        warnings.warn(f"embedding cache file {entry.final} does not match sample {sample.sample_id}; recomputing",
                      CorruptCacheWarning, stacklevel=2)
        entry.final.unlink(missing_ok=True)
        return None
    out = np.full((sample.n_spots, embed_dim), np.nan, dtype=np.float32)
    out[pos] = emb
    return out


def read_chunks(entry: CacheEntry, embed_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Spot indices and embeddings already stored as chunks of an unfinished sample (corrupt chunks dropped)."""
    idx, emb = [], []
    if entry.part_dir.is_dir():
        for f in sorted(entry.part_dir.glob("chunk-*.npz")):
            z = _read(f, entry.key, ("idx", "emb"))
            if z is None:
                continue
            if z["emb"].shape != (len(z["idx"]), embed_dim):
                warnings.warn(f"chunk {f} has the wrong shape; recomputing it", CorruptCacheWarning, stacklevel=2)
                f.unlink(missing_ok=True)
                continue
            idx.append(z["idx"].astype(np.int64))
            emb.append(z["emb"])
    if not idx:
        return np.zeros(0, np.int64), np.zeros((0, embed_dim), np.float32)
    return np.concatenate(idx), np.concatenate(emb)


@contextmanager
def locked(entries: Sequence[CacheEntry], on_wait: Callable[[str], None] = lambda sample_id: None) -> Iterator[None]:
    """Hold an exclusive lock per entry (``<final>.lock``, taken in path order so two holders cannot deadlock):
    a second embedding of the same (encoder key, sample) waits here, then finds the finished file."""
    import fcntl

    fds: list[int] = []
    try:
        for e in sorted(entries, key=lambda e: str(e.final)):
            e.final.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(e.final.with_name(e.final.name + ".lock"), os.O_CREAT | os.O_RDWR, 0o644)
            fds.append(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                on_wait(e.sample_id)
                fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        for fd in fds:
            os.close(fd)  # closing the descriptor releases its lock


def write_chunk(entry: CacheEntry, idx: np.ndarray, emb: np.ndarray) -> None:
    name = f"chunk-{int(idx[0]):07d}-{uuid.uuid4().hex[:8]}.npz"
    atomic_savez(entry.part_dir / name, durable=False, idx=np.asarray(idx, np.int64), emb=np.asarray(emb, np.float32),
                 key=np.array(entry.key))


def finalize(entry: CacheEntry, sample: Sample, idx: np.ndarray, emb: np.ndarray) -> np.ndarray:
    """Write the finished file from chunk rows (any order, duplicates allowed) and remove the chunks."""
    order = np.unique(idx, return_index=True)[1]  # first occurrence of each spot, sorted by spot index
    idx, emb = idx[order], emb[order]
    atomic_savez(entry.final, spot_ids=np.asarray(sample.adata.obs_names[idx], dtype=str), emb=emb,
                 key=np.array(entry.key))
    shutil.rmtree(entry.part_dir, ignore_errors=True)
    out = np.full((sample.n_spots, emb.shape[1]), np.nan, dtype=np.float32)
    out[idx] = emb
    return out


# ------------------------------------------------------------------------------------------------ encoder cards
def _card_path(name: str) -> Path | None:
    """Where the identity of the encoder built from ``name`` is remembered, or None if it cannot be (hub models).

    The file name hashes what could change the weights without changing the name: the encoder code, the
    torch and timm versions and, for the EfficientNet-Lite encoders, the size and time of the weights file.
    """
    from importlib.metadata import PackageNotFoundError, version

    from histomoe_core.encoders.lite import LITE_WEIGHTS, lite_weights_path

    if name.startswith("hf-hub:"):
        return None
    env: dict = {"code": code_fingerprint("histomoe_core.encoders.base", "histomoe_core.encoders.vision",
                                          "histomoe_core.encoders.lite")}
    for pkg in ("torch", "timm"):
        try:
            env[pkg] = version(pkg)
        except PackageNotFoundError:
            env[pkg] = None
    lite = {f"efficientnet_lite{v}": v for v in LITE_WEIGHTS}
    if name in lite:
        st = lite_weights_path(lite[name]).stat()
        env["weights_file"] = [st.st_size, st.st_mtime_ns]
    return embeddings_root() / "cards" / f"{_slug(name)}-{content_key(name, env, FORMAT_VERSION)}.json"


def read_card(name: str) -> dict | None:
    """``{"cache_id": ..., "embed_dim": ..., "name": ...}`` remembered for ``name``, or None."""
    import json

    path = _card_path(name)
    if path is None or not path.exists():
        return None
    try:
        card = json.loads(path.read_text())
        return card if {"cache_id", "embed_dim", "name"} <= set(card) else None
    except (OSError, ValueError):
        return None


def write_card(name: str, encoder: VisionEncoder) -> None:
    import json

    path = _card_path(name)
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump({"name": encoder.name, "embed_dim": encoder.embed_dim, "pretrained": encoder.pretrained,
                   "cache_id": encoder.cache_id()}, f)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ text vectors
def _text_path(encoder_id: str, text: str) -> Path:
    return embeddings_root() / "text" / _slug(encoder_id) / f"{content_key(encoder_id, text, FORMAT_VERSION)}.npz"


def read_text_vector(encoder_id: str, text: str) -> np.ndarray | None:
    """The cached vector of ``text`` under a text encoder's :meth:`~histomoe_core.encoders.text.TextEncoder.cache_id`,
    or None (absent; corrupt files are removed)."""
    path = _text_path(encoder_id, text)
    if not path.exists():
        return None
    found = _read(path, f"{encoder_id}/{text}", ("vec",))
    return None if found is None else found["vec"]


def write_text_vector(encoder_id: str, text: str, vec: np.ndarray) -> None:
    atomic_savez(_text_path(encoder_id, text), vec=np.asarray(vec, np.float32), key=np.array(f"{encoder_id}/{text}"))
