"""The package's modules form layers: no import circle, counting imports inside functions too.

A circle (a imports b, b imports a, perhaps through others) means two concepts that cannot be
read, tested or reused apart; a function-level import only hides it from Python's import
machinery, not from the reader. The graph is read from the source with `ast`, so it sees every
`import elmforest.x` / `from elmforest(.x) import y` statement wherever it stands, except those
under `if TYPE_CHECKING:` (a type named in annotations only: `launchers` takes a `LauncherConfig`
while `config` checks `launcher.kind` against the `launchers` registry).
"""

from __future__ import annotations

import ast
from pathlib import Path

import elmforest

PACKAGE = Path(elmforest.__file__).parent


def module_names(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under the package folder `root`."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = (root.name, *path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the package's modules it imports anywhere in its source (module or function level).

    `from pkg import name` counts as importing `pkg.name` when that is a module, else `pkg`."""
    modules = module_names(root)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        typing_only = {  # `if TYPE_CHECKING:` imports name types for annotations; nothing runs them
            id(n) for block in ast.walk(tree)
            if isinstance(block, ast.If) and isinstance(block.test, ast.Name) and block.test.id == "TYPE_CHECKING"
            for n in ast.walk(block)
        }
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: strip level-1 trailing parts of the package
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for target in targets:
                # `import a.b.c` imports a, a.b and a.b.c; the deepest module of ours is what matters
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != module:
                    graph[module].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None (depth-first search, white/grey/black)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_package_has_no_import_cycle():
    graph = import_graph(PACKAGE)
    assert len(graph) > 30 and "elmforest.commands.grow" in graph  # the whole package was read
    assert "elmforest.phases" in graph["elmforest.study"]  # module-level imports are seen
    assert "elmforest.rounds" in graph["elmforest.study"]  # and imports inside functions
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_a_cycle_through_a_function_level_import_is_found(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "low.py").write_text("import os\n\n\ndef f():\n    from pkg.sub import high\n    return high\n")
    (pkg / "sub" / "high.py").write_text("from .. import mid\n")
    (pkg / "mid.py").write_text("from pkg.low import f\n")
    (pkg / "leaf.py").write_text("from pkg import low\n")
    graph = import_graph(pkg)
    assert graph["pkg.sub.high"] == {"pkg.mid"} and graph["pkg.leaf"] == {"pkg.low"}
    assert find_cycle(graph) == ["pkg.low", "pkg.sub.high", "pkg.mid", "pkg.low"]
    (pkg / "low.py").write_text("import os\n")
    assert find_cycle(import_graph(pkg)) is None
