"""The embedding pipeline: patches are prepared in background threads while the encoder runs, on CPU and GPU.

:class:`Prefetcher` starts one producer thread (``histomoe-patches``) that walks the jobs in order: it decodes
each slide and cuts its patches in batches (:func:`~histomoe_core.data.patches.slide_batches`); they are resized
(:func:`~histomoe_core.data.patches.resize_patches`) and normalised with the encoder's own ``preprocess`` into one
contiguous tensor per batch, by the producer on a GPU and by the calling thread on a CPU
(:func:`torch_in_producer`: torch ops in two threads at once make the encoder's threads sleep at each barrier).
Patches from a :class:`PatchReader` (tiled slides) come resized by the reader, in the producer. Batches run across
slides (:func:`full_batches`): the last patches of one slide share a batch with the first of the next, so every
forward but the run's last sees a full batch (fewer, equal-shaped forwards: less heap for the activations on a
CPU, no padded short batch per slide on a GPU). A bounded queue (``depth`` batches) hands them to the calling
thread, which runs the forward pass. PIL releases the GIL, so the two overlap on a CPU too: while the encoder
works on the last batches of a slide, the producer decodes the next one. ``threads`` > 0 adds helper
threads (``histomoe-decode``: that many of the next slides decoded ahead; ``histomoe-crop``: the crops of a batch
in parallel), which a GPU needs and a CPU does not (:func:`patch_threads`; ``benchmarks/bench_embed.py
--patch-threads 0 1`` measures both).

The patches, their order and the batches are those of the serial loop (``slide_batches`` regrouped by
``full_batches``, then ``preprocess``, then the encoder; a patch is resized alike in any batch), so the
embeddings are bit-identical to it for the same batch size and thread count (``tests/test_embed.py`` checks it). A spot's embedding does not depend on the other
patches of its batch, except through the batch's size on some CPU kernels (oneDNN picks another convolution for
a batch of one): so a sample's vectors can differ in the last bits only when its last spot is alone in the run's
final batch, which depends on the samples embedded with it (the batch size is not part of the cache key either).
Closing the prefetcher (at the end, on an error on either side, or on ``KeyboardInterrupt``) stops and joins
every thread it started.

:func:`run_jobs` is the consumer: forward pass, one cache chunk per batch, one finished file per sample.
"""
from __future__ import annotations

import os
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Protocol, Sequence

import numpy as np
import torch

from histomoe_core.data.patches import PatchSpec, open_slide, resize_patches, slide_batches
from histomoe_core.data.sample import Sample
from histomoe_core.embed_cache import CacheEntry, finalize, write_chunk
from histomoe_core.encoders import VisionEncoder

_DONE = object()


class PatchReader(Protocol):
    """A source of patches other than the sample's decoded image (see :func:`histomoe_core.embed.run_embedding`)."""

    def batches(self, sample: Sample, spec: PatchSpec, *, batch_size: int,
                indices: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]: ...

    def cache_id(self) -> str: ...


@dataclass(frozen=True)
class Segment:
    """The spots of one job in a batch, in its rows' order; ``last``: the job is finished once the batch is."""

    job: int
    idx: np.ndarray
    last: bool = False


@dataclass
class Job:
    """One sample to embed into its cache entry: what is already done and what this run adds."""

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


def patch_threads(device: torch.device) -> int:
    """Helper threads beside the producer: none on a CPU (the producer alone keeps the encoder fed, and more
    threads only take cores from the forward pass and memory for slides decoded ahead), up to 4 on a GPU,
    which one thread cannot keep busy. ``HISTOMOE_PATCH_THREADS`` overrides."""
    env = os.environ.get("HISTOMOE_PATCH_THREADS")
    if env:
        return max(int(env), 0)
    return 0 if device.type == "cpu" else max(1, min(4, (os.cpu_count() or 2) // 2))


def torch_in_producer(device: torch.device) -> bool:
    """Whether the producer thread also resizes and normalises the patches (torch ops) or hands them over as cut,
    for the iterating thread to finish between forwards with the encoder's own threads. On a GPU the producer does
    it (the iterating thread only feeds the GPU); on a CPU the iterating thread does: torch ops in a second thread
    start a second OpenMP team, and with more OpenMP threads than cores the encoder's threads sleep at each barrier
    instead of spinning (on her2st, 2 cores: 13,000 voluntary context switches a run instead of 1,700, and the
    cores idle 6-7 % of the time instead of 4 %)."""
    return device.type != "cpu"


def full_batches(pieces: Iterable[tuple[int, np.ndarray | None, np.ndarray | None]],
                 batch_size: int) -> Iterator[tuple[list[Segment], list[np.ndarray] | None]]:
    """Regroup each job's patch batches into batches of exactly ``batch_size`` patches that may span jobs.

    ``pieces``: ``(job, spot indices, uint8 patches)`` in order, and ``(job, None, None)`` once a job has no more.
    Yields ``(segments, parts)``: in its rows' order, one :class:`Segment` per job the batch holds and the patches
    as parts, each from one piece (so of one size: patches of several slides may differ in size until they are
    resized), or ``None`` for a batch that only ends jobs. A job's ``last`` segment comes in the batch with its last
    patches, or, when those completed a batch or it had none, in a batch of end segments only yielded at once.
    Only the final batch may be shorter."""
    pending: deque[tuple[int, np.ndarray, np.ndarray | None]] = deque()  # (job, idx, patches); None: job ends
    n_pending = 0

    def take(n: int) -> tuple[list[Segment], list[np.ndarray] | None]:
        nonlocal n_pending
        segs: list[Segment] = []
        parts = []
        while pending and (n > 0 or pending[0][2] is None):
            j, idx, p = pending.popleft()
            if p is None:  # the job ends: its last patches are in this batch or an earlier one
                _add(segs, j, idx, last=True)
                continue
            m = min(n, len(idx))
            if m < len(idx):  # the rest waits for the next batch
                pending.appendleft((j, idx[m:], p[m:]))
            _add(segs, j, idx[:m])
            parts.append(p[:m])
            n, n_pending = n - m, n_pending - m
        return segs, (parts or None)

    for j, idx, patches in pieces:
        if patches is None:
            pending.append((j, np.zeros(0, np.int64), None))
            if n_pending == 0:  # nothing of it waits for patches of the next job: finish it now
                yield take(0)
            continue
        pending.append((j, np.asarray(idx), patches))
        n_pending += len(idx)
        while n_pending >= batch_size:
            yield take(batch_size)
    while pending:
        yield take(batch_size)


def _add(segs: list[Segment], job: int, idx: np.ndarray, last: bool = False) -> None:
    """Append the spots of ``job`` to a batch's segments, into its last segment when that is the same job's."""
    if segs and segs[-1].job == job:
        segs[-1] = Segment(job, np.concatenate([segs[-1].idx, idx]), last)
    else:
        segs.append(Segment(job, idx, last))


# ------------------------------------------------------------------------------------------------ producer
def yield_to_encoder() -> None:
    """Run the calling (patch) thread at idle priority (Linux ``SCHED_IDLE``): on a CPU the encoder's threads use
    every core, and a patch thread preempting one of them stalls the others at their next synchronisation, so
    decoding and cropping take the cores the encoder leaves idle (between batches, in its serial steps, or while
    it waits for patches). A no-op where the platform has no such policy."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        pass


class Prefetcher:
    """Batches ``(segments, normalised tensor)`` of :func:`full_batches` over every job, made in background threads.

    Iterate inside a ``with`` block; the tensor is None for a batch that only ends jobs. With ``torch_in_producer``
    false, the producer hands over the cut patches and the iterating thread resizes and normalises them (see
    :func:`torch_in_producer`). An error in the producer is raised in the iterating thread; leaving the block
    (normally or not) stops and joins every thread.
    """

    def __init__(self, jobs: Sequence[Job], encoder: VisionEncoder, spec: PatchSpec, *, batch_size: int,
                 threads: int = 0, pin: bool = False, reader: PatchReader | None = None, depth: int = 3,
                 torch_in_producer: bool = True) -> None:
        self.jobs, self.encoder, self.spec, self.batch_size = jobs, encoder, spec, batch_size
        self.threads, self.pin, self.reader, self.torch_in_producer = threads, pin, reader, torch_in_producer
        self.waited_s = 0.0  #: time the iterating thread waited for a batch
        self.prepared_s = 0.0  #: time the iterating thread resized and normalised batches (torch_in_producer off)
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="histomoe-patches", daemon=True)

    def __enter__(self) -> "Prefetcher":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the producer (it may be blocked on a full queue) and join it; it joins its helpers."""
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._q.get(timeout=0.1)
            except queue.Empty:
                pass
        if self._thread.ident is not None:
            self._thread.join()

    def __iter__(self) -> Iterator[tuple[list[Segment], torch.Tensor | None]]:
        while True:
            t0 = time.perf_counter()
            item = self._q.get()
            self.waited_s += time.perf_counter() - t0
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            segments, x = item
            if not self.torch_in_producer:
                t0 = time.perf_counter()
                x = self._tensor(x)
                self.prepared_s += time.perf_counter() - t0
            yield segments, x

    def _tensor(self, parts: list[np.ndarray] | None) -> torch.Tensor | None:
        """A batch's parts resized to the patch size, joined, normalised by the encoder (and pinned for a GPU)."""
        if parts is None:
            return None
        same = [resize_patches(p, self.spec.out_px) for p in parts]
        x = self.encoder.preprocess(same[0] if len(same) == 1 else np.concatenate(same))
        return x.pin_memory() if self.pin else x

    # -------------------------------------------------------------- producer thread
    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        yield_to_encoder()
        decoder = (ThreadPoolExecutor(self.threads, thread_name_prefix="histomoe-decode")
                   if self.threads and self.reader is None else None)
        crops = ThreadPoolExecutor(self.threads, thread_name_prefix="histomoe-crop") if self.threads else None
        ahead: dict[int, Future] = {}
        try:
            self._produce_all(decoder, crops, ahead)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            self._put(exc)
        finally:
            for pool in (crops, decoder):
                if pool is not None:
                    pool.shutdown(wait=True, cancel_futures=True)
            for f in ahead.values():  # slides decoded ahead but never used (stopped early)
                if f.done() and not f.cancelled() and f.exception() is None and f.result() is not None:
                    f.result().close()

    def _produce_all(self, decoder: ThreadPoolExecutor | None, crops: ThreadPoolExecutor | None,
                     ahead: dict[int, Future]) -> None:
        for segments, parts in full_batches(self._pieces(decoder, crops, ahead), self.batch_size):
            if not self._put((segments, self._tensor(parts) if self.torch_in_producer else parts)):
                return
        self._put(_DONE)

    def _pieces(self, decoder: ThreadPoolExecutor | None, crops: ThreadPoolExecutor | None,
                ahead: dict[int, Future]) -> Iterator[tuple[int, np.ndarray | None, np.ndarray | None]]:
        """Each job's ``(j, spot indices, uint8 patches)`` batches then ``(j, None, None)``, slides decoded ahead."""
        todo = [j for j, job in enumerate(self.jobs) if len(job.missing)]
        for j in todo[: self.threads if decoder is not None else 0]:
            ahead[j] = decoder.submit(open_slide, self.jobs[j].sample)
        for j, job in enumerate(self.jobs):
            if len(job.missing):
                opened = ahead.pop(j).result() if j in ahead else False
                if decoder is not None:  # keep `threads` slides decoding ahead
                    nxt = [k for k in todo if k > j and k not in ahead][: self.threads - len(ahead)]
                    for k in nxt:
                        ahead[k] = decoder.submit(open_slide, self.jobs[k].sample)
                for idx, patches in self._batches(job, opened, crops):
                    yield j, idx, patches
            yield j, None, None

    def _batches(self, job: Job, opened: object, crops: ThreadPoolExecutor | None):
        if self.reader is not None:
            return self.reader.batches(job.sample, self.spec, batch_size=self.batch_size, indices=job.missing)
        return slide_batches(job.sample, self.spec, batch_size=self.batch_size, indices=job.missing,
                             opened=opened, pool=crops, resize=False)


# ------------------------------------------------------------------------------------------------ consumer
def run_jobs(jobs: Sequence[Job], encoder: VisionEncoder, spec: PatchSpec, *, batch_size: int, device: torch.device,
             progress: bool, stats,
             reader: PatchReader | None = None, threads: int | None = None) -> dict[str, np.ndarray]:
    """Embed the missing spots of every job (forward on ``device``), writing one chunk per batch and one
    finished file per job; ``stats`` (an :class:`~histomoe_core.embed.EmbedStats`) gets the timings."""
    from tqdm.auto import tqdm

    from histomoe_core.embed import precision_for

    out: dict[str, np.ndarray] = {}
    total = int(sum(len(j.missing) for j in jobs))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision_for(device) == "bf16")
    bar = tqdm(total=total, unit="patch", desc=f"embed {encoder.name}", disable=not progress or total == 0)
    prefetch = Prefetcher(jobs, encoder, spec, batch_size=batch_size, reader=reader, pin=device.type == "cuda",
                          threads=patch_threads(device) if threads is None else threads,
                          torch_in_producer=torch_in_producer(device))
    try:
        with prefetch, torch.inference_mode(), autocast:
            for segments, x in prefetch:
                z = None
                if x is not None:
                    t_fwd = time.perf_counter()
                    z = _forward(encoder, x, device, batch_size)
                    stats.forward_s += time.perf_counter() - t_fwd
                    stats.n_patches += len(z)
                    bar.update(len(z))
                _store(jobs, segments, z, out)
    finally:
        stats.starved_s += prefetch.waited_s
        stats.prepare_s += prefetch.prepared_s
        bar.close()
    return out


def _store(jobs: Sequence[Job], segments: Sequence[Segment], z: np.ndarray | None,
           out: dict[str, np.ndarray]) -> None:
    """One batch's rows to each job's cache chunk (in the segments' order); finished jobs' files into ``out``."""
    start = 0
    for seg in segments:
        job = jobs[seg.job]
        if len(seg.idx):
            part, start = z[start : start + len(seg.idx)], start + len(seg.idx)
            write_chunk(job.entry, seg.idx, part)
            job.new.append((seg.idx, part))
        if seg.last:
            out[job.sample.sample_id] = finalize(job.entry, job.sample, *job.all_done())


def _forward(encoder: VisionEncoder, x: torch.Tensor, device: torch.device, batch_size: int) -> np.ndarray:
    """(n, D) float32 embeddings of one batch; on a GPU the run's short last batch is padded to the batch size
    (one input shape, no new kernel choice)."""
    n = len(x)
    if device.type == "cuda" and n < batch_size:
        x = torch.cat([x, x.new_zeros((batch_size - n, *x.shape[1:]))])
    x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    return encoder(x)[:n].float().cpu().numpy()
