"""Reports about the book: which modules each chapter's cache key follows, every chapter's parameters under a
profile, and the environment a build ran in."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from histomoe_core.book import (declared_parameters, discover_chapters, find_root, load_profile, read_chapter,
                                resolve_parameters)
from histomoe_core.book_deps import PACKAGE, chapter_imports, module_closure, package_root


def dependency_table(root: Path | None = None) -> "pd.DataFrame":
    """Per chapter, the ``histomoe_core`` modules whose source is part of its cache key."""
    import pandas as pd

    root = find_root(root)
    pkg_root = package_root()
    rows = []
    for c in discover_chapters(root):
        mods = sorted(module_closure(chapter_imports(read_chapter(c)), pkg_root))
        short = [m[len(PACKAGE) + 1:] for m in mods if m != PACKAGE]
        rows.append({"chapter": c.stem, "modules": len(mods), "depends on": ", ".join(short)})
    return pd.DataFrame(rows).set_index("chapter")


def parameter_table(profile: str = "her2st", root: Path | None = None) -> "pd.DataFrame":
    """Every chapter's parameters: the default in its source and the value ``profile`` injects."""
    import pandas as pd

    root = find_root(root)
    prof = load_profile(profile, root)
    rows = []
    for c in discover_chapters(root):
        nb = read_chapter(c)
        injected = resolve_parameters(c, nb, prof, {})
        for name, default in declared_parameters(nb).items():
            rows.append({"chapter": c.stem, "parameter": name, "default": default,
                         f"{profile}": injected.get(name, default)})
    return pd.DataFrame(rows).set_index(["chapter", "parameter"])


def environment() -> "pd.Series":
    """Versions and hardware that results depend on (for the record at the end of a run)."""
    import platform

    import pandas as pd
    import torch

    info = {"python": platform.python_version(), "platform": platform.platform(terse=True), "cpu cores": os.cpu_count()}
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("histomoe-core", "torch", "timm", "numpy", "scanpy", "anndata", "captum"):
        try:
            info[dist] = version(dist)
        except PackageNotFoundError:
            info[dist] = "-"
    info["cuda available"] = torch.cuda.is_available()
    info["gpus"] = torch.cuda.device_count()
    if torch.cuda.is_available():
        info["gpu 0"] = torch.cuda.get_device_name(0)
    info["on colab"] = "google.colab" in sys.modules
    return pd.Series(info, name="value")
