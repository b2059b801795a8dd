"""Embed every spot of a dataset once, into a content-addressed, resumable cache (see :mod:`histomoe_core.embed_cache`).

:func:`embed_samples` returns ``{sample_id: (n_spots, D) float32}`` in ``adata.obs_names`` order. Samples whose
file is cached are read back; the rest go through one pipeline: a background thread decodes each slide and
cuts its patches (PIL releases the GIL), while the main thread runs the encoder (``inference_mode``,
``channels_last``, bf16 autocast on GPU) and writes one chunk file per batch; the patches are resized and
normalised by the background thread on a GPU and by the main thread on a CPU (:mod:`histomoe_core.embed_pipeline`).

Under ``torchrun`` (an initialised ``torch.distributed`` process group) each rank embeds a disjoint,
spot-balanced share of the unfinished samples into the same cache; all ranks then read the whole result.

:func:`embed_metadata` turns each sample's metadata string into a vector with a text encoder.
"""
from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

from histomoe_core.data.patches import (  # noqa: F401  (open_slide, slide_batches: re-exported)
    PatchSpec, crop_boxes, image_size, in_image, open_slide, slide_batches,
)
from histomoe_core.data.sample import Sample
from histomoe_core.embed_cache import (CacheEntry, encoder_key, locked, read_card, read_chunks, read_final,
                                       read_text_vector, write_card, write_text_vector)
from histomoe_core.embed_pipeline import Job as _Job, PatchReader, patch_threads, run_jobs  # noqa: F401  (re-exported)
from histomoe_core.encoders import TextEncoder, VisionEncoder, create_encoder, create_text_encoder, metadata_text
from histomoe_core.encoders.text import TEXT_ENCODERS

# ------------------------------------------------------------------------------------------------ devices
def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None``: the rank's GPU under torchrun, else ``cuda`` if available, else ``cpu``."""
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        import os

        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device("cpu")


@contextmanager
def malloc_for_inference() -> Iterator[bool]:
    """Serve large CPU tensors from the heap instead of fresh ``mmap`` pages while inside (Linux glibc).

    PyTorch CPU inference allocates activations of tens to hundreds of MB per layer; glibc maps each one
    freshly and the kernel zeroes its pages, which cost about 40 % of the CPU time of EfficientNet-Lite0 at
    batch 64 on a 2-core machine. Inside, mmap is off and freed memory (up to 2 GB) stays in the heap for reuse;
    on exit glibc's defaults come back and free memory is returned to the system (not between samples: re-faulting
    the activations' pages costs more than it saves). Yields whether the tuning applies; ``HISTOMOE_MALLOC_TUNE=0``
    turns it off.
    """
    import os
    import sys

    libc = None
    if sys.platform.startswith("linux") and os.environ.get("HISTOMOE_MALLOC_TUNE", "1") != "0":
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt, libc.malloc_trim  # noqa: B018  (glibc only)
        except (OSError, AttributeError):
            libc = None
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    applied = bool(libc is not None and libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    try:
        yield applied
    finally:
        if libc is not None:
            libc.mallopt(M_MMAP_MAX, 65536)
            libc.mallopt(M_TRIM_THRESHOLD, 128 * 1024)
            libc.malloc_trim(0)


def precision_for(device: torch.device) -> str:
    """bf16 autocast on GPU, fp32 on CPU (the precision is part of the cache key)."""
    return "bf16" if device.type == "cuda" else "fp32"


def embed_threads(device: torch.device) -> int | None:
    """CPU threads the encoder runs with (part of the cache key; None on a GPU): ``HISTOMOE_EMBED_THREADS``, else
    the usable CPUs up to 16. Fixed whatever thread limits the caller set, so ``histomoe embed`` and a benchmark
    (1 thread per fit) compute, and share, the same vectors."""
    import os

    if device.type != "cpu":
        return None
    env = os.environ.get("HISTOMOE_EMBED_THREADS")
    if env:
        return max(int(env), 1)
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(n, 16))


@contextmanager
def fixed_threads(threads: int | None) -> Iterator[None]:
    """torch and BLAS use exactly ``threads`` threads inside (no-op for None)."""
    if threads is None:
        yield
        return
    from threadpoolctl import threadpool_limits

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads):
            yield
    finally:
        torch.set_num_threads(old)


def dist_info() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, or (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    import torch.distributed as dist

    if dist_info()[1] > 1:
        dist.barrier()


# ------------------------------------------------------------------------------------------------ planning
@dataclass
class EmbedStats:
    """What a call did: samples read from cache vs computed, patches embedded, seconds, patches/s."""

    cached: list[str] = field(default_factory=list)
    computed: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    n_patches: int = 0
    seconds: float = 0.0
    forward_s: float = 0.0  #: time in the encoder (the rest: finishing and waiting for patches, writing files)
    prepare_s: float = 0.0  #: time the main thread resized and normalised patches (on a CPU)
    starved_s: float = 0.0  #: time the encoder waited for the patch thread
    encoder: str = ""
    key: str = ""
    pretrained: bool = False

    @property
    def patches_per_s(self) -> float:
        return self.n_patches / self.seconds if self.seconds > 0 else float("nan")


def expected_indices(sample: Sample, spec: PatchSpec) -> np.ndarray:
    """Spot indices that get a patch: all of them, except crops leaving the image when ``out_of_image='drop'``."""
    if spec.out_of_image != "drop" or sample.image_path is None:
        return np.arange(sample.n_spots)
    w, h = image_size(sample.image_path)
    return np.flatnonzero(in_image(crop_boxes(sample.coords, spec.crop_px(sample.pixel_size_um)), w, h))


def shard(jobs: Sequence[_Job], rank: int, world: int) -> list[_Job]:
    """This rank's share: largest samples first, each to the rank with the fewest spots so far (deterministic)."""
    load = [0] * world
    mine: list[_Job] = []
    for j in sorted(jobs, key=lambda j: (-len(j.missing), j.sample.sample_id)):
        r = min(range(world), key=lambda i: (load[i], i))
        load[r] += len(j.missing)
        if r == rank:
            mine.append(j)
    order = {j.sample.sample_id: i for i, j in enumerate(jobs)}
    return sorted(mine, key=lambda j: order[j.sample.sample_id])


def run_embedding(samples: Iterable[Sample], encoder: str | VisionEncoder = "efficientnet_lite0", *,
                  spec: PatchSpec = PatchSpec(), batch_size: int = 64, device: str | torch.device | None = None,
                  progress: bool = True, reader: "PatchReader | None" = None) -> tuple[dict[str, np.ndarray], EmbedStats]:
    """:func:`embed_samples` plus an :class:`EmbedStats` of what was read and what was computed.

    ``reader``: where patches come from instead of the sample's decoded image (its ``cache_id()`` joins the
    cache key), e.g. :class:`histomoe_core.slide.patches.SlidePatches` for pyramidal whole-slide images."""
    samples = list(samples)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ids = [s.sample_id for s in samples]
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate sample ids in {ids}")
    dev = resolve_device(device)
    precision = precision_for(dev)
    # a string names an encoder whose identity may be remembered: then a warm cache is read without building it
    card = read_card(encoder) if isinstance(encoder, str) else None
    enc: VisionEncoder | None = None
    if card is None:
        enc = create_encoder(encoder) if isinstance(encoder, str) else encoder
        card = {"name": enc.name, "embed_dim": enc.embed_dim, "pretrained": enc.pretrained, "cache_id": enc.cache_id()}
        if isinstance(encoder, str):
            write_card(encoder, enc)
    name, dim = card["name"], int(card["embed_dim"])
    threads = embed_threads(dev)
    key = encoder_key(card["cache_id"], spec, precision, threads)
    if reader is not None:
        from histomoe_core.cache import content_key

        key = content_key(key, reader.cache_id())
    stats = EmbedStats(encoder=name, key=key, pretrained=bool(card.get("pretrained", False)))
    rank, world = dist_info()

    result: dict[str, np.ndarray] = {}
    todo: list[_Job] = []
    for s in samples:
        entry = CacheEntry.of(s, name, key, spec)
        cached = read_final(entry, s, dim)
        if cached is not None:
            result[s.sample_id] = cached
            stats.cached.append(s.sample_id)
            continue
        done_idx, done_emb = read_chunks(entry, dim)
        todo.append(_Job(s, entry, expected_indices(s, spec), done_idx, done_emb))
        (stats.resumed if len(done_idx) else stats.computed).append(s.sample_id)

    if todo and enc is None:  # something to compute: build the encoder and check the remembered identity
        enc = create_encoder(encoder)
        if enc.cache_id() != card["cache_id"]:
            write_card(encoder, enc)
            return run_embedding(samples, enc, spec=spec, batch_size=batch_size, device=device, progress=progress,
                                 reader=reader)
    if enc is not None:
        enc = enc.to(dev).eval().to(memory_format=torch.channels_last)
    _barrier()  # every rank has planned before any rank writes
    mine = shard(todo, rank, world) if world > 1 else todo
    computed: dict[str, np.ndarray] = {}
    with locked([j.entry for j in mine], on_wait=_waiting):
        mine = _replan(mine, dim, result, stats)  # another run may have finished some while this one waited
        t0 = time.perf_counter()
        if mine:
            # no trim between samples: it hands the activations' pages back to the kernel, which zeroes them again
            # for the next batch (4 M page faults on her2st, ratio to the forward ceiling 0.68 -> 0.82-0.86; peak
            # RSS 3.9-4.1 GB instead of 3.4-3.8, benchmarks/bench_embed.py); freed slides are reused by the next
            with malloc_for_inference() if dev.type == "cpu" else nullcontext(), fixed_threads(threads):
                computed = run_jobs(mine, enc, spec, batch_size=batch_size, device=dev, progress=progress and rank == 0,
                                    stats=stats, reader=reader)
        stats.seconds = time.perf_counter() - t0
    result.update(computed)
    _barrier()  # every rank's files are in place
    for job in todo:
        if job.sample.sample_id not in result:
            arr = read_final(job.entry, job.sample, dim)
            if arr is None:
                raise RuntimeError(f"{job.sample.sample_id}: no embeddings after the run (another rank failed?)")
            result[job.sample.sample_id] = arr
    return {i: result[i] for i in ids}, stats


def _waiting(sample_id: str) -> None:
    import sys

    print(f"[embed] {sample_id}: another run is embedding it into this cache; waiting to reuse its result",
          file=sys.stderr)


def _replan(jobs: Sequence[_Job], dim: int, result: dict[str, np.ndarray], stats: EmbedStats) -> list[_Job]:
    """Jobs still to compute once their locks are held: finished files are read, chunks read again."""
    out = []
    for job in jobs:
        sid = job.sample.sample_id
        arr = read_final(job.entry, job.sample, dim)
        if arr is not None:
            result[sid] = arr
            for lst in (stats.computed, stats.resumed):
                if sid in lst:
                    lst.remove(sid)
            stats.cached.append(sid)
            continue
        out.append(_Job(job.sample, job.entry, job.expected, *read_chunks(job.entry, dim)))
    return out


def embed_samples(samples: Iterable[Sample], encoder: str | VisionEncoder = "efficientnet_lite0", *,
                  spec: PatchSpec = PatchSpec(), batch_size: int = 64, device: str | torch.device | None = None,
                  progress: bool = True) -> dict[str, np.ndarray]:
    """``{sample_id: (n_spots, embed_dim) float32}`` with rows in ``sample.adata.obs_names`` order.

    Cached per sample (encoder + weights + patch spec + precision + sample content); a rerun reads the cache,
    a killed run resumes from its last finished batch. Spots dropped by ``spec.out_of_image='drop'`` get NaN rows.
    Under torchrun the samples are shared out across ranks.
    """
    return run_embedding(samples, encoder, spec=spec, batch_size=batch_size, device=device, progress=progress)[0]


# ------------------------------------------------------------------------------------------------ metadata
_TEXT_CACHE: dict[str, TextEncoder] = {}


def _text_encoder(name: str) -> TextEncoder:
    if name == "onehot":  # vocabulary is fitted per call
        return create_text_encoder(name)
    if name not in _TEXT_CACHE:
        _TEXT_CACHE[name] = create_text_encoder(name)
    return _TEXT_CACHE[name]


def embed_metadata(samples: Iterable[Sample], encoder: str | TextEncoder = "minilm", *,
                   fields: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """``{sample_id: (dim,) float32}``: each sample's metadata string (:func:`metadata_text`) encoded.

    ``onehot`` fits its vocabulary on the strings of ``samples`` (one dimension per distinct context).
    """
    samples = list(samples)
    texts = [metadata_text(s, fields) for s in samples]
    vecs = encode_texts(texts, encoder)
    return {s.sample_id: np.asarray(v, np.float32) for s, v in zip(samples, vecs)}


def encode_texts(texts: Sequence[str], encoder: str | TextEncoder = "minilm") -> np.ndarray:
    """``(n, dim)`` vectors of ``texts``. A named encoder with a ``cache_id`` encodes each distinct text once, alone
    (so its vector does not depend on the other texts), and keeps it in the embedding cache: later calls read it
    without loading the encoder (MiniLM takes ~10 s to load)."""
    entry = TEXT_ENCODERS.get(encoder) if isinstance(encoder, str) and encoder in TEXT_ENCODERS else None
    cid = entry.cache_id() if entry is not None else None
    if cid is None:
        return (_text_encoder(encoder) if isinstance(encoder, str) else encoder).encode(list(texts))
    found = {t: v for t in dict.fromkeys(texts) if (v := read_text_vector(cid, t)) is not None}
    for t in dict.fromkeys(texts):
        if t not in found:
            found[t] = _text_encoder(encoder).encode([t])[0]
            write_text_vector(cid, t, found[t])
    if not texts:  # the encoder's width, as its own encode([]) gives
        return np.zeros((0, entry.dim), np.float32)
    return np.stack([found[t] for t in texts]).astype(np.float32)


def metadata_strings(samples: Iterable[Sample], *, fields: Sequence[str] | None = None) -> Mapping[str, str]:
    """``{sample_id: metadata string}`` as the text encoders read it."""
    return {s.sample_id: metadata_text(s, fields) for s in samples}
