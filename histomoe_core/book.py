"""The book runner: execute every chapter with papermill, then render the HTML with Jupyter Book 1.x.

A chapter is a jupytext source ``book/chapters/NN_slug.py`` (or ``.md``) with a code cell tagged
``parameters``. :func:`build_book` converts each chapter to a notebook, inserts the Colab install cell, injects
the profile's parameters (``book/configs/<profile>.yaml``) plus command-line overrides, executes it with
papermill into ``book/_executed/NN_slug.ipynb`` and finally runs ``jupyter-book build`` with execution off.

Executed notebooks are content-addressed (``cache_dir()/book/<key>``). The key of a chapter hashes its
source, the parameters it receives, the Colab cell, the source of every ``histomoe_core`` module it imports
(followed transitively, see :func:`module_closure`) and the manifests of the datasets it names, so a re-render
with nothing changed executes nothing, and a change to the package or to a dataset re-executes only the
chapters that depend on it.
"""
from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from histomoe_core import cache, colab
from histomoe_core.paths import environ
from histomoe_core.colab import Repo, add_cells, colab_notebook, launch_source, sync_notebooks
from histomoe_core.colab_markdown import load_references
from histomoe_core.book_pages import MERGED_HEADER, layout_file, merged_parameters, page_layout  # noqa: F401 (re-exported)
from histomoe_core.book_deps import (PACKAGE, _sha, chapter_imports, code_fingerprint_for,  # noqa: F401 (re-exported)
                                     manifests_for, module_closure, package_root)
from histomoe_core.errors import HistoMoEError

#: bump to invalidate every cached chapter (e.g. when the execution recipe changes)
KEY_VERSION = 3
CHAPTER_GLOB = "[0-9][0-9]_*"
CHAPTER_SUFFIXES = (".py", ".md")
CHAPTERS_DIR = Path("book") / "chapters"
CONFIGS_DIR = Path("book") / "configs"
EXECUTED_DIR = Path("book") / "_executed"
ROOT_PAGE = "book/intro"
#: pages that are not chapters, listed after the chapters: (caption, [page, ...]) (Markdown files, no extension)
EXTRA_PAGES = (("Reference", ("book/glossary",)),)
#: environment of the kernels that execute chapters: inline figures, no progress bars in the rendered book
KERNEL_ENV = {"MPLBACKEND": "module://matplotlib_inline.backend_inline", "TQDM_DISABLE": "1"}
#: warning filters added for those kernels (tqdm's "no ipywidgets" notice would print a path of this machine)
KERNEL_WARNING_FILTERS = ("ignore:IProgress not found",)
#: parts of the table of contents: caption, first and last chapter number
PARTS = (("Data, embeddings and the model", 0, 3), ("Results", 4, 8), ("Scaling and reproducibility", 9, 9),
         ("Using the model", 10, 99))


class BookError(HistoMoEError):
    """A chapter, profile or build problem, with the file to look at."""


@dataclass(frozen=True)
class Chapter:
    number: str
    slug: str
    path: Path

    @property
    def stem(self) -> str:
        return f"{self.number}_{self.slug}"


@dataclass
class Profile:
    name: str
    description: str
    parameters: dict
    chapters: dict = field(default_factory=dict)

    def for_chapter(self, number: str) -> dict:
        """Profile parameters with this chapter's overrides applied."""
        return {"profile": self.name, **self.parameters, **(self.chapters.get(number) or {})}


@dataclass
class ChapterRun:
    chapter: Chapter
    key: str
    status: str  # "executed", "cached", "kept", "missing", "failed"
    seconds: float = 0.0
    parameters: dict = field(default_factory=dict)
    error: str = ""


@dataclass
class BookResult:
    runs: list[ChapterRun]
    html_dir: Path | None
    seconds: float


# --------------------------------------------------------------------------------------------- discovery


def find_root(start: Path | None = None) -> Path:
    """The book root: the nearest folder (from ``start`` or the cwd upwards) with ``_config.yml`` and
    ``book/chapters``; else the repository that holds this package."""
    here = Path(start or Path.cwd()).resolve()
    for cand in (here, *here.parents):
        if (cand / "_config.yml").is_file() and (cand / CHAPTERS_DIR).is_dir():
            return cand
    repo = Path(__file__).resolve().parents[1]
    if (repo / CHAPTERS_DIR).is_dir():
        return repo
    raise BookError(f"no book found from {here}: expected _config.yml and {CHAPTERS_DIR}/ (pass --root)")


def discover_chapters(root: Path) -> list[Chapter]:
    """Chapters ``book/chapters/NN_slug.{py,md}`` in number order (two files with one stem is an error)."""
    found: dict[str, Chapter] = {}
    for path in sorted((root / CHAPTERS_DIR).glob(CHAPTER_GLOB)):
        if path.suffix not in CHAPTER_SUFFIXES:
            continue
        number, slug = path.stem.split("_", 1)
        ch = Chapter(number, slug, path)
        if ch.stem in found:
            raise BookError(f"two sources for chapter {ch.stem}: {found[ch.stem].path.name} and {path.name}; keep one")
        found[ch.stem] = ch
    return sorted(found.values(), key=lambda c: (c.number, c.slug))


def select_chapters(chapters: Sequence[Chapter], wanted: Sequence[str] | None) -> list[Chapter]:
    """Chapters matching ``wanted`` entries: a number (``"04"``, ``"4"``) or a stem/slug."""
    if not wanted:
        return list(chapters)
    out = []
    for w in wanted:
        w = str(w)
        hits = [c for c in chapters if w in (c.stem, c.slug) or (w.isdigit() and int(w) == int(c.number))]
        if not hits:
            raise BookError(f"no chapter {w!r}; chapters: {', '.join(c.stem for c in chapters)}")
        out.extend(h for h in hits if h not in out)
    return out


def list_profiles(root: Path) -> list[str]:
    return sorted(p.stem for p in (root / CONFIGS_DIR).glob("*.yaml"))


def load_profile(name: str, root: Path) -> Profile:
    """``book/configs/<name>.yaml``: ``parameters`` for every chapter and per-chapter ``chapters: {NN: {...}}``."""
    path = root / CONFIGS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise BookError(f"no book profile {path}; profiles: {', '.join(list_profiles(root)) or 'none'}")
    raw = yaml.safe_load(path.read_text()) or {}
    unknown = set(raw) - {"description", "parameters", "chapters"}
    if unknown:
        raise BookError(f"{path}: unknown keys {sorted(unknown)}; allowed: description, parameters, chapters")
    chapters = {f"{int(k):02d}" if str(k).isdigit() else str(k): v for k, v in (raw.get("chapters") or {}).items()}
    return Profile(name, raw.get("description", ""), dict(raw.get("parameters") or {}), chapters)


def parse_overrides(items: Sequence[str] | None) -> dict:
    """``["seed=1", "encoder=tiny"]`` -> ``{"seed": 1, "encoder": "tiny"}`` (values parsed as YAML)."""
    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise BookError(f"bad parameter {item!r}: expected NAME=VALUE, e.g. seed=1")
        out[key.strip()] = yaml.safe_load(value) if value.strip() else None
    return out


# --------------------------------------------------------------------------------------------- notebooks


def read_chapter(chapter: Chapter):
    """The chapter as an nbformat notebook with a python3 kernelspec."""
    import jupytext

    nb = jupytext.read(chapter.path)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata.setdefault("language_info", {"name": "python"})
    nb.metadata.pop("jupytext", None)  # executed notebooks are not paired with their source
    return nb


def parameters_cell(nb) -> Any:
    cells = [c for c in nb.cells if c.cell_type == "code" and "parameters" in c.metadata.get("tags", [])]
    if len(cells) != 1:
        raise BookError(f"expected exactly one code cell tagged 'parameters', found {len(cells)}")
    return cells[0]


def declared_parameters(nb) -> dict:
    """Names (and literal defaults, where literal) assigned in the ``parameters`` cell."""
    out: dict = {}
    for node in ast.parse(parameters_cell(nb).source).body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        for t in targets:
            if isinstance(t, ast.Name):
                try:
                    out[t.id] = ast.literal_eval(node.value) if node.value is not None else None
                except ValueError:
                    out[t.id] = ast.unparse(node.value)
    return out


def repository(root: Path) -> Repo:
    """``repository.url`` / ``branch`` of ``_config.yml``: the one place that names the project's public repository."""
    cfg = yaml.safe_load((root / "_config.yml").read_text()) or {}
    repo = cfg.get("repository") or {}
    if not repo.get("url"):
        raise BookError(f"{root / '_config.yml'}: set repository.url (the GitHub repository Colab installs from)")
    return Repo(str(repo["url"]).rstrip("/"), str(repo.get("branch") or "main"))


def _source_notebook(chapter: "Chapter", notebooks: Mapping | None):
    """A fresh copy of the chapter's notebook (from ``notebooks`` when the caller read it already)."""
    import copy

    return read_chapter(chapter) if notebooks is None else copy.deepcopy(notebooks[chapter.stem])


def page_notebook(chapter: "Chapter", repo: Repo, notebooks: Mapping | None = None):
    """The notebook a chapter executes into: its cells, the Colab install cell and the launch link."""
    nb = _source_notebook(chapter, notebooks)
    return number_cells(add_cells(nb, repo, launch=launch_source(repo, chapter.stem, chapter.number)))


def chapter_title(nb) -> str:
    """The ``# Title`` line that starts a chapter (empty when there is none)."""
    first = nb.cells[0].source.lstrip() if nb.cells and nb.cells[0].cell_type == "markdown" else ""
    return first.partition("\n")[0].removeprefix("# ").strip() if first.startswith("# ") else ""


def bibliography(root: Path) -> list[Path]:
    """The book's BibTeX files (``bibtex_bibfiles`` in ``_config.yml``)."""
    cfg = yaml.safe_load((root / "_config.yml").read_text()) or {}
    return [root / p for p in cfg.get("bibtex_bibfiles") or [] if (root / p).is_file()]


def sync_colab(root: Path, chapters: Sequence["Chapter"], log=print, notebooks: Mapping | None = None) -> list[Path]:
    """Rewrite ``book/notebooks/`` (the notebooks Colab opens) from the chapters; returns the files written."""
    repo = repository(root)
    sources = [_source_notebook(c, notebooks) for c in chapters]
    titles = {c.stem: chapter_title(nb) or c.stem for c, nb in zip(chapters, sources)}
    references = load_references(bibliography(root))
    colab_nbs = [number_cells(colab_notebook(nb, repo, titles, references)) for nb in sources]
    return sync_notebooks(root, chapters, colab_nbs, log=log)


def number_cells(nb):
    """Deterministic cell ids (``cell-00``, ...), so one source always gives the same notebook."""
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i:02d}"
    return nb


# --------------------------------------------------------------------------------------------- cache keys


def chapter_key(chapter: Chapter, params: Mapping, repo: Repo, nb=None) -> tuple[str, dict]:
    """Content key of an executed chapter and the parts it hashes (kept beside the cached notebook)."""
    source = chapter.path.read_text()
    nb = read_chapter(chapter) if nb is None else nb
    parts = {
        "version": KEY_VERSION,
        "chapter": chapter.stem,
        "source": _sha(source),
        "parameters": dict(params),
        # the cells added to every page and how they are added (histomoe_core.colab's source)
        "colab": _sha(launch_source(repo, chapter.stem, chapter.number) + Path(colab.__file__).read_text()),
        "code": code_fingerprint_for(nb),
        "manifests": manifests_for(source, params),
    }
    return cache.content_key(parts), parts


# --------------------------------------------------------------------------------------------- execution


def _kernel_env():
    """Environment for the kernels that execute chapters (restored afterwards)."""
    warnings = ",".join(filter(None, [os.environ.get("PYTHONWARNINGS"), *KERNEL_WARNING_FILTERS]))
    return environ(**KERNEL_ENV, PYTHONWARNINGS=warnings)


def prepare_pages(root: Path) -> list[Path]:
    """:func:`page_layout` on every executed chapter of ``root`` (before Sphinx reads them); the files changed."""
    return [p for p in sorted((root / EXECUTED_DIR).glob("*.ipynb")) if layout_file(p)]


def _write_if_changed(src: Path, dst: Path) -> bool:
    """Copy ``src`` to ``dst`` laid out for its page (:func:`page_layout`) unless identical (keeps mtimes, so
    Sphinx re-reads only changed pages)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    layout_file(tmp)  # compare the page as it will be read (prepare_pages would otherwise rewrite it every build)
    if dst.is_file() and dst.read_bytes() == tmp.read_bytes():
        tmp.unlink()
        return False
    os.replace(tmp, dst)
    return True


def _error_summary(nb_path: Path) -> str:
    import nbformat

    nb = nbformat.read(nb_path, as_version=4)
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                first = cell.source.strip().splitlines()[0] if cell.source.strip() else ""
                return f"cell {i} ({first[:60]!r}): {out.get('ename')}: {out.get('evalue')}"
    return "see the notebook"


def execute_chapter(chapter: Chapter, params: Mapping, *, repo: Repo, out_path: Path, timeout_s: int | None = None,
                    notebooks: Mapping | None = None) -> None:
    """Execute one chapter with papermill; on failure keep the partial notebook at ``out_path`` and raise."""
    import nbformat
    import papermill as pm

    nb = page_notebook(chapter, repo, notebooks)
    parameters_cell(nb)  # fail early, naming the chapter, when the cell is missing
    with tempfile.TemporaryDirectory(prefix="histomoe-book-") as tmp:
        src = Path(tmp) / f"{chapter.stem}.ipynb"
        nbformat.write(nb, src)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        with _kernel_env():
            try:
                pm.execute_notebook(
                    str(src), str(out_path), parameters=dict(params), kernel_name="python3", cwd=str(out_path.parent),
                    progress_bar=sys.stderr.isatty(), log_output=False, execution_timeout=timeout_s, report_mode=False,
                )
            except pm.PapermillExecutionError as exc:
                raise BookError(
                    f"chapter {chapter.stem} failed at {_error_summary(out_path)}\n"
                    f"  the partly executed notebook is {out_path}\n  source: {chapter.path}"
                ) from exc
    _relative_paths(out_path, chapter)
    layout_file(out_path)


def _relative_paths(nb_path: Path, chapter: Chapter) -> None:
    """Replace papermill's absolute input/output paths (this machine's) by repository-relative ones."""
    import nbformat

    nb = nbformat.read(nb_path, as_version=4)
    meta = nb.metadata.get("papermill", {})
    meta["input_path"] = (CHAPTERS_DIR / chapter.path.name).as_posix()
    meta["output_path"] = (EXECUTED_DIR / f"{chapter.stem}.ipynb").as_posix()
    nbformat.write(nb, nb_path)


def resolve_parameters(chapter: Chapter, nb, profile: Profile, overrides: Mapping) -> dict:
    """Profile and override values for the names this chapter declares (others are not injected)."""
    declared = declared_parameters(nb)
    wanted = profile.for_chapter(chapter.number) | dict(overrides)
    return {k: v for k, v in wanted.items() if k in declared}


def run_chapters(
    root: Path, profile: Profile, chapters: Sequence[Chapter], *, overrides: Mapping | None = None,
    selected: Sequence[Chapter] | None = None, force: bool = False, keep_going: bool = False, log=print,
    notebooks: Mapping | None = None,
) -> list[ChapterRun]:
    """Execute (or fetch from the cache) the ``selected`` chapters; keep the others' executed notebooks.

    A chapter that fails raises :class:`BookError`, or with ``keep_going`` is recorded as ``failed`` (its
    partly executed notebook, with the traceback, stays in ``book/_executed``) and the next chapters run."""
    overrides = dict(overrides or {})
    selected = list(chapters) if selected is None else list(selected)
    repo = repository(root)
    executed_dir = root / EXECUTED_DIR
    notebooks = {c.stem: read_chapter(c) for c in chapters} if notebooks is None else notebooks
    for c in chapters:
        try:
            parameters_cell(notebooks[c.stem])
        except BookError as exc:
            raise BookError(f"{c.path}: {exc}") from None
    declared_anywhere = set().union(*(declared_parameters(notebooks[c.stem]) for c in selected)) if selected else set()
    unknown = sorted(set(overrides) - declared_anywhere)
    if unknown:
        raise BookError(
            f"parameter(s) {unknown} are not declared by chapter(s) {', '.join(c.stem for c in selected)}; "
            f"declared: {', '.join(sorted(declared_anywhere))}"
        )
    runs = []
    for c in chapters:
        out = executed_dir / f"{c.stem}.ipynb"
        if c not in selected:
            runs.append(ChapterRun(c, "", "kept" if out.is_file() else "missing"))
            continue
        params = resolve_parameters(c, notebooks[c.stem], profile, overrides)
        key, parts = chapter_key(c, params, repo, notebooks[c.stem])
        cached = cache.artifact_dir("book", key) / f"{c.stem}.ipynb"
        t0 = time.perf_counter()
        if cached.is_file() and not force:
            _write_if_changed(cached, out)
            runs.append(ChapterRun(c, key, "cached", 0.0, params))
            log(f"[book] {c.stem}: up to date (key {key})")
            continue
        log(f"[book] {c.stem}: executing with {json.dumps(params, default=str)}")
        try:
            execute_chapter(c, params, repo=repo, out_path=out, notebooks=notebooks)
        except BookError as exc:
            if not keep_going:
                raise
            runs.append(ChapterRun(c, key, "failed", time.perf_counter() - t0, params, error=str(exc)))
            log(f"[book] {c.stem}: FAILED, going on with the next chapters\n  {exc}")
            continue
        with cache.atomic_dir(cache.artifact_dir("book", key)) as tmp:
            shutil.copyfile(out, tmp / f"{c.stem}.ipynb")
            (tmp / "key.json").write_text(json.dumps(parts, indent=1, sort_keys=True, default=str))
        dt = time.perf_counter() - t0
        runs.append(ChapterRun(c, key, "executed", dt, params))
        log(f"[book] {c.stem}: executed in {dt:.0f} s (key {key})")
    stale = {p for p in executed_dir.glob("*.ipynb")} - {executed_dir / f"{c.stem}.ipynb" for c in chapters}
    for p in stale:
        p.unlink()
    return runs


# --------------------------------------------------------------------------------------------- toc and html


def render_toc(chapters: Sequence[Chapter]) -> str:
    """``_toc.yml`` listing the executed notebooks of ``chapters`` under the intro page, in the parts of
    :data:`PARTS` (by chapter number), then the pages of :data:`EXTRA_PAGES` (the glossary)."""
    lines = [
        "# Generated by `histomoe book` from book/chapters/ (chapter NN_slug.py -> book/_executed/NN_slug.ipynb).",
        "# Edit the chapter files, not this list: `histomoe book` (or `histomoe book --sync-toc`) rewrites it.",
        "format: jb-book",
        f"root: {ROOT_PAGE}",
        "parts:",
    ]
    for caption, first, last in PARTS:
        members = [c for c in chapters if first <= int(c.number) <= last]
        if members:
            lines += [f"  - caption: {caption}", "    chapters:"]
            lines += [f"      - file: {(EXECUTED_DIR / c.stem).as_posix()}" for c in members]
    for caption, pages in EXTRA_PAGES:
        lines += [f"  - caption: {caption}", "    chapters:"] + [f"      - file: {page}" for page in pages]
    return "\n".join(lines) + "\n"


def sync_toc(root: Path, chapters: Sequence[Chapter], log=print) -> bool:
    """Rewrite ``_toc.yml`` when it does not list exactly ``chapters``; True when it was rewritten."""
    path = root / "_toc.yml"
    text = render_toc(chapters)
    if path.is_file() and path.read_text() == text:
        return False
    path.write_text(text)
    log(f"[book] wrote {path} ({len(chapters)} chapters)")
    return True


def build_html(root: Path, *, log=print) -> Path:
    """``jupyter-book build`` (execution off, incremental) into ``book/_build/html``."""
    out = root / "book"
    prepare_pages(root)
    cmd = [sys.executable, "-c", "import sys; from jupyter_book.cli.main import main; sys.exit(main())",
           "build", str(root), "--path-output", str(out)]
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    text = re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout + proc.stderr)  # drop terminal colours
    warnings = [line for line in text.splitlines() if "WARNING" in line]
    for w in warnings:
        log(f"[book] sphinx: {w.strip()}")
    if proc.returncode != 0:
        tail = "\n".join(text.splitlines()[-30:])
        raise BookError(f"jupyter-book build failed (exit {proc.returncode}):\n{tail}")
    return out / "_build" / "html"


def build_book(
    profile: str = "her2st", *, chapters: Sequence[str] | None = None, overrides: Mapping | None = None,
    root: Path | None = None, html: bool = True, force: bool = False, keep_going: bool = False, log=print,
) -> BookResult:
    """Execute the chapters of ``profile`` (all, or those named in ``chapters``) and render the HTML book.

    ``overrides`` replace profile parameters (``{"seed": 1}``). With ``chapters`` given, other chapters keep
    their last executed notebook; the HTML is built only when every chapter has one. With ``keep_going`` a
    failed chapter does not stop the others; the HTML is built (showing its traceback) and then
    :class:`BookError` names every failed chapter.
    """
    t0 = time.perf_counter()
    root = find_root(root)
    prof = load_profile(profile, root)
    all_chapters = discover_chapters(root)
    if not all_chapters:
        raise BookError(f"no chapters in {root / CHAPTERS_DIR} (expected files like 01_data.py)")
    selected = select_chapters(all_chapters, chapters)
    sync_toc(root, all_chapters, log=log)
    notebooks = {c.stem: read_chapter(c) for c in all_chapters}  # read once, copied where cells are added
    sync_colab(root, all_chapters, log=log, notebooks=notebooks)
    runs = run_chapters(root, prof, all_chapters, overrides=overrides, selected=selected, force=force,
                        keep_going=keep_going, log=log, notebooks=notebooks)
    html_dir = None
    missing = [r.chapter.stem for r in runs if r.status == "missing"]
    if html and missing:
        log(f"[book] HTML not built: chapters {', '.join(missing)} have never been executed; run without --chapter")
    elif html:
        html_dir = build_html(root, log=log)
        log(f"[book] HTML: {html_dir / 'index.html'}")
    failed = [r for r in runs if r.status == "failed"]
    if failed:
        raise BookError(f"{len(failed)} chapter(s) failed:\n" + "\n".join(r.error for r in failed))
    return BookResult(runs, html_dir, time.perf_counter() - t0)
