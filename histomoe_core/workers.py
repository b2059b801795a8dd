"""Worker processes that never outlive their parent.

:func:`worker_pool` is a spawn-context :class:`~concurrent.futures.ProcessPoolExecutor` whose workers end when
the process that started them ends, however it ends:

* SIGKILL of the parent: each worker asks the kernel for SIGKILL when its parent dies (Linux ``prctl``
  ``PR_SET_PDEATHSIG``) and, on every platform, a watchdog thread exits the worker once ``os.getppid()`` changes;
* SIGTERM of the parent: while the pool is open, SIGTERM raises :class:`Terminated` in the parent, the workers
  are killed and the parent exits with status 143 (128 + SIGTERM);
* an exception (or Ctrl-C) in the parent kills the workers before it propagates; the workers themselves
  ignore SIGINT, which a terminal or a Jupyter kernel sends to the whole process group.

With the workers gone, multiprocessing's resource tracker (kept alive by their inherited pipe) exits too.
"""
from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

#: seconds between two checks of the watchdog thread
WATCH_S = 0.5


class Terminated(SystemExit):
    """Raised in the parent by SIGTERM while a :func:`worker_pool` is open (exit status 143)."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


def _die_with(parent: int) -> None:
    """In a worker: end this process when ``parent`` is no longer its parent."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            PR_SET_PDEATHSIG = 1
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the watchdog below still ends the worker
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(WATCH_S)
        os._exit(1)

    threading.Thread(target=watch, name="histomoe-parent-watch", daemon=True).start()


def _init(parent: int, initializer: Callable[..., Any] | None, initargs: Sequence[Any]) -> None:
    # Ctrl-C (or a Jupyter kernel's shutdown, sent to its process group) is the parent's to handle: it kills
    # the workers; a worker interrupted on its own would only print a traceback from its idle queue read
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with(parent)
    if initializer is not None:
        initializer(*initargs)


def kill_workers(pool: ProcessPoolExecutor) -> None:
    """Kill every worker of ``pool`` at once (running tasks are lost) and shut it down without waiting."""
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        try:
            proc.kill()
        except (OSError, ValueError, AttributeError):
            pass
    pool.shutdown(wait=False, cancel_futures=True)


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


#: pools kept open by ``worker_pool(keep=True)``, by their arguments
_KEPT: dict[tuple, ProcessPoolExecutor] = {}


@contextmanager
def worker_pool(n_workers: int, *, initializer: Callable[..., Any] | None = None,
                initargs: Sequence[Any] = (), keep: bool = False) -> Iterator[ProcessPoolExecutor]:
    """A spawn pool of ``n_workers`` processes that end with this process (see the module docstring).

    On a normal exit the pool is shut down waiting for its tasks, or with ``keep`` left running for the next
    ``keep`` call with the same arguments (a notebook runs several benchmarks, and starting workers costs seconds
    each time; kept pools close when this process exits). On an exception, Ctrl-C or SIGTERM its workers are
    killed first.
    """
    key = (n_workers, initializer, tuple(initargs))
    pool = _KEPT.pop(key, None) if keep else None
    if pool is None:
        pool = _new_pool(n_workers, initializer, initargs)
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main else None
    try:
        yield pool
    except BaseException:
        kill_workers(pool)
        raise
    else:
        if keep:
            _KEPT[key] = pool
        else:
            pool.shutdown(wait=True)
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)


def _new_pool(n_workers: int, initializer: Callable[..., Any] | None, initargs: Sequence[Any]) -> ProcessPoolExecutor:
    import multiprocessing as mp

    return ProcessPoolExecutor(max_workers=n_workers, mp_context=mp.get_context("spawn"), initializer=_init,
                               initargs=(os.getpid(), initializer, tuple(initargs)))


def close_kept_pools() -> None:
    """Shut down the pools ``worker_pool(keep=True)`` left running (also done when this process exits)."""
    while _KEPT:
        _KEPT.popitem()[1].shutdown(wait=True)


atexit.register(close_kept_pools)
