"""Locations from environment variables, and the environment context manager."""
from __future__ import annotations

import os

import pytest

from histomoe_core import paths


def test_environ_sets_unsets_and_restores_even_on_error(monkeypatch):
    monkeypatch.setenv("HM_KEEP", "old")
    monkeypatch.delenv("HM_NEW", raising=False)
    with pytest.raises(RuntimeError):
        with paths.environ(HM_KEEP=None, HM_NEW="1"):
            assert "HM_KEEP" not in os.environ and os.environ["HM_NEW"] == "1"
            raise RuntimeError("inside")
    assert os.environ["HM_KEEP"] == "old" and "HM_NEW" not in os.environ


def test_locations_follow_the_environment(tmp_path):
    with paths.environ(HISTOMOE_HOME=str(tmp_path), HISTOMOE_CACHE_DIR=None, HISTOMOE_RUNS_DIR=str(tmp_path / "r")):
        assert paths.cache_dir() == tmp_path / "cache" and paths.runs_dir() == tmp_path / "r"
