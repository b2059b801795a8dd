"""What an executed chapter depends on, for its cache key: the ``histomoe_core`` modules its code imports (followed
transitively through static imports, and through attributes of lazily loading packages such as ``pl.routing``),
the package's data files, and the dataset manifests it names."""
from __future__ import annotations

import ast
import hashlib
import json
import re
from pathlib import Path
from typing import Mapping

PACKAGE = "histomoe_core"


def _module_file(name: str, pkg_root: Path) -> Path | None:
    rel = Path(*name.split("."))
    for cand in (pkg_root / rel.with_suffix(".py"), pkg_root / rel / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def _imports(path: Path, module: str) -> set[str]:
    """Every module named by an import anywhere in ``path`` (function-local imports included)."""
    is_pkg = path.name == "__init__.py"
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parent = base[: len(base) - node.level + 1]
                mod = ".".join(parent + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)  # `from pkg import submodule`
    return found


def module_closure(modules: set[str], pkg_root: Path) -> dict[str, Path]:
    """The ``histomoe_core`` modules that importing ``modules`` runs: their static imports, followed
    transitively, plus every parent package's ``__init__``."""
    out: dict[str, Path] = {}
    todo = [m for m in modules if m == PACKAGE or m.startswith(PACKAGE + ".")]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            mod = ".".join(parts[:i])
            if mod in out:
                continue
            path = _module_file(mod, pkg_root)
            if path is None:
                continue  # an attribute (`from pkg import func`), not a module
            out[mod] = path
            todo.extend(m for m in _imports(path, mod) if m.startswith(PACKAGE + ".") or m == PACKAGE)
    return out


def _sha(text: str | bytes) -> str:
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()[:16]


def chapter_imports(nb) -> set[str]:
    """Modules named by import statements in the chapter's code cells (IPython magics skipped), plus the modules
    behind attributes of imported ``histomoe_core`` packages (``pl.routing``, ``tl.load_run``: packages that load
    their submodules on first use)."""
    mods: set[str] = set()
    aliases: dict[str, str] = {}  # local name -> module it is bound to
    trees = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        code = "\n".join(line for line in cell.source.splitlines() if not line.lstrip().startswith(("%", "!")))
        try:
            trees.append(ast.parse(code))
        except SyntaxError:
            continue
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods.update(a.name for a in node.names)
                aliases.update({a.asname: a.name for a in node.names if a.asname})
            elif isinstance(node, ast.ImportFrom) and node.module:
                mods.add(node.module)
                mods.update(f"{node.module}.{a.name}" for a in node.names)
                aliases.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names})
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
                owner = aliases[node.value.id]
                if owner == PACKAGE or owner.startswith(PACKAGE + "."):
                    mods.add(_defining_module(owner, node.attr))
    return mods


def _defining_module(module: str, attr: str) -> str:
    """The module that defines ``module.attr`` (a submodule, or where a re-exported object was defined)."""
    import importlib

    try:
        obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        return f"{module}.{attr}"
    if isinstance(obj, type(importlib)):
        return obj.__name__
    return getattr(obj, "__module__", None) or module


def package_root() -> Path:
    """The folder that holds the ``histomoe_core`` package."""
    import importlib.util

    return Path(importlib.util.find_spec(PACKAGE).origin).resolve().parents[1]


def code_fingerprint_for(nb, pkg_root: Path | None = None) -> dict[str, str]:
    """Hash of each package module the chapter depends on, and of the package's data files."""
    pkg_root = package_root() if pkg_root is None else Path(pkg_root)
    closure = module_closure(chapter_imports(nb), pkg_root)
    files = {name: _sha(path.read_bytes()) for name, path in sorted(closure.items())}
    pkg_dir = pkg_root / PACKAGE
    for data in sorted(p for p in pkg_dir.rglob("*") if p.is_file() and p.suffix in (".yaml", ".yml", ".json", ".txt")):
        files[str(data.relative_to(pkg_root))] = _sha(data.read_bytes())
    return files


def manifests_for(source: str, params: Mapping) -> dict[str, str]:
    """Hashes of the dataset manifests the chapter names, in its source or in a parameter value."""
    from histomoe_core.data.manifests import manifests_dir

    text = source + "\n" + json.dumps(params, default=str)
    out = {}
    for path in sorted(manifests_dir().glob("*.yaml")):
        if re.search(rf"\b{re.escape(path.stem)}\b", text):
            out[path.stem] = _sha(path.read_bytes())
    return out
