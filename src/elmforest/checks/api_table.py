"""docs/ARCHITECTURE.md's module table, generated from the code: one table per layer.

Each module's row is its concept (the first sentence of its docstring) and its key API: the names
in its `__all__` when it has one, else its public top-level classes, functions and registries
(UPPER_CASE names bound to a dict or list display), in source order. The source is read with
`ast`, nothing is imported, so the table costs nothing to build and cannot name a function that
does not exist. Regenerate after adding, renaming or splitting a module:

    python -m elmforest.checks.api_table --write docs/ARCHITECTURE.md

(without `--write` it prints the tables). The tables sit between the `api-table` markers;
`tests/test_api_table.py` fails while the file holds another table than the code gives.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

from elmforest import storage
from elmforest.errors import ElmError

PACKAGE = Path(__file__).resolve().parents[1]
# The layers, lowest first (tests/test_imports.py enforces that imports only go down this list);
# "core" is the modules directly in src/elmforest.
LAYERS = ["core", "data", "models", "train", "launch", "combine", "btm", "cbtm", "mixtures", "study", "checks", "cli"]
CORE = ("The modules directly in `src/elmforest`, which every layer may use: user errors, atomic writes, "
        "the commands' console and the typed recipe.")
START, END = "<!-- api-table:start -->", "<!-- api-table:end -->"


def first_sentence(doc: str | None) -> str:
    """The docstring's first sentence (up to a full stop or its first paragraph's end), one line."""
    if not doc:
        return ""
    para = " ".join(doc.strip().split("\n\n")[0].split())
    match = re.search(r"(?<!e\.g)(?<!i\.e)(?<! al)\.(\s|$)", para)
    return (para[: match.start()] if match else para).replace("|", "\\|").strip()


def _is_registry(value: ast.expr) -> bool:
    """A dict or list display: a registry (`LAUNCHERS`, `POSTERIORS`, ...) or a table (`CLAIMS`)."""
    return isinstance(value, (ast.Dict, ast.List, ast.DictComp, ast.ListComp))


def public_api(tree: ast.Module) -> list[str]:
    """The module's key names: `__all__`, else public classes, functions (as `name()`) and registries."""
    names: list[str] = []
    for node in tree.body:
        targets: list[tuple[str, ast.expr | None]] = []
        if isinstance(node, ast.Assign):
            targets = [(t.id, node.value) for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            targets = [(node.target.id, node.value)]
        for name, value in targets:
            if name == "__all__" and isinstance(value, (ast.List, ast.Tuple)):
                return [str(ast.literal_eval(e)) for e in value.elts]
            if name.isupper() and not name.startswith("_") and value is not None and _is_registry(value):
                names.append(name)
        if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            names.append(node.name)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
            names.append(f"{node.name}()")
    return names


def layer_modules(layer: str, package: Path = PACKAGE) -> list[Path]:
    """The module files of one layer, by name (a subpackage's `__init__` and `__main__` left out)."""
    folder = package if layer == "core" else package / layer
    if not folder.is_dir():
        raise ElmError(f"layer {layer!r} has no folder", folder)
    return sorted(p for p in folder.glob("*.py") if p.stem not in ("__init__", "__main__"))


def module_row(path: Path) -> tuple[str, str, list[str]]:
    """(module name, concept, key API) of one module file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    return path.stem, first_sentence(ast.get_docstring(tree)), public_api(tree)


def api_tables(package: Path = PACKAGE) -> str:
    """The markdown of every layer's table, lowest layer first."""
    out: list[str] = []
    for layer in LAYERS:
        if layer == "core":
            out.append("### core (`elmforest.*`)\n")
            out.append(CORE + "\n")
        else:
            init = package / layer / "__init__.py"
            doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))) if init.is_file() else None
            out.append(f"### {layer} (`elmforest.{layer}`)\n")
            if doc:
                out.append(" ".join(doc.split("\n\n")[0].split()) + "\n")
        out += ["| module | concept | key API |", "|---|---|---|"]
        for path in layer_modules(layer, package):
            name, concept, api = module_row(path)
            out.append(f"| `{name}` | {concept} | {', '.join(f'`{a}`' for a in api)} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def replace_block(text: str, tables: str) -> str:
    """`text` with the part between the api-table markers replaced by `tables`."""
    if START not in text or END not in text:
        raise ElmError(f"the file has no {START} ... {END} markers to put the table between")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{tables}{END}{tail}"


def main(argv: list[str]) -> None:
    if argv[:1] == ["--write"] and len(argv) == 2:
        path = Path(argv[1])
        storage.write_text(path, replace_block(path.read_text(encoding="utf-8"), api_tables()))
        print(f"wrote the module tables into {path}")
    elif not argv:
        print(api_tables(), end="")
    else:
        raise SystemExit("usage: python -m elmforest.checks.api_table [--write docs/ARCHITECTURE.md]")


if __name__ == "__main__":
    main(sys.argv[1:])
