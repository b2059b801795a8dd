"""Google Colab: the install cell every chapter starts with, the launch link on every page, and the
ready-to-open notebooks in ``book/notebooks/`` that the link opens.

The rendered book's pages are executed notebooks (``book/_executed/``, build output, not in git). Colab opens
notebooks from the repository, so each chapter is also kept as an unexecuted notebook in ``book/notebooks/``:
the chapter's cells with the install cell and a request for a GPU runtime. ``histomoe book`` rewrites them
whenever a chapter changes (``histomoe book --sync-toc`` does only that), and a test fails when they are stale.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

COLAB = "https://colab.research.google.com"
#: where the Colab-ready notebooks live, relative to the book root
NOTEBOOKS_DIR = Path("book") / "notebooks"


@dataclass(frozen=True)
class Repo:
    """The project's public repository (``repository`` in ``_config.yml``): Colab clones and opens from it."""

    url: str
    branch: str = "main"


def install_source(repo_url: str) -> str:
    """The first code cell of every chapter: installs HistoMoE, only when running on Google Colab."""
    return (
        "# On Google Colab: clone HistoMoE and install it (nothing happens anywhere else).\n"
        "import sys\n"
        "if \"google.colab\" in sys.modules:\n"
        "    import os\n"
        "    import subprocess\n"
        "    if not os.path.isdir(\"histomoe\"):\n"
        f"        subprocess.run([\"git\", \"clone\", \"-q\", \"--depth\", \"1\", \"{repo_url}\", \"histomoe\"], check=True)\n"
        "        subprocess.run([sys.executable, \"-m\", \"pip\", \"install\", \"-q\", \"-e\", \"histomoe\"], check=True)\n"
        "    sys.path.insert(0, os.path.abspath(\"histomoe\"))"
    )


def colab_url(repo: Repo, stem: str) -> str:
    """Colab address of the chapter's notebook in ``book/notebooks/`` on GitHub."""
    gh = repo.url.rstrip("/").removeprefix("https://github.com/")
    return f"{COLAB}/github/{gh}/blob/{repo.branch}/{(NOTEBOOKS_DIR / stem).as_posix()}.ipynb"


def launch_source(repo: Repo, stem: str, number: str) -> str:
    """The markdown cell under every chapter title: open it in Colab, or re-execute it with other parameters."""
    return (
        ":::{admonition} Run this chapter\n:class: tip\n"
        f"[Open it in Google Colab]({colab_url(repo, stem)}) (choose a GPU runtime for the encoder "
        "steps), or re-execute it here with other parameters, e.g. "
        f"`histomoe book --chapter {number} -p seed=1`. The cell tagged `parameters` lists what can change.\n:::"
    )


def _untagged(cells: list, *tags: str) -> list:
    return [c for c in cells if not set(tags) & set(c.metadata.get("tags", []))]


def _split_title(nb) -> None:
    """Put a first markdown cell's ``# Title`` line in a cell of its own, so inserted cells sit right under it."""
    import nbformat

    if not nb.cells or nb.cells[0].cell_type != "markdown":
        return
    title, _, rest = nb.cells[0].source.lstrip().partition("\n")
    if title.startswith("# ") and rest.strip():
        nb.cells[0].source = title
        nb.cells.insert(1, nbformat.v4.new_markdown_cell(rest.strip("\n")))


def add_cells(nb, repo: Repo, *, launch: str | None = None):
    """Insert the install cell (tagged ``colab``) and, given ``launch`` markdown, the launch cell (tagged
    ``colab-launch``) right after the title cell, replacing any the notebook has."""
    import nbformat

    nb.cells = _untagged(nb.cells, "colab", "colab-launch")
    _split_title(nb)
    at = 1 if nb.cells and nb.cells[0].cell_type == "markdown" else 0
    new = [nbformat.v4.new_code_cell(install_source(repo.url), metadata={"tags": ["colab", "hide-input"]})]
    if launch is not None:
        new.insert(0, nbformat.v4.new_markdown_cell(launch, metadata={"tags": ["colab-launch"]}))
    nb.cells[at:at] = new
    return nb


def colab_notebook(nb, repo: Repo):
    """The Colab-ready copy of a chapter notebook: install cell, no outputs, GPU runtime requested."""
    nb = add_cells(nb, repo)
    nb.metadata["accelerator"] = "GPU"
    nb.metadata["colab"] = {"provenance": [], "gpuType": "T4"}
    nb.metadata.pop("jupytext", None)
    return nb


def sync_notebooks(root: Path, chapters: Sequence, notebooks: Sequence, log=print) -> list[Path]:
    """Write ``book/notebooks/<stem>.ipynb`` for each (chapter, Colab notebook) pair when its content changed, and
    remove notebooks of chapters that no longer exist. Returns the files written."""
    import nbformat

    out = root / NOTEBOOKS_DIR
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for chapter, nb in zip(chapters, notebooks):
        path = out / f"{chapter.stem}.ipynb"
        text = nbformat.writes(nb) + "\n"
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
            written.append(path)
    stems = {c.stem for c in chapters}
    for stale in out.glob("*.ipynb"):
        if stale.stem not in stems:
            stale.unlink()
            log(f"[book] removed {stale} (no such chapter)")
    if written:
        log(f"[book] wrote {len(written)} Colab notebook(s) in {out}")
    return written
