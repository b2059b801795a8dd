"""Embed every spot of a dataset once, into a content-addressed, resumable cache (see :mod:`histomoe_core.embed_cache`).

:func:`embed_samples` returns ``{sample_id: (n_spots, D) float32}`` in ``adata.obs_names`` order. Samples whose
file is cached are read back; the rest go through one pipeline: a background thread decodes each slide,
crops and resizes patches and normalises them (PIL and torch release the GIL), while the main thread runs
the encoder (``inference_mode``, ``channels_last``, bf16 autocast on GPU) and writes one chunk file per batch.

Under ``torchrun`` (an initialised ``torch.distributed`` process group) each rank embeds a disjoint,
spot-balanced share of the unfinished samples into the same cache; all ranks then read the whole result.

:func:`embed_metadata` turns each sample's metadata string into a vector with a text encoder.
"""
from __future__ import annotations

import queue
from contextlib import contextmanager, nullcontext
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Mapping, Protocol, Sequence

import numpy as np
import torch

from histomoe_core.data.patches import (  # noqa: F401  (open_slide, slide_batches: re-exported)
    PatchSpec, crop_boxes, image_size, in_image, open_slide, slide_batches,
)
from histomoe_core.data.sample import Sample
from histomoe_core.embed_cache import (
    CacheEntry, encoder_key, finalize, locked, read_card, read_chunks, read_final, write_card, write_chunk,
)
from histomoe_core.encoders import TextEncoder, VisionEncoder, create_encoder, create_text_encoder, metadata_text

_DONE = object()


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
def malloc_for_inference() -> Iterator[Callable[[], None]]:
    """Serve large CPU tensors from the heap instead of fresh ``mmap`` pages while inside (Linux glibc).

    PyTorch CPU inference allocates activations of tens to hundreds of MB per layer; glibc maps each one
    freshly and the kernel zeroes its pages, which cost about 40 % of the CPU time of EfficientNet-Lite0 at
    batch 64 on a 2-core machine. Inside, mmap is off and freed memory (up to 2 GB) stays in the heap for reuse;
    on exit glibc's defaults come back and free memory is returned to the system. Yields ``trim()``, which
    returns free heap pages to the system (called between samples so slides do not pile up; a no-op when the
    tuning is off). ``HISTOMOE_MALLOC_TUNE=0`` turns it off.
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
        yield (lambda: libc.malloc_trim(0)) if applied else (lambda: None)
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
class PatchReader(Protocol):
    """A source of patches other than the sample's decoded image (see :func:`run_embedding`)."""

    def batches(self, sample: Sample, spec: PatchSpec, *, batch_size: int,
                indices: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]: ...

    def cache_id(self) -> str: ...


@dataclass
class _Job:
    sample: Sample
    entry: CacheEntry
    expected: np.ndarray  #: spot indices that get a patch
    done_idx: np.ndarray  #: spots read from the cache's chunk files (a resumed run)
    done_emb: np.ndarray
    new: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  #: (indices, embeddings) of this run
    missing: np.ndarray = field(init=False)  #: spots to embed in this run (fixed when planned)

    def __post_init__(self) -> None:
        self.missing = np.setdiff1d(self.expected, self.done_idx)

    def all_done(self) -> tuple[np.ndarray, np.ndarray]:
        """Indices and embeddings of every finished spot, concatenated once."""
        return (np.concatenate([self.done_idx, *(i for i, _ in self.new)]),
                np.concatenate([self.done_emb, *(z for _, z in self.new)]))


@dataclass
class EmbedStats:
    """What a call did: samples read from cache vs computed, patches embedded, seconds, patches/s."""

    cached: list[str] = field(default_factory=list)
    computed: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    n_patches: int = 0
    seconds: float = 0.0
    forward_s: float = 0.0  #: time in the encoder (the rest is waiting for patches and writing files)
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


# ------------------------------------------------------------------------------------------------ pipeline
def _put(q: queue.Queue, item: object, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.2)
            return True
        except queue.Full:
            continue
    return False


def _produce(jobs: Sequence[_Job], encoder: VisionEncoder, spec: PatchSpec, batch_size: int, pin: bool,
             q: queue.Queue, stop: threading.Event, threads: int = 0, reader: "PatchReader | None" = None) -> None:
    """Decode, crop, resize and normalise patches for every job, in order; a ``None`` batch ends a sample.
    With ``threads`` > 0 that many of the next slides are decoded ahead in threads, and the patches of each batch
    are cropped and resized by as many threads. A ``reader`` replaces the slide decoding (e.g. tiles of a
    pyramidal slide)."""
    from concurrent.futures import ThreadPoolExecutor

    todo = [j for j, job in enumerate(jobs) if len(job.missing)]
    decoder = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="histomoe-decode") if threads else None
    crops = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="histomoe-crop") if threads else None
    ahead: dict[int, object] = {}

    def schedule(k: int) -> None:
        if decoder is not None and reader is None and k < len(todo):
            ahead[todo[k]] = decoder.submit(open_slide, jobs[todo[k]].sample)

    try:
        for k in range(threads):
            schedule(k)
        done = 0
        for j, job in enumerate(jobs):
            missing = job.missing
            if len(missing):
                opened = ahead.pop(j).result() if j in ahead else False
                schedule(done + threads)
                done += 1
                batches = (reader.batches(job.sample, spec, batch_size=batch_size, indices=missing)
                           if reader is not None else
                           slide_batches(job.sample, spec, batch_size=batch_size, indices=missing, opened=opened,
                                         pool=crops))
                for idx, patches in batches:
                    x = encoder.preprocess(patches)
                    if pin:
                        x = x.pin_memory()
                    if not _put(q, (j, idx, x), stop):
                        return
            if not _put(q, (j, None, None), stop):
                return
        _put(q, _DONE, stop)
    except BaseException as exc:  # handed to the consumer, which re-raises it
        _put(q, exc, stop)
    finally:
        if crops is not None:
            crops.shutdown(wait=True, cancel_futures=True)
        if decoder is not None:
            decoder.shutdown(wait=True, cancel_futures=True)
            for f in ahead.values():  # slides decoded ahead but never used (stopped early)
                if f.done() and f.exception() is None and f.result() is not None:
                    f.result().close()


def patch_threads(device: torch.device) -> int:
    """Threads that decode slides ahead and crop patches: none on a CPU (the encoder is the bottleneck and
    memory stays low), up to 4 on a GPU, which one thread cannot keep busy. ``HISTOMOE_PATCH_THREADS`` overrides."""
    import os

    env = os.environ.get("HISTOMOE_PATCH_THREADS")
    if env:
        return max(int(env), 0)
    return 0 if device.type == "cpu" else max(1, min(4, (os.cpu_count() or 2) // 2))


def _run(jobs: Sequence[_Job], encoder: VisionEncoder, spec: PatchSpec, *, batch_size: int, device: torch.device,
         progress: bool, stats: EmbedStats, prefetch: int = 3,
         between_samples: Callable[[], object] = lambda: None,
         reader: "PatchReader | None" = None) -> dict[str, np.ndarray]:
    from tqdm.auto import tqdm

    out: dict[str, np.ndarray] = {}
    total = int(sum(len(j.missing) for j in jobs))
    q: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()
    producer = threading.Thread(target=_produce, args=(jobs, encoder, spec, batch_size, device.type == "cuda", q, stop,
                                                       patch_threads(device), reader),
                                name="histomoe-patches", daemon=True)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision_for(device) == "bf16")
    bar = tqdm(total=total, unit="patch", desc=f"embed {encoder.name}", disable=not progress or total == 0)
    producer.start()
    try:
        with torch.inference_mode(), autocast:
            while True:
                t_wait = time.perf_counter()
                item = q.get()
                stats.starved_s += time.perf_counter() - t_wait
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    raise item
                j, idx, x = item
                job = jobs[j]
                if idx is None:
                    out[job.sample.sample_id] = finalize(job.entry, job.sample, *job.all_done())
                    between_samples()
                    continue
                t_fwd = time.perf_counter()
                n = len(x)
                if device.type == "cuda" and n < batch_size:  # one input shape: no new kernel choice per section
                    x = torch.cat([x, x.new_zeros((batch_size - n, *x.shape[1:]))])
                x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
                z = encoder(x)[:n].float().cpu().numpy()
                stats.forward_s += time.perf_counter() - t_fwd
                write_chunk(job.entry, idx, z)
                job.new.append((idx, z))
                stats.n_patches += len(idx)
                bar.update(len(idx))
    finally:
        stop.set()
        while producer.is_alive():
            try:
                q.get(timeout=0.1)
            except queue.Empty:
                pass
        producer.join()
        bar.close()
    return out


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
            with malloc_for_inference() if dev.type == "cpu" else nullcontext(lambda: None) as trim, fixed_threads(threads):
                computed = _run(mine, enc, spec, batch_size=batch_size, device=dev, progress=progress and rank == 0,
                                stats=stats, between_samples=trim, reader=reader)
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
    enc = _text_encoder(encoder) if isinstance(encoder, str) else encoder
    texts = [metadata_text(s, fields) for s in samples]
    vecs = enc.encode(texts)
    return {s.sample_id: np.asarray(v, np.float32) for s, v in zip(samples, vecs)}


def metadata_strings(samples: Iterable[Sample], *, fields: Sequence[str] | None = None) -> Mapping[str, str]:
    """``{sample_id: metadata string}`` as the text encoders read it."""
    return {s.sample_id: metadata_text(s, fields) for s in samples}
