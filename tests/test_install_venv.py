"""tools/install_venv.py: pip's settings carried over to uv, and pip used when uv cannot be."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("install_venv", ROOT / "tools" / "install_venv.py")
install_venv = importlib.util.module_from_spec(spec)
spec.loader.exec_module(install_venv)

LISTED = """:env:.find-links='/opt/wheels'
global.constraint='/etc/xdg/pip/constraints.txt'
global.extra-index-url='file:///opt/a/simple file:///opt/b/simple'
global.find-links='/opt/wheels'
global.timeout='60'
"""


def fake_run(outputs: dict, calls: list):
    def run(cmd, *args, **kwargs):
        calls.append([str(c) for c in cmd])
        key = "config" if "config" in cmd else ("uv" if str(cmd[0]).endswith("uv") else "pip")
        rc, out = outputs.get(key, (0, ""))
        return subprocess.CompletedProcess(cmd, rc, stdout=out, stderr="")
    return run


def test_pip_settings_read_from_pip_config(monkeypatch):
    monkeypatch.setattr(install_venv.subprocess, "run", fake_run({"config": (0, LISTED)}, []))
    got = install_venv.pip_settings()
    assert got == {"index-url": [], "extra-index-url": ["file:///opt/a/simple", "file:///opt/b/simple"],
                   "find-links": ["/opt/wheels"], "constraint": ["/etc/xdg/pip/constraints.txt"]}


def test_uv_command_carries_every_setting_in_order():
    cmd = install_venv.uv_command(Path("/v/bin/uv"), ".[test]", {
        "index-url": ["https://idx/simple"], "extra-index-url": ["file:///a", "file:///b"],
        "find-links": ["/w"], "constraint": ["/c.txt"]})
    assert cmd[:3] == ["/v/bin/uv", "pip", "install"]
    assert cmd[cmd.index("--python") + 1] == sys.executable
    flags = list(zip(cmd, cmd[1:]))
    assert [v for f, v in flags if f == "--index"] == ["file:///a", "file:///b"]
    assert ("--default-index", "https://idx/simple") in flags and ("--find-links", "/w") in flags
    assert ("--constraint", "/c.txt") in flags and cmd[-2:] == ["-e", ".[test]"]


@pytest.mark.parametrize("failing", ["uv", "pip-uv"])
def test_pip_installs_when_uv_fails(monkeypatch, tmp_path, failing):
    calls: list = []
    outputs = {"config": (0, "")}
    if failing == "uv":
        outputs["uv"] = (1, "")  # uv present but its install fails
        (tmp_path / "uv").touch()
    else:
        outputs["pip"] = (1, "")  # uv cannot be installed (and pip's own install then fails too)
    monkeypatch.setattr(install_venv.sys, "executable", str(tmp_path / "python"))
    monkeypatch.setattr(install_venv.subprocess, "run", fake_run(outputs, calls))
    rc = install_venv.main([".[test]"])
    assert calls[-1][-3:] == ["--no-compile", "-e", ".[test]"] and "pip" in calls[-1]
    assert rc == (0 if failing == "uv" else 1)


def test_installer_pip_skips_uv(monkeypatch):
    calls: list = []
    monkeypatch.setenv("HISTOMOE_INSTALLER", "pip")
    monkeypatch.setattr(install_venv.subprocess, "run", fake_run({}, calls))
    assert install_venv.main([".[test]"]) == 0
    assert len(calls) == 1 and not any("uv" in c for c in calls[0])


def test_uv_installs_alone_when_it_works(monkeypatch, tmp_path):
    calls: list = []
    (tmp_path / "uv").touch()
    monkeypatch.delenv("HISTOMOE_INSTALLER", raising=False)
    monkeypatch.setattr(install_venv.sys, "executable", str(tmp_path / "python"))
    monkeypatch.setattr(install_venv.subprocess, "run", fake_run({"config": (0, LISTED)}, calls))
    assert install_venv.main([".[test]"]) == 0
    assert calls[-1][0].endswith("uv") and "--no-compile" not in calls[-1]
    assert not any(c[1:3] == ["-m", "pip"] and "install" in c for c in calls)
