"""How an executed chapter looks as a page: one parameters cell, no Colab install cell, no ``glue()``
bookkeeping in the displayed code. The executed notebook keeps every cell's source (tags hide cells), and the
Colab notebooks are not touched."""
from __future__ import annotations

import ast
import re
from pathlib import Path

#: tags that hide a cell in the HTML page (the executed notebook keeps the cell, Colab's copy is untouched)
REMOVE_CELL, REMOVE_INPUT = "remove-cell", "remove-input"


def _glue_lines(source: str) -> set[int]:
    """0-based line numbers of top-level ``glue(...)`` calls and ``from myst_nb import glue`` in ``source``."""
    try:
        tree = ast.parse(source)
    except SyntaxError:  # magics (%time ...): leave the cell as it is
        return set()
    lines: set[int] = set()
    for node in tree.body:
        is_import = (isinstance(node, ast.ImportFrom) and node.module == "myst_nb"
                     and [a.name for a in node.names] == ["glue"])
        if is_import or _only_glue(node):
            lines.update(range(node.lineno - 1, node.end_lineno))
    return lines


def _only_glue(node: ast.stmt) -> bool:
    """A ``glue(...)`` call, or a ``for`` / ``if`` / ``with`` block whose statements are all glue calls."""
    if isinstance(node, ast.Expr):
        call = node.value
        return isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "glue"
    if isinstance(node, (ast.For, ast.If, ast.With)):
        body = [*node.body, *getattr(node, "orelse", [])]
        return bool(body) and all(_only_glue(b) for b in body)
    return False


#: first line of the parameters cell a page shows (the chapter's declarations with this page's values)
MERGED_HEADER = "# Parameters: the chapter's defaults, with the values this page was executed with"


def _assignments(source: str) -> dict[str, tuple[int, int]]:
    """Top-level ``name = ...`` statements of ``source``: name -> (first, last) 0-based line."""
    out = {}
    for node in ast.parse(source).body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        for t in targets:
            if isinstance(t, ast.Name):
                out[t.id] = (node.lineno - 1, node.end_lineno - 1)
    return out


def merged_parameters(defaults: str, injected: str) -> str:
    """The chapter's parameters cell (its comments included) with each injected assignment in place of the
    default: what the page's code ran with, every parameter shown once."""
    new = _assignments(injected)
    inj_lines = injected.splitlines()
    lines = defaults.splitlines()
    spans = {a: b for a, b in _assignments(defaults).values()}
    by_start = {start: name for name, (start, _) in _assignments(defaults).items()}
    out, i = [MERGED_HEADER], 0
    while i < len(lines):
        name = by_start.get(i)
        if name in new:
            a, b = new[name]
            out.extend(inj_lines[a:b + 1])
            i = spans[i] + 1
            continue
        out.append(lines[i])
        i += 1
    extra = [n for n in new if n not in by_start.values()]
    for n in extra:  # injected but not declared (papermill injects whatever it is given)
        a, b = new[n]
        out.extend(inj_lines[a:b + 1])
    return "\n".join(out)


def page_layout(nb) -> bool:
    """Prepare an executed notebook for its HTML page (idempotent); True when something changed.

    - one parameters cell per page: papermill's ``injected-parameters`` cell shows the chapter's parameters
      cell (comments included) with the injected values in place of the defaults (:func:`merged_parameters`),
      and the chapter's own cell is removed from the page;
    - the Colab install cell (it does nothing outside Colab) is removed instead of shown as an empty toggle;
    - ``glue()`` bookkeeping is taken out of the displayed input: a cell that only glues disappears (its
      outputs, if any, stay), a cell that computes and glues shows the computation only.
    """
    changed = False
    code = [c for c in nb.cells if c.cell_type == "code"]
    for prev, cell in zip(code, code[1:]):
        tags, prev_tags = cell.metadata.get("tags", []), prev.metadata.get("tags", [])
        if "injected-parameters" in tags and "parameters" in prev_tags and not cell.source.startswith(MERGED_HEADER):
            try:
                cell.source = merged_parameters(prev.source, cell.source)
                changed = True
            except SyntaxError:
                pass
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        tags = list(cell.metadata.get("tags", []))
        add = []
        if ("parameters" in tags and "injected-parameters" not in tags) or "colab" in tags:
            add = [REMOVE_CELL]
        else:
            drop = _glue_lines(cell.source)
            if drop:
                kept = [line for i, line in enumerate(cell.source.splitlines()) if i not in drop]
                text = re.sub(r"\n{3,}", "\n\n", "\n".join(kept)).strip("\n")
                if not any(line.strip() and not line.lstrip().startswith("#") for line in text.splitlines()):
                    add = [REMOVE_INPUT] if cell.get("outputs") else [REMOVE_CELL]
                elif text != cell.source:
                    cell.source = text
                    changed = True
        for t in add:
            if t not in tags:
                tags.append(t)
        if tags != list(cell.metadata.get("tags", [])):
            cell.metadata["tags"] = tags
            changed = True
    return changed


def layout_file(path: Path) -> bool:
    """:func:`page_layout` on a notebook file, rewritten only when it changes."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    if not page_layout(nb):
        return False
    nbformat.write(nb, path)
    return True
