"""The book: thin chapter sources, the runner's cache keys, and a full build of the smoke book.

The smoke build (every chapter on synthetic data, then Jupyter Book) is the slowest test of the suite: one test
builds it into a temporary copy of the book and runs every check on the result.
"""
from __future__ import annotations

import ast
import html
import json
import re
import shutil
from pathlib import Path

import nbformat
import pytest

from histomoe_core import book, colab
from histomoe_core.errors import HistoMoEError
from histomoe_core.paths import environ

REPO = Path(__file__).resolve().parents[1]
SOURCES = ["_config.yml", "_toc.yml", "_static", "book/intro.md", "book/glossary.md", "book/references.bib",
           "book/chapters", "book/configs", "book/notebooks"]
#: a tag that loads a script, stylesheet, image or frame from another host
REMOTE = re.compile(r"<(?:script|link|img|iframe|source|embed)\b[^>]*\b(?:src|href)\s*=\s*[\"']?\s*(?:https?:)?//", re.I)
CSS_REMOTE = re.compile(r"@import\s+(?:url\()?\s*[\"']?(?:https?:)?//", re.I)
#: code that fetches scripts or styles at run time (e.g. Altair's default HTML loads vega through requirejs)
REMOTE_CODE = re.compile(
    r"(?:https?:)?//(?:cdn\.jsdelivr\.net|unpkg\.com|cdnjs\.cloudflare\.com|cdn\.plot\.ly|code\.jquery\.com|"
    r"cdn\.bokeh\.org|ajax\.googleapis\.com|fonts\.googleapis\.com)|https?://[^\s\"'<>]+\.(?:m?js|css)(?=[?\"'\s]|$)", re.I)
#: string literals that look like file paths of one machine
LITERAL_PATH = re.compile(r"^(?:/|~|\.\.?/)|\.(?:csv|tsv|npz|npy|h5ad|h5|png|jpe?g|tiff?|ipynb|ya?ml|json|pt|pth)$", re.I)


def copy_book(dst: Path) -> Path:
    for rel in SOURCES:
        src = REPO / rel
        if src.is_dir():
            shutil.copytree(src, dst / rel, ignore=shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints"))
        elif src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst / rel)
    return dst


def home(path: Path):
    """Run the book with its own HistoMoE home (shared by xdist workers), restoring the test's afterwards."""
    return environ(HISTOMOE_HOME=str(path), HISTOMOE_CACHE_DIR=None, HISTOMOE_RUNS_DIR=None, HISTOMOE_DATA_DIR=None)


# --------------------------------------------------------------------------------------------- static checks


CHAPTERS = book.discover_chapters(REPO)


def test_chapters_exist():
    assert CHAPTERS, "no chapters in book/chapters"
    assert all(re.fullmatch(r"\d\d_[a-z0-9_]+", c.stem) for c in CHAPTERS), [c.stem for c in CHAPTERS]


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda c: c.stem)
def test_chapter_is_thin(chapter):
    """One `parameters` cell with profile/dataset/seed; no def/class; no literal file paths; a title first."""
    nb = book.read_chapter(chapter)
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.lstrip().startswith("# "), "first cell: a # title"
    declared = book.declared_parameters(nb)
    assert {"profile", "dataset", "seed"} <= set(declared), f"parameters cell declares {sorted(declared)}"
    first_code = next(c for c in nb.cells if c.cell_type == "code" and "colab" not in c.metadata.get("tags", []))
    assert "parameters" in first_code.metadata.get("tags", []), "the parameters cell must be the first code cell"
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        code = "\n".join(line for line in cell.source.splitlines() if not line.lstrip().startswith(("%", "!")))
        for node in ast.walk(ast.parse(code)):
            assert not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)), (
                f"{chapter.path.name}: define functions in histomoe_core, not in chapters ({ast.unparse(node)[:60]})")
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                assert not LITERAL_PATH.search(node.value), f"{chapter.path.name}: literal path {node.value!r}"


def test_toc_lists_every_chapter():
    assert (REPO / "_toc.yml").read_text() == book.render_toc(CHAPTERS), "run `histomoe book --sync-toc` to regenerate _toc.yml"


def test_profiles_load_and_name_known_parameters():
    declared = set().union(*(book.declared_parameters(book.read_chapter(c)) for c in CHAPTERS))
    for name in ("smoke", "her2st", "hest"):
        prof = book.load_profile(name, REPO)
        assert prof.parameters["dataset"] and "seed" in prof.parameters
        unused = set(prof.parameters) - declared
        assert not unused, f"profile {name} sets parameters no chapter declares: {sorted(unused)}"
    with pytest.raises(HistoMoEError, match="profiles: .*smoke"):
        book.load_profile("nope", REPO)


def test_overrides_parse_as_yaml():
    assert book.parse_overrides(["seed=1", "encoder=tiny", "dataset_options={task: PRAD}", "device="]) == {
        "seed": 1, "encoder": "tiny", "dataset_options": {"task": "PRAD"}, "device": None}
    with pytest.raises(HistoMoEError, match="NAME=VALUE"):
        book.parse_overrides(["seed"])


def test_module_closure_follows_imports(tmp_path):
    pkg = tmp_path / "histomoe_core"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "from histomoe_core.sub import b\n",
        "sub/__init__.py": "",
        "sub/b.py": "def f():\n    from . import c\n",  # a lazy relative import counts
        "sub/c.py": "import numpy\n",
        "unused.py": "",
    }
    for rel, text in files.items():
        (pkg / rel).write_text(text)
    got = book.module_closure({"histomoe_core.a"}, tmp_path)
    assert set(got) == {"histomoe_core", "histomoe_core.a", "histomoe_core.sub", "histomoe_core.sub.b", "histomoe_core.sub.c"}
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("from histomoe_core.a import thing")])
    before = book.code_fingerprint_for(nb, tmp_path)
    (pkg / "unused.py").write_text("x = 1\n")
    assert book.code_fingerprint_for(nb, tmp_path) == before, "a module the chapter does not import changed its key"
    (pkg / "sub" / "c.py").write_text("import numpy as np\n")
    assert book.code_fingerprint_for(nb, tmp_path) != before, "a module the chapter imports did not change its key"


def test_attribute_uses_of_lazy_packages_are_dependencies():
    code = "from histomoe_core import pl, tl\nfig = pl.data.sections(samples)\nrun = tl.load_run('her2st')\n"
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)])
    mods = set(book.module_closure(book.chapter_imports(nb), book.package_root()))
    assert {"histomoe_core.pl.data", "histomoe_core.tl.run", "histomoe_core.benchmark"} <= mods
    # figure and routing modules the chapter never touches are not part of its key
    assert not {"histomoe_core.pl.routing", "histomoe_core.pl.attributions", "histomoe_core.interpret"} & mods


def test_key_depends_on_parameters_and_source(tmp_path):
    root = copy_book(tmp_path)
    ch = next(c for c in book.discover_chapters(root) if c.stem == "01_data")
    url = book.repository(root)
    k0, parts = book.chapter_key(ch, {"seed": 0}, url)
    assert book.chapter_key(ch, {"seed": 0}, url)[0] == k0
    assert book.chapter_key(ch, {"seed": 1}, url)[0] != k0
    ch.path.write_text(ch.path.read_text() + "\n# %%\n1\n")
    assert book.chapter_key(ch, {"seed": 0}, url)[0] != k0
    assert "histomoe_core.pl.data" in parts["code"] and "histomoe_core.book" not in parts["code"]
    assert "her2st" in parts["manifests"]


def test_unknown_parameter_is_refused_before_running(tmp_path):
    root = copy_book(tmp_path)
    with pytest.raises(HistoMoEError, match="not declared"):
        book.build_book("smoke", chapters=[CHAPTERS[0].number], overrides={"no_such_knob": 1}, root=root, html=False)
    with pytest.raises(HistoMoEError, match="no chapter"):
        book.build_book("smoke", chapters=["99"], root=root, html=False)


TINY_CHAPTER = """# %% [markdown]
# # {title}

# %% tags=["parameters"]
profile = "x"
dataset = "x"
seed = 0

# %%
{code}
"""


def test_failed_chapter_is_named_not_cached_and_others_still_run(tmp_path):
    root = copy_book(tmp_path)
    shutil.rmtree(root / book.CHAPTERS_DIR)
    (root / book.CHAPTERS_DIR).mkdir()
    (root / book.CHAPTERS_DIR / "01_fails.py").write_text(TINY_CHAPTER.format(title="Fails", code="raise ValueError(f'boom {seed}')"))
    (root / book.CHAPTERS_DIR / "02_works.py").write_text(TINY_CHAPTER.format(title="Works", code="print(seed + 1)"))
    with home(tmp_path / "home"):
        with pytest.raises(HistoMoEError, match=r"01_fails failed at cell \d+ .*ValueError: boom 0"):
            book.build_book("smoke", root=root, html=False, keep_going=True, log=lambda _: None)
        assert (root / book.EXECUTED_DIR / "02_works.ipynb").is_file()
        again = book.build_book("smoke", chapters=["02"], root=root, html=False, log=lambda _: None)
        assert [r.status for r in again.runs] == ["kept", "cached"]
        with pytest.raises(HistoMoEError, match="01_fails failed"):  # a failure is never cached
            book.build_book("smoke", chapters=["01"], root=root, html=False, log=lambda _: None)
    nb = nbformat.read(root / book.EXECUTED_DIR / "02_works.ipynb", as_version=4)
    assert nb.cells[-1].outputs[0]["text"].strip() == "1"


def test_page_layout_shows_one_parameters_cell_and_no_glue_bookkeeping():
    cell = nbformat.v4.new_code_cell
    nb = nbformat.v4.new_notebook(cells=[
        cell("install()", metadata={"tags": ["colab", "hide-input"]}),
        cell('profile = "x"\nseed = 0', metadata={"tags": ["parameters"]}),
        cell('profile = "smoke"\n', metadata={"tags": ["injected-parameters"]}),
        cell("from myst_nb import glue\n\nx = 1\nglue('x', x, display=False)\nglue(\n    'y',\n    2,\n)\nx"),
        cell("glue('z', 3, display=False)\n# only bookkeeping"),
        cell("glue('shown', fig)", outputs=[nbformat.v4.new_output("display_data", {"text/plain": "fig"})]),
        cell("%time y = 2"),
        cell("for k in 'ab':\n    glue(k, 1, display=False)\nz = 2\nif z:\n    glue('w', z, display=False)\n"
             "for k in 'ab':\n    print(k)"),
    ])
    assert book.page_layout(nb)
    assert nb.cells[2].source == f'{book.MERGED_HEADER}\nprofile = "smoke"\nseed = 0'  # every parameter, once
    tags = [c.metadata.get("tags", []) for c in nb.cells]
    assert "remove-cell" in tags[0] and "remove-cell" in tags[1] and "remove-cell" not in tags[2]
    assert nb.cells[3].source == "x = 1\nx" and "remove-cell" not in tags[3]
    assert "remove-cell" in tags[4] and tags[5] == ["remove-input"] and nb.cells[6].source == "%time y = 2"
    assert nb.cells[7].source == "z = 2\nfor k in 'ab':\n    print(k)"  # glue-only loops and ifs go, others stay
    assert not book.page_layout(nb), "page_layout must be idempotent"


def test_colab_cell_installs_only_on_colab():
    src = colab.install_source("https://github.com/example/fork")
    assert 'if "google.colab" in sys.modules:' in src and "https://github.com/example/fork" in src
    ns: dict = {}
    exec(compile(src, "colab", "exec"), ns)  # here: not Colab, so nothing is cloned or installed
    assert "subprocess" not in ns


def test_colab_notebooks_are_committed_and_current(tmp_path):
    root = copy_book(tmp_path)
    chapters = book.discover_chapters(root)
    assert book.sync_colab(root, chapters, log=lambda _: None) == [], (
        "book/notebooks/ is stale: run `histomoe book --sync-toc` and commit book/notebooks/")
    repo = book.repository(root)
    for c in chapters:
        nb = nbformat.read(root / colab.NOTEBOOKS_DIR / f"{c.stem}.ipynb", as_version=4)
        assert nb.metadata["accelerator"] == "GPU" and not any(cell.get("outputs") for cell in nb.cells)
        assert "colab" in nb.cells[1].metadata["tags"] and book.parameters_cell(nb) is not None
        # the page's launch link opens exactly this file of the repository
        page = book.page_notebook(c, repo)
        link = page.cells[1].source
        assert "colab-launch" in page.cells[1].metadata["tags"]
        assert colab.colab_url(repo, c.stem).endswith(f"/blob/{repo.branch}/book/notebooks/{c.stem}.ipynb")
        assert colab.colab_url(repo, c.stem) in link and f"--chapter {c.number}" in link
    # a chapter edit makes them stale; the sync rewrites exactly that notebook
    c = chapters[0]
    c.path.write_text(c.path.read_text() + "\n# %%\nprint(1)\n")
    assert book.sync_colab(root, chapters, log=lambda _: None) == [root / colab.NOTEBOOKS_DIR / f"{c.stem}.ipynb"]


# --------------------------------------------------------------------------------------------- the smoke build


def build_smoke_book(base: Path) -> dict:
    """Copy the book to ``base/root`` and build it with the smoke profile and its own HistoMoE home."""
    root = copy_book(base / "root")
    logs: list[str] = []
    with home(base / "home"):
        result = book.build_book("smoke", root=root, keep_going=True, log=logs.append)  # names every failed chapter
    return {
        "root": root, "html": result.html_dir, "home": base / "home", "seconds": result.seconds, "log": logs,
        "runs": [{"stem": r.chapter.stem, "status": r.status, "seconds": r.seconds, "parameters": r.parameters}
                 for r in result.runs],
    }


def test_smoke_book(tmp_path):
    """Builds the smoke book once (the slowest test of the suite) and runs every check on it; one test, so
    that pytest-xdist never builds it twice. Each check reports on its own."""
    info = build_smoke_book(tmp_path / "smoke")
    checks = [check_every_chapter_executed, check_every_chapter_page_exists, check_pages_load_nothing_from_the_internet,
              check_chapter_pages_show_figures, check_notebooks_have_no_errors_and_carry_their_parameters,
              check_notebooks_show_no_paths_of_this_machine, check_figures_fit_the_text_column,
              check_pages_show_one_parameters_cell_and_no_glue, check_rebuild_reuses_cache_and_reruns_one_chapter]
    problems = []
    for check in checks:
        try:
            check(info, tmp_path / check.__name__)
        except AssertionError as exc:
            problems.append(f"{check.__name__}: {exc}")
    print(f"smoke book: {info['seconds']:.0f} s; " + ", ".join(f"{r['stem']} {r['seconds']:.0f} s" for r in info["runs"]))
    assert not problems, "\n\n".join(problems)


def check_every_chapter_executed(smoke_book, tmp_path):
    assert [r["stem"] for r in smoke_book["runs"]] == [c.stem for c in CHAPTERS]
    assert all(r["status"] == "executed" for r in smoke_book["runs"]), smoke_book["runs"]
    warnings = [line for line in smoke_book["log"] if "WARNING" in line]
    assert not warnings, "\n".join(warnings)


def check_every_chapter_page_exists(smoke_book, tmp_path):
    html_dir = smoke_book["html"]
    assert (html_dir / "index.html").is_file() and (html_dir / "book" / "intro.html").is_file()
    assert (html_dir / "book" / "glossary.html").is_file()
    for c in CHAPTERS:
        page = html_dir / book.EXECUTED_DIR / f"{c.stem}.html"
        assert page.is_file(), f"missing page {page}"
        text = page.read_text()
        # every role rendered (a role inside backticks stays literal text: `{glue:text}`x`` shows as code)
        unrendered = re.findall(r"\{(?:glue:text|glue|doc|cite|term)\}", text)
        assert not unrendered, f"{page.name}: unrendered MyST role {unrendered[0]!r}"
        # the "Run this chapter" box links to the committed Colab notebook (book/notebooks/), not to build output
        assert f"colab.research.google.com/github/histomoe/histomoe/blob/main/book/notebooks/{c.stem}.ipynb" in text
        assert "/book/_executed/" not in text.split("colab.research.google.com", 1)[1][:200]


def check_pages_load_nothing_from_the_internet(smoke_book, tmp_path):
    html_dir = smoke_book["html"]
    pages = sorted(html_dir.rglob("*.html"))
    assert len(pages) >= len(CHAPTERS) + 1
    for page in pages:
        text = page.read_text(errors="replace")
        framed = " ".join(html.unescape(m) for m in re.findall(r'srcdoc="([^"]*)"', text))
        for where, body in (("page", text), ("iframe srcdoc", framed)):
            bad = REMOTE.search(body) or CSS_REMOTE.search(body) or REMOTE_CODE.search(body)
            assert bad is None, f"{page.relative_to(html_dir)} ({where}) loads {bad.group(0)[:120]!r}"
        for src in re.findall(r'<img\b[^>]*\bsrc="([^"]+)"', text):
            if not src.startswith("data:"):
                assert (page.parent / src.split("?")[0]).resolve().is_file(), f"{page.name}: image {src} missing"
    for css in html_dir.rglob("*.css"):
        assert not CSS_REMOTE.search(css.read_text(errors="replace")), f"{css.name} imports a remote stylesheet"


def check_chapter_pages_show_figures(smoke_book, tmp_path):
    html_dir = smoke_book["html"]
    figures = {c.stem: len(re.findall(r"<img\b[^>]*src=\"[^\"]*_images/", (html_dir / book.EXECUTED_DIR / f"{c.stem}.html").read_text()))
               for c in CHAPTERS}
    assert figures.get("01_data", 1) >= 6, figures


def check_notebooks_have_no_errors_and_carry_their_parameters(smoke_book, tmp_path):
    executed = smoke_book["root"] / book.EXECUTED_DIR
    for c in CHAPTERS:
        nb = nbformat.read(executed / f"{c.stem}.ipynb", as_version=4)
        errors = [o for cell in nb.cells for o in cell.get("outputs", []) if o.get("output_type") == "error"]
        assert not errors, f"{c.stem}: {errors[0].get('ename')}: {errors[0].get('evalue')}"
        injected = [cell for cell in nb.cells if "injected-parameters" in cell.metadata.get("tags", [])]
        assert len(injected) == 1 and 'profile = "smoke"' in injected[0].source, c.stem
        assert set(book.declared_parameters(book.read_chapter(c))) <= set(book.declared_parameters(
            nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(injected[0].source, metadata={"tags": ["parameters"]})]))), (
            f"{c.stem}: the page's parameters cell does not show every parameter")
        code = [cell for cell in nb.cells if cell.cell_type == "code"]
        assert "colab" in code[0].metadata.get("tags", []), f"{c.stem}: the Colab cell must be the first code cell"
        assert all(cell.get("execution_count") for cell in code if cell.source.strip()), f"{c.stem}: unexecuted cells"


def check_notebooks_show_no_paths_of_this_machine(smoke_book, tmp_path):
    """Outputs must not print local paths (cache folders, site-packages in warnings): the notebooks are published."""
    executed = smoke_book["root"] / book.EXECUTED_DIR
    local = [str(smoke_book["root"]), str(smoke_book["home"]), str(REPO), "site-packages"]
    for c in CHAPTERS:
        nb = nbformat.read(executed / f"{c.stem}.ipynb", as_version=4)
        assert nb.metadata["papermill"]["input_path"] == f"book/chapters/{c.path.name}"
        for i, cell in enumerate(nb.cells):
            for out in cell.get("outputs", []):
                text = json.dumps(out.get("text", "")) + json.dumps(out.get("data", {}).get("text/plain", ""))
                hits = [p for p in local if p in text]
                assert not hits, f"{c.stem} cell {i} prints a local path {hits[0]!r}: {text[:300]}"


def check_figures_fit_the_text_column(smoke_book, tmp_path):
    """Every figure of a chapter page shows at >= 70 % of its size in the text column (histomoe_core.pl.style)."""
    from PIL import Image

    from histomoe_core.pl import style

    html_dir = smoke_book["html"]
    wide = []
    for c in CHAPTERS:
        page = html_dir / book.EXECUTED_DIR / f"{c.stem}.html"
        for src in re.findall(r'<img\b[^>]*\bsrc="([^"]*_images/[^"]+\.png)"', page.read_text()):
            with Image.open((page.parent / src).resolve()) as im:
                if im.width > style.MAX_PX:
                    wide.append(f"{c.stem}: {src.rsplit('/', 1)[-1]} {im.width} px "
                                f"(shown at {style.COLUMN_PX / im.width:.0%})")
    assert not wide, f"figures wider than {style.MAX_PX} px:\n" + "\n".join(wide)


def check_pages_show_one_parameters_cell_and_no_glue(smoke_book, tmp_path):
    """The page shows papermill's injected parameters only, no Colab toggle, and no glue() lines in code."""
    html_dir = smoke_book["html"]
    for c in CHAPTERS:
        text = (html_dir / book.EXECUTED_DIR / f"{c.stem}.html").read_text()
        assert text.count("tag_parameters") == 0 and text.count("tag_injected-parameters") == 1, c.stem
        assert "tag_colab " not in text and 'tag_colab"' not in text, f"{c.stem}: the Colab cell is shown"
        code = " ".join(re.findall(r'<div class="cell_input.*?</pre>', text, flags=re.S))
        assert not re.search(r"\bglue</span><span class=\"p\">\(", code), f"{c.stem}: glue() shown in code"
        assert "histomoe.css" in text, f"{c.stem}: the book's stylesheet is not linked"


def key_changes(home_dir: Path, runs) -> list[str]:
    """What differs between the key parts of re-executed chapters and their earlier cached executions."""
    out = []
    stored = [json.loads(p.read_text()) for p in (home_dir / "cache" / "book").glob("*/key.json")]
    for r in runs:
        if r.status != "executed":
            continue
        now = next(k for k in stored if k["chapter"] == r.chapter.stem and book.cache.content_key(k) == r.key)
        for old in (k for k in stored if k["chapter"] == r.chapter.stem and k is not now):
            diff = {part: sorted(set(flatten(now[part]).items()) ^ set(flatten(old[part]).items()))
                    for part in now if now[part] != old.get(part)}
            out.append(f"{r.chapter.stem} re-executed; key parts that changed: {diff}")
    return out


def flatten(x, prefix: str = "") -> dict:
    if isinstance(x, dict):
        return {k: v for key, val in x.items() for k, v in flatten(val, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): json.dumps(x, sort_keys=True)}


def check_rebuild_reuses_cache_and_reruns_one_chapter(smoke_book, tmp_path):
    """A second run executes nothing; `--chapter NN -p seed=1` re-executes that chapter only, with seed=1."""
    root = copy_book(tmp_path / "copy")
    with home(smoke_book["home"]):
        warm = book.build_book("smoke", root=root, html=False, log=lambda _: None)
        assert {r.status for r in warm.runs} == {"cached"}, key_changes(smoke_book["home"], warm.runs)
        seeded = [r for r in smoke_book["runs"] if "seed" in r["parameters"]]
        fastest = min(seeded, key=lambda r: r["seconds"])["stem"]
        again = book.build_book("smoke", chapters=[fastest[:2]], overrides={"seed": 1}, root=root, html=False,
                                log=lambda _: None)
    status = {r.chapter.stem: r.status for r in again.runs}
    assert status.pop(fastest) == "executed" and set(status.values()) <= {"kept"}, status
    nb = nbformat.read(root / book.EXECUTED_DIR / f"{fastest}.ipynb", as_version=4)
    injected = next(cell for cell in nb.cells if "injected-parameters" in cell.metadata.get("tags", []))
    assert "seed = 1" in injected.source
