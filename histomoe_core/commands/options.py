"""Option checks shared by the sub-commands, run before anything is loaded: a bad value is a one-line error, exit 2.

Numeric options use the argparse ``type=`` functions here (argparse prints ``histomoe <cmd>: error: ...`` and
exits 2); names that registries know (datasets, text encoders) and devices are checked by :func:`check_*`,
which raise :class:`~histomoe_core.errors.HistoMoEError` (the CLI prints it and exits 2).
"""
from __future__ import annotations

import argparse
from typing import Callable, Sequence

from histomoe_core.errors import HistoMoEError, UnknownNameError

#: ``--help`` layout: the description and examples are printed as written
HELP = {"formatter_class": argparse.RawDescriptionHelpFormatter}


def _number(cast: Callable[[str], float], lo: float, strict: bool, what: str) -> Callable[[str], float]:
    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if value != value or value < lo or (strict and value == lo):  # NaN, too small
            raise argparse.ArgumentTypeError(f"{text!r} must be {what}")
        return value

    parse.__name__ = what  # argparse names the type in its message
    return parse


positive_int = _number(int, 0, True, "an integer >= 1")
nonneg_int = _number(int, 0, False, "an integer >= 0")
positive_float = _number(float, 0.0, True, "a number > 0")


def dataset_names() -> list[str]:
    """Every name ``load_dataset`` accepts (adapters, their aliases and datasets registered as your own)."""
    import histomoe_core.data  # noqa: F401  (registers every adapter)
    from histomoe_core.data import userdata
    from histomoe_core.data.sources import ALIASES, SOURCES

    return sorted({*SOURCES.list(), *ALIASES, *userdata.registered()})


def check_dataset(name: str, extra: Sequence[str] = ()) -> None:
    """Refuse a dataset name no adapter (nor ``extra``, e.g. benchmark profiles) knows, listing the known ones."""
    known = sorted({*dataset_names(), *extra})
    if name not in known:
        raise UnknownNameError(f"unknown dataset {name!r}; known: {', '.join(known)} (see `histomoe data list`)")


def check_text_encoder(name: str | None) -> None:
    if name is None:
        return
    from histomoe_core.encoders import TEXT_ENCODERS

    if name not in TEXT_ENCODERS:
        raise UnknownNameError(f"unknown --text-encoder {name!r}; known: {', '.join(TEXT_ENCODERS.list())}")


def check_device(device: str | None) -> None:
    """Refuse a device string torch does not parse, and a CUDA device on a machine without one."""
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise HistoMoEError(f"--device {device!r} is not a device; use cpu, cuda or cuda:<index>") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0 or (dev.index or 0) >= n:
            raise HistoMoEError(f"--device {device}: this machine has {n} CUDA device(s); use --device cpu "
                                "(or leave --device out to pick a GPU when there is one)")
    elif dev.type not in ("cpu", "mps"):
        raise HistoMoEError(f"--device {device!r} is not supported; use cpu, cuda or cuda:<index>")


def add_selection(p: argparse.ArgumentParser) -> None:
    """``--task`` and ``--samples`` (HEST-Bench task, sample ids; ``--sections`` is the same as ``--samples``)."""
    p.add_argument("--task", default=None, help="HEST-Bench task for hest (e.g. IDC, LUNG): its samples")
    p.add_argument("--samples", "--sections", dest="samples", nargs="+", default=None, metavar="ID",
                   help="only these sample / section ids")


def selection_options(dataset: str, task: str | None, samples: Sequence[str] | None) -> tuple[dict, list | None]:
    """``(kwargs for load_dataset, ids to subset afterwards or None)`` for ``--task`` / ``--samples``."""
    import inspect

    import histomoe_core.data  # noqa: F401
    from histomoe_core.data.sources import ALIASES, SOURCES

    from histomoe_core.data import userdata

    name = ALIASES.get(dataset, dataset)
    loader = userdata.load_registered if name not in SOURCES and name in userdata.registered() else SOURCES.get(name)
    params = inspect.signature(loader).parameters
    out: dict = {}
    if task is not None:
        if "task" not in params:
            raise HistoMoEError(f"--task applies to hest only; {dataset} has no tasks (use --samples)")
        out["task"] = task
    if samples is None:
        return out, None
    key = next((k for k in ("sample_ids", "sections") if k in params), None)
    if key is None:
        return out, list(samples)
    out[key] = list(samples)
    return out, None


def load_selected(dataset: str, task: str | None, samples: Sequence[str] | None, **kwargs):
    """``load_dataset`` with the ``--task`` / ``--samples`` selection applied."""
    from histomoe_core.data import load_dataset

    options, subset = selection_options(dataset, task, samples)
    loaded = load_dataset(dataset, **options, **kwargs)
    return loaded.subset(subset) if subset is not None else loaded
