"""Test setup: offline, an isolated HistoMoE home, and the her2st mirror beside the repository."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MIRROR = REPO.parent / "shared" / "data"


def pytest_configure(config):
    os.environ.setdefault("HISTOMOE_MIRRORS", str(DEFAULT_MIRROR))
    os.environ["HISTOMOE_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("MPLBACKEND", "Agg")
    os.environ["HISTOMOE_JOBS"] = "1"  # pytest-xdist already uses the cores; tests that need workers ask for them
    home = config.rootpath / ".pytest_home" if os.environ.get("HISTOMOE_TEST_KEEP") else None
    if home is None:
        import tempfile

        home = Path(tempfile.mkdtemp(prefix="histomoe-test-"))
    os.environ["HISTOMOE_HOME"] = str(home)
    for var in ("HISTOMOE_DATA_DIR", "HISTOMOE_CACHE_DIR", "HISTOMOE_RUNS_DIR"):
        os.environ.pop(var, None)


def her2st_available() -> bool:
    return any((Path(m) / "her2st").is_dir() for m in os.environ.get("HISTOMOE_MIRRORS", "").split(os.pathsep) if m)


@pytest.fixture(scope="session")
def her2st():
    if not her2st_available():
        pytest.skip("her2st mirror not found; set HISTOMOE_MIRRORS to a folder holding her2st/")
    from histomoe_core.data import load_dataset

    return load_dataset("her2st")
