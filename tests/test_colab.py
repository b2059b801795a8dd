"""The Colab notebooks (book/notebooks/): plain Markdown, an install cell keeping Colab's torch, and the converter."""
from __future__ import annotations

import re
import shutil
import sys
import types
from pathlib import Path

import nbformat
import pytest

from histomoe_core import book, colab, colab_markdown

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / colab.NOTEBOOKS_DIR).glob("*.ipynb"))
#: what Colab would show literally: a role ({doc}`x`, {glue:text}`x`) or the opening of a directive (```{x}, :::{x})
MYST = re.compile(r"\{[a-z][\w:+-]*\}`|^\s*(?:`{3,}|:{3,})\{", re.M)
#: torch or torchvision at a pinned version (torch==2.14.1, "torchvision>=0.29")
TORCH_PIN = re.compile(r"torch(?:vision)?\s*(?:==|>=|<=|~=|!=|<|>)\s*\d", re.I)


def install_cell(nb):
    return next(c for c in nb.cells if c.cell_type == "code")


def test_notebooks_exist():
    assert NOTEBOOKS and all(p.stem in {c.stem for c in book.discover_chapters(REPO)} for p in NOTEBOOKS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_markdown_has_no_myst(path):
    nb = nbformat.read(path, as_version=4)
    left = [m.group(0) + cell.source[m.end():m.end() + 30] for cell in nb.cells if cell.cell_type == "markdown"
            for m in MYST.finditer(cell.source)]
    assert not left, f"{path.name}: MyST that Colab shows literally: {left[:5]}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_install_cell_keeps_colab_torch(path):
    cell = install_cell(nb := nbformat.read(path, as_version=4))
    assert "colab" in cell.metadata.get("tags", []), f"{path.name}: the first code cell must be the install cell"
    assert not TORCH_PIN.search(cell.source), f"{path.name}: the install cell pins torch"
    # the commands it runs (an argument list with "-e", or a !pip / %pip line), not the advice it prints
    installs = [line for line in cell.source.splitlines() if '"-e"' in line or line.lstrip().startswith(("!", "%"))
                and "install" in line]
    assert installs and all("--no-deps" in line for line in installs), (
        f"{path.name}: `pip install -e histomoe` would install pyproject's torch over Colab's: {installs}")
    assert cell.source == colab.install_source(book.repository(REPO).url), f"{path.name}: stale install cell"
    assert nb.cells.index(cell) < next(i for i, c in enumerate(nb.cells) if "histomoe_core" in c.source
                                       and c is not cell), "the install cell must run before histomoe_core is imported"


# --------------------------------------------------------------------------------------------- the install cell


@pytest.fixture
def fake_colab(tmp_path, monkeypatch):
    """Run the install cell as on Colab: google.colab importable, git and pip recorded instead of run."""
    google = types.ModuleType("google")
    google.colab = types.ModuleType("google.colab")
    google.colab.drive = types.SimpleNamespace(mount=lambda where: calls.append(["mount", where]))
    monkeypatch.setitem(sys.modules, "google", google)
    monkeypatch.setitem(sys.modules, "google.colab", google.colab)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("HISTOMOE_HOME", str(tmp_path / "home"))
    calls: list[list[str]] = []

    def run(cmd, check=False):
        calls.append([str(a) for a in cmd])
        if cmd[:2] == ["git", "clone"]:
            (tmp_path / cmd[-1]).mkdir()
            shutil.copyfile(REPO / "pyproject.toml", tmp_path / cmd[-1] / "pyproject.toml")

    import subprocess

    monkeypatch.setattr(subprocess, "run", run)
    return calls


def test_install_cell_on_colab_keeps_torch_and_uses_drive(fake_colab, tmp_path):
    import importlib.metadata as md
    import os

    src = colab.install_source("https://github.com/example/fork").replace("USE_DRIVE = False", "USE_DRIVE = True")
    exec(compile(src, "colab", "exec"), {})
    assert fake_colab[0] == ["mount", "/content/drive"] and os.environ["HISTOMOE_HOME"] == colab.DRIVE_HOME
    pips = [c for c in fake_colab if "pip" in c]
    assert pips[0][-3:] == ["--no-deps", "-e", "histomoe"]
    assert not any(re.match(r"torch(vision)?\b", a) for c in pips for a in c), pips
    assert "timm==1.0.31" in pips[1] and pips[1][pips[1].index("-c") + 1] == "colab-constraints.txt"
    kept = (tmp_path / "colab-constraints.txt").read_text().split()
    assert kept == [f"torch=={md.version('torch')}", f"torchvision=={md.version('torchvision')}"]


def test_install_cell_refuses_a_torch_older_than_the_minimum(fake_colab, monkeypatch):
    import importlib.metadata as md

    monkeypatch.setattr(md, "version", lambda name: "2.1.0+cu121")
    too_old = r"torch 2\.3 or newer; this runtime has 2\.1\.0.*pip install -q -e histomoe"
    with pytest.raises(RuntimeError, match=too_old):
        exec(compile(colab.install_source("https://github.com/example/fork"), "colab", "exec"), {})
    assert not [c for c in fake_colab if "pip" in c]


# --------------------------------------------------------------------------------------------- the converter


BIB = r"""@article{doe2020x, title={X}, author={Doe, Jane}, year={2020}, doi={10.1/xyz}}
@article{roe2021y, title={Y}, author={Roe, Richard and Poe, Edgar and M{\"u}ller, Anna}, year={2021},
  eprint={2101.00001}, archivePrefix={arXiv}}
@book{kim2019z, title={Z}, author={Kim, Ann and Lee, Bo}, year={2019}}
"""


def synthetic_notebook():
    md, code = nbformat.v4.new_markdown_cell, nbformat.v4.new_code_cell
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        md("# Title\n\nEarlier: {glue:text}`early`; {glue:text}`r:.1f` is computed further down."),
        code("from myst_nb import glue\nglue('early', 7, display=False)"),
        md("We fit {glue:text}`r:.2f` on {glue:text}`name` (see chapter {doc}`02_next`, {cite}`doe2020x`).\n\n"
           ":::{admonition} Careful\n:class: warning\nOne {cite}`roe2021y,kim2019z` fold.\n:::"),
        code("for kind in ['a']:\n    glue(f'name', 'her2st', display=False)\nglue(\"r\", 0.4567, display=False)"),
        md("```{note}\nAlready known: {glue:text}`early`.\n```"),
    ]
    return nb


def test_converter_on_a_synthetic_notebook(tmp_path, monkeypatch, capsys):
    import myst_nb

    (tmp_path / "refs.bib").write_text(BIB)
    refs = colab_markdown.load_references([tmp_path / "refs.bib"])
    assert refs == {"doe2020x": "[Doe (2020)](https://doi.org/10.1/xyz)",
                    "roe2021y": "[Roe et al. (2021)](https://arxiv.org/abs/2101.00001)",
                    "kim2019z": "Kim and Lee (2019)"}
    repo = colab.Repo("https://github.com/example/fork")
    nb = colab.colab_notebook(synthetic_notebook(), repo, {"02_next": "Next chapter"}, refs)
    kinds = [(c.cell_type, c.metadata.get("tags", [])) for c in nb.cells]
    # title, install cell, glue recorder; each passage's values printed once computed (here: under the code after it)
    assert kinds == [("markdown", []), ("code", ["colab", "hide-input"]), ("code", ["colab"]),
                     ("markdown", []), ("code", []), ("code", ["colab-values"]),
                     ("markdown", []), ("code", []), ("code", ["colab-values"]), ("code", ["colab-values"]),
                     ("markdown", []), ("code", ["colab-values"])]
    text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert not MYST.search(text), text
    assert ("We fit `r` on `name` (see chapter [Next chapter](https://colab.research.google.com/github/example/fork/"
            "blob/main/book/notebooks/02_next.ipynb), [Doe (2020)](https://doi.org/10.1/xyz)).") in text
    assert ("> **Careful**\n>\n> One [Roe et al. (2021)](https://arxiv.org/abs/2101.00001); Kim and Lee (2019) fold."
            in text)
    assert "> **Note**\n>\n> Already known: `early`." in text
    # run it: every passage's values are printed under it, with the text's format
    monkeypatch.setattr(myst_nb, "glue", myst_nb.glue)  # restored after the test
    monkeypatch.setattr(colab, "GLUED", {})
    ns: dict = {}
    shown = []
    for cell in nb.cells:
        if cell.cell_type == "code":
            capsys.readouterr()
            exec(compile(cell.source, "cell", "exec"), ns)
            if "colab-values" in cell.metadata.get("tags", []):
                shown.append((cell.source.splitlines()[-1], capsys.readouterr().out.strip()))
    assert shown == [('show_glued("early")', "early: 7"), ('show_glued("r:.2f", "name")', "r: 0.46\nname: her2st"),
                     ('show_glued("r:.1f")', "r: 0.5"), ('show_glued("early")', "early: 7")]
    assert "# values an earlier passage quotes" in nb.cells[9].source  # under the code cell gluing it, after its own
    colab.show_glued("missing")
    assert capsys.readouterr().out == "missing: not computed yet (run the cells above)\n"


def test_roles_the_book_might_use():
    text, quoted = colab_markdown.roles_to_markdown(
        "{ref}`the table <tab-x>`, {numref}`fig-y`, {term}`MoE`, {math}`x^2`, {doc}`Intro <../intro>`, "
        "{cite:p}`unknown`, {glue}`n`", {}, {})
    assert text == "the table, fig-y, MoE, $x^2$, Intro, unknown, `n`" and quoted == ["n"]
    md = colab_markdown.directives_to_markdown("```{figure} fig.png\n:width: 50%\nA caption.\n```\nafter")
    assert md == "![A caption.](fig.png)\nafter"
