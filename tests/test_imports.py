"""The package's folders are its layers: imports go down the layer map, never up or round.

A circle (a imports b, b imports a, perhaps through others) means two concepts that cannot be
read, tested or reused apart; a function-level import only hides it from Python's import
machinery, and an import under `if TYPE_CHECKING:` only from the interpreter, not from the reader.
The graph is read from the source with `ast`, so it sees every `import elmforest.x` /
`from elmforest(.x) import y` statement wherever it stands, in functions and under
`TYPE_CHECKING` alike, and `LAYERS` says which way each may point. No exception list.
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
        for node in ast.walk(tree):
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


# The layers, lowest first: a module may import its own layer's modules and those of lower layers.
# "core" is the modules directly in src/elmforest (errors, storage, console, config).
LAYERS = ["core", "data", "models", "train", "launch", "combine", "btm", "cbtm", "mixtures", "study", "checks", "cli"]


def layer_of(module: str, package: Path = PACKAGE) -> str:
    """elmforest.train.loop -> "train"; elmforest.errors and elmforest itself -> "core"."""
    parts = module.split(".")
    if len(parts) == 1 or (package / parts[1]).with_suffix(".py").is_file():
        return "core"
    return parts[1]


def upward_imports(graph: dict[str, set[str]], package: Path = PACKAGE) -> list[str]:
    """Every `a -> b` where b's layer stands above a's in LAYERS (or is not in the map)."""
    rank = {name: i for i, name in enumerate(LAYERS)}
    bad = []
    for a, targets in sorted(graph.items()):
        for b in sorted(targets):
            la, lb = layer_of(a, package), layer_of(b, package)
            if la not in rank or lb not in rank or rank[lb] > rank[la]:
                bad.append(f"{a} ({la}) -> {b} ({lb})")
    return bad


def test_the_package_has_no_import_cycle():
    graph = import_graph(PACKAGE)
    assert len(graph) > 30 and "elmforest.cli.grow" in graph  # the whole package was read
    assert "elmforest.btm.seed" in graph["elmforest.study.run"]  # module-level imports are seen
    assert "elmforest.study.rounds" in graph["elmforest.study.run"]  # and imports inside functions
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_follow_the_layer_map():
    graph = import_graph(PACKAGE)
    assert {layer_of(m) for m in graph} == set(LAYERS)  # every folder is a layer of the map, and each has modules
    assert upward_imports(graph) == []


def test_the_tree_shows_the_layers():
    subpackages = [p for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()]
    modules = [p for p in PACKAGE.glob("*.py") if p.name != "__init__.py"]
    assert len(subpackages) >= 6 and len(modules) <= 8
    for sub in subpackages:  # each folder says what it holds in a paragraph
        doc = ast.get_docstring(ast.parse((sub / "__init__.py").read_text(encoding="utf-8")))
        assert doc and len(doc) > 80, f"{sub.name}/__init__.py needs a docstring"


def test_an_upward_import_is_found_even_under_type_checking(tmp_path):
    pkg = tmp_path / "elmforest"
    for sub in ("data", "train"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "errors.py").write_text("")
    (pkg / "train" / "loop.py").write_text("from elmforest.data import corpus\nfrom elmforest import errors\n")
    (pkg / "data" / "corpus.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from elmforest.train.loop import x\n")
    graph = import_graph(pkg)
    assert graph["elmforest.data.corpus"] == {"elmforest.train.loop"}
    assert upward_imports(graph, pkg) == ["elmforest.data.corpus (data) -> elmforest.train.loop (train)"]


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
