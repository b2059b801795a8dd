"""MyST to plain Markdown for the Colab notebooks (``book/notebooks/``): Colab renders neither roles nor directives.

At export time only (the rendered book keeps MyST): ``{doc}`` becomes a Markdown link, ``{cite}`` an "Author (year)"
citation from the book's BibTeX file, admonitions a bold label over a blockquote, and ``{glue:text}`name``` shows
the name (```name```); a small code cell inserted once the glued values are computed prints them
(:func:`histomoe_core.colab.show_glued`).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping, Sequence

#: a role: {name}`content`
ROLE = re.compile(r"\{(?P<name>[a-z][\w:+-]*)\}`(?P<body>[^`]+)`")
#: the opening line of a directive: ```{name} argument  or  :::{name} argument
FENCE = re.compile(r"^(?P<fence>`{3,}|:{3,})\{(?P<name>[\w:+-]+)\}[ \t]*(?P<arg>.*)$")
#: a glue(...) call in a code cell, and the name it glues (an f-string's fields become wildcards)
GLUE_CALL = re.compile(r"""\bglue\(\s*(?P<f>f?)(?P<q>["'])(?P<name>[^"']+)(?P=q)""")
ADMONITIONS = {"note", "tip", "hint", "important", "warning", "caution", "attention", "danger", "error", "seealso"}
TITLED = {"admonition", "dropdown", "topic", "sidebar", "margin"}
LABELS = {"seealso": "See also"}
#: tag of the inserted cells that print glued values
VALUES_TAG = "colab-values"


# --------------------------------------------------------------------------------------------- citations


def _latex_text(s: str) -> str:
    import codecs

    import latexcodec  # noqa: F401 (registers the "ulatex" codec)

    return codecs.decode(s, "ulatex").replace("{", "").replace("}", "").strip()


def _citation(entry) -> str:
    """``Author (year)``, ``A and B (year)`` or ``A et al. (year)``, linked to the DOI or arXiv entry if any."""
    names = [_latex_text(" ".join(p.last_names)) for p in entry.persons.get("author", [])] or ["Anonymous"]
    who = names[0] if len(names) == 1 else " and ".join(names) if len(names) == 2 else f"{names[0]} et al."
    text = f"{who} ({entry.fields.get('year', 'n.d.')})"
    f = entry.fields
    url = f"https://doi.org/{f['doi']}" if "doi" in f else f.get("url")
    if not url and f.get("archivePrefix", "").lower() == "arxiv" and "eprint" in f:
        url = f"https://arxiv.org/abs/{f['eprint']}"
    return f"[{text}]({url})" if url else text


def load_references(paths: Sequence[Path]) -> dict[str, str]:
    """BibTeX key -> Markdown citation, from the book's ``.bib`` files."""
    from pybtex.database import parse_file

    out: dict[str, str] = {}
    for path in paths:
        for key, entry in parse_file(str(path)).entries.items():
            out[key] = _citation(entry)
    return out


# --------------------------------------------------------------------------------------------- markdown


def _blockquote(label: str, body: Sequence[str]) -> list[str]:
    return [f"> **{label}**", ">", *(f"> {line}".rstrip() for line in body)]


def _render(name: str, arg: str, body: list[str]) -> list[str]:
    """Plain Markdown for one directive (its options already dropped)."""
    if name in ("code", "code-block", "code-cell", "sourcecode"):
        return [f"```{arg}", *body, "```"]
    if name == "math":
        return ["$$", *body, "$$"]
    if name in ("figure", "image"):
        return [f"![{' '.join(line.strip() for line in body if line.strip())}]({arg})"]
    if name in TITLED:
        return _blockquote(arg or name.capitalize(), body)
    return _blockquote(LABELS.get(name, name.capitalize()), [arg, *body] if arg else body)


def _options_dropped(body: list[str]) -> list[str]:
    """A directive's content without its leading ``:key: value`` options or ``---`` YAML block."""
    if body and body[0].strip() == "---" and "---" in (b.strip() for b in body[1:]):
        body = body[[b.strip() for b in body].index("---", 1) + 1:]
    while body and re.match(r"^\s*:[\w-]+:", body[0]):
        body = body[1:]
    return body


def directives_to_markdown(text: str) -> str:
    """Replace every fenced MyST directive (nested ones too) by plain Markdown."""
    lines, out, i = text.split("\n"), [], 0
    while i < len(lines):
        m = FENCE.match(lines[i].strip())
        if not m:
            out.append(lines[i])
            i += 1
            continue
        fence = m["fence"]
        close = re.compile(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        end = next((j for j in range(i + 1, len(lines)) if close.match(lines[j])), len(lines))
        body = directives_to_markdown("\n".join(_options_dropped(lines[i + 1:end]))).split("\n")
        out.extend(_render(m["name"], m["arg"].strip(), body))
        i = end + 1
    return "\n".join(out)


def _title_target(body: str) -> tuple[str | None, str]:
    m = re.fullmatch(r"(?s)(.*?)\s*<([^<>]+)>", body.strip())
    return (m[1], m[2]) if m and m[1] else (None, body.strip())


def roles_to_markdown(text: str, links: Mapping[str, tuple[str, str]],
                      references: Mapping[str, str]) -> tuple[str, list[str]]:
    """Replace every MyST role by plain Markdown; returns the text and the glue specs (``name[:format]``) it quotes.

    ``links`` maps a page (a chapter's stem) to its title and address; ``references`` a BibTeX key to its citation.
    """
    quoted: list[str] = []

    def one(m: re.Match) -> str:
        name, body = m["name"], m["body"]
        if name == "glue" or name.startswith("glue:"):
            quoted.append(body.strip())
            return f"`{body.split(':', 1)[0].strip()}`"
        if name.startswith("cite"):
            return "; ".join(references.get(k.strip(), k.strip()) for k in body.split(","))
        if name == "math":
            return f"${body}$"
        title, target = _title_target(body)
        if name == "doc":
            page, url = links.get(Path(target).name, (None, None))
            return f"[{title or page or target}]({url})" if url else (title or page or target)
        return title or target  # ref, numref, term, abbr, ...: the text the book would show

    return ROLE.sub(one, text), list(dict.fromkeys(quoted))


# --------------------------------------------------------------------------------------------- notebooks


def _glued_at(cells: Sequence) -> tuple[dict[str, int], list[tuple[re.Pattern, int]]]:
    """Index of the first code cell gluing each name; f-string names as (pattern, index)."""
    exact: dict[str, int] = {}
    patterns: list[tuple[re.Pattern, int]] = []
    for i, cell in enumerate(cells):
        if cell.cell_type != "code":
            continue
        for m in GLUE_CALL.finditer(cell.source):
            if m["f"] and "{" in m["name"]:
                parts = re.split(r"\{[^}]*\}", m["name"])
                patterns.append((re.compile(".+".join(map(re.escape, parts))), i))
            else:
                exact.setdefault(m["name"], i)
    return exact, patterns


def _ready_at(spec: str, at: int, exact: Mapping[str, int], patterns) -> int:
    """The first cell (from ``at`` on) after which the quoted name has been glued (``at`` when no cell glues it)."""
    name = spec.split(":", 1)[0].strip()
    i = exact.get(name, next((j for p, j in patterns if p.fullmatch(name)), None))
    return at if i is None else max(at, i)


def values_cell(specs: Sequence[str], *, near: bool = True):
    """The code cell that prints the glued values a passage quotes (``near``: no other text between them)."""
    import nbformat

    args = [f'"{s}"' for s in specs]
    call = f"show_glued({', '.join(args)})"
    if len(call) > 100:
        call = "show_glued(\n" + "".join(f"    {a},\n" for a in args) + ")"
    note = "# the values quoted in the text above" if near else "# values an earlier passage quotes, computed by now"
    return nbformat.v4.new_code_cell(f"{note}\n{call}", metadata={"tags": [VALUES_TAG]})


def _values_cells(groups: Sequence[tuple[bool, list[str]]]) -> list:
    """The values cells under one cell: the passage just above it first, then earlier passages (no value twice)."""
    shown: set[str] = set()
    cells = []
    for far, group in sorted(groups, key=lambda g: g[0]):
        if new := [s for s in group if s not in shown]:
            cells.append(values_cell(new, near=not far))
            shown.update(new)
    return cells


def notebook_to_markdown(nb, links: Mapping[str, tuple[str, str]], references: Mapping[str, str]) -> bool:
    """Convert every markdown cell of ``nb`` in place, and print the glued values each passage quotes: a
    :func:`values_cell` right under it for those already computed, and one after each later code cell that glues
    others. Returns whether any value is quoted."""
    exact, patterns = _glued_at(nb.cells)
    after: dict[int, list] = {}
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "markdown":
            continue
        cell.source, specs = roles_to_markdown(directives_to_markdown(cell.source), links, references)
        by_cell: dict[int, list[str]] = {}
        for spec in specs:
            by_cell.setdefault(_ready_at(spec, i, exact, patterns), []).append(spec)
        for at, group in by_cell.items():  # far: other text comes between the passage and its values
            far = any(c.cell_type == "markdown" for c in nb.cells[i + 1:at + 1])
            after.setdefault(at, []).append((far, group))
    nb.cells = [c for i, cell in enumerate(nb.cells) for c in (cell, *_values_cells(after.get(i, [])))]
    return bool(after)
