"""Google Colab: the install cell every chapter starts with, the launch link on every page, and the
ready-to-open notebooks in ``book/notebooks/`` that the link opens.

The rendered book's pages are executed notebooks (``book/_executed/``, build output, not in git). Colab opens
notebooks from the repository, so each chapter is also kept as an unexecuted notebook in ``book/notebooks/``:
the chapter's cells with the install cell and a request for a GPU runtime, their MyST turned into plain Markdown
(:mod:`histomoe_core.colab_markdown`; glued values are printed by :func:`show_glued`). ``histomoe book`` rewrites them
whenever a chapter changes (``histomoe book --sync-toc`` does only that), and a test fails when they are stale.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Mapping, Sequence

COLAB = "https://colab.research.google.com"
#: where the Colab-ready notebooks live, relative to the book root
NOTEBOOKS_DIR = Path("book") / "notebooks"


@dataclass(frozen=True)
class Repo:
    """The project's public repository (``repository`` in ``_config.yml``): Colab clones and opens from it."""

    url: str
    branch: str = "main"


#: the oldest torch HistoMoE runs with: captum 0.9.0, the dependency with the highest floor, needs torch>=2.3
TORCH_MIN = (2, 3)
#: where the install cell keeps ``HISTOMOE_HOME`` when ``USE_DRIVE = True``
DRIVE_HOME = "/content/drive/MyDrive/histomoe"
INSTALL_CELL = Template(r"""# On Google Colab: clone HistoMoE and install it (nothing happens anywhere else).
# USE_DRIVE = True keeps HistoMoE's caches (HISTOMOE_HOME: datasets, embeddings, trained models) on your Google
# Drive, so other chapters and later sessions reuse them instead of downloading, embedding and training again.
# Off by default: mounting asks for access to your Drive (a pop-up that pauses "Run all"), and real datasets
# take gigabytes of it.
USE_DRIVE = False
import sys
if "google.colab" in sys.modules:
    import os
    import subprocess
    if USE_DRIVE:
        from google.colab import drive
        drive.mount("/content/drive")
        os.environ["HISTOMOE_HOME"] = "$drive_home"
    if not os.path.isdir("histomoe"):
        import importlib.metadata as md
        import re
        import tomllib
        subprocess.run(["git", "clone", "-q", "--depth", "1", "$repo_url", "histomoe"], check=True)
        # keep Colab's torch and torchvision (a matching pair built for its GPU): HistoMoE without its dependencies,
        # then the other dependencies, constrained to that pair
        kept = {name: md.version(name) for name in ("torch", "torchvision")}
        if tuple(int(n) for n in re.findall(r"\d+", kept["torch"])[:2]) < $torch_min:
            raise RuntimeError(f"HistoMoE needs torch $least or newer; this runtime has {kept['torch']}. Run "
                               "`!pip install -q -e histomoe` (torch and torchvision as histomoe/pyproject.toml "
                               "pins them), then Runtime > Restart session, and run this cell again.")
        with open("histomoe/pyproject.toml", "rb") as f:
            deps = tomllib.load(f)["project"]["dependencies"]
        others = [d for d in deps if re.split(r"[\s\[<>=!~;]", d, maxsplit=1)[0].lower() not in kept]
        with open("colab-constraints.txt", "w") as f:
            f.write("".join(f"{name}=={v}\n" for name, v in kept.items()))
        pip = [sys.executable, "-m", "pip", "install", "-q"]
        subprocess.run([*pip, "--no-deps", "-e", "histomoe"], check=True)
        subprocess.run([*pip, "-c", "colab-constraints.txt", *others], check=True)
    sys.path.insert(0, os.path.abspath("histomoe"))""")


def install_source(repo_url: str) -> str:
    """The first code cell of every chapter: installs HistoMoE, only when running on Google Colab.

    It keeps Colab's own torch and torchvision (pyproject's pins would replace them: a multi-GB download and a
    restart) and, opted in, keeps ``HISTOMOE_HOME`` on Google Drive before anything imports ``histomoe_core``."""
    return INSTALL_CELL.substitute(repo_url=repo_url, drive_home=DRIVE_HOME, torch_min=repr(TORCH_MIN),
                                   least=".".join(map(str, TORCH_MIN)))


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


#: the cell after the install cell of a Colab notebook whose text quotes glued values
GLUE_CELL = (
    "# The book prints the numbers its text quotes in place; Colab shows their names (`name`) instead, and the small\n"
    "# cells under the text print them (show_glued) once the cells that compute them have run.\n"
    "from histomoe_core.colab import record_glue, show_glued\n"
    "record_glue()"
)
#: values glued by this kernel since :func:`record_glue` (name -> value)
GLUED: dict = {}


def record_glue() -> None:
    """Make ``myst_nb.glue`` (as the chapters import it) also keep each value in :data:`GLUED`."""
    import myst_nb

    if getattr(myst_nb.glue, "records", False):
        return
    original = myst_nb.glue

    def glue(name: str, variable, display: bool = True) -> None:
        GLUED[name] = variable
        return original(name, variable, display)

    glue.records = True
    myst_nb.glue = glue


def show_glued(*specs: str) -> None:
    """Print glued values, one ``name: value`` line per ``name`` or ``name:format`` (the text's format)."""
    for spec in specs:
        name, _, fmt = spec.partition(":")
        if name not in GLUED:
            print(f"{name}: not computed yet (run the cells above)")
            continue
        value = GLUED[name]
        try:
            text = format(value, fmt) if fmt else str(value)
        except (TypeError, ValueError):
            text = str(value)
        print(f"{name}: {text}")


def colab_notebook(nb, repo: Repo, titles: Mapping[str, str] | None = None,
                   references: Mapping[str, str] | None = None):
    """The Colab-ready copy of a chapter notebook: install cell, no outputs, GPU runtime requested, plain Markdown.

    ``titles`` (chapter stem -> title) turn ``{doc}`` links into links to those chapters' Colab notebooks;
    ``references`` (BibTeX key -> citation, :func:`~histomoe_core.colab_markdown.load_references`) render ``{cite}``.
    """
    import nbformat

    from histomoe_core.colab_markdown import notebook_to_markdown

    nb = add_cells(nb, repo)
    links = {stem: (title, colab_url(repo, stem)) for stem, title in (titles or {}).items()}
    if notebook_to_markdown(nb, links, references or {}):
        at = next(i for i, c in enumerate(nb.cells) if "colab" in c.metadata.get("tags", [])) + 1
        nb.cells.insert(at, nbformat.v4.new_code_cell(GLUE_CELL, metadata={"tags": ["colab"]}))
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
