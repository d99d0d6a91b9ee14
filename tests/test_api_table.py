"""docs/ARCHITECTURE.md's module tables are generated from the code and name only what exists."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

from elmforest.checks import api_table
from elmforest.errors import ElmError

DOC = Path(__file__).resolve().parents[1] / "docs" / "ARCHITECTURE.md"


def _doc_block() -> str:
    text = DOC.read_text(encoding="utf-8")
    block = re.search(r"<!-- api-table:start -->\n(.*?)<!-- api-table:end -->", text, re.S)
    assert block, "docs/ARCHITECTURE.md lacks the generated module tables"
    return block.group(1)


def test_architecture_tables_are_the_generated_ones():
    assert _doc_block() == api_table.api_tables(), (
        "docs/ARCHITECTURE.md's module tables are stale: python -m elmforest.checks.api_table --write docs/ARCHITECTURE.md"
    )


def test_every_name_the_tables_list_exists_in_its_module():
    """Read the tables back from the document and look every name up in the imported module."""
    layer, checked = None, 0
    for line in _doc_block().splitlines():
        if heading := re.match(r"### (\w+) ", line):
            layer = heading.group(1)
        row = re.match(r"\| `(\w+)` \|.*\| (.*) \|$", line)
        if not row:
            continue
        dotted = f"elmforest.{row.group(1)}" if layer == "core" else f"elmforest.{layer}.{row.group(1)}"
        module = importlib.import_module(dotted)
        for name in re.findall(r"`(\w+)(?:\(\))?`", row.group(2)):
            assert hasattr(module, name), f"{dotted} has no {name!r}"
            checked += 1
    assert checked > 200  # the whole table was read
    assert "average_experts" not in _doc_block()  # the name the hand-written table made up


def test_every_module_of_every_layer_has_a_row():
    rows = set(re.findall(r"^\| `(\w+)` \|", _doc_block(), re.M))
    files = {p.stem for layer in api_table.LAYERS for p in api_table.layer_modules(layer)}
    assert files == rows
    assert [h for h in re.findall(r"^### (\w+) ", _doc_block(), re.M)] == api_table.LAYERS


def test_public_api_rules():
    src = '''
"""Doc."""
import os
from x import imported
NAME = "file.json"
REGISTRY: dict[str, int] = {}
CLAIMS = [("a", "b")]
CHOICES = ("x", "y")
OPTION = make_option()
Alias = int
def visible(): ...
def _hidden(): ...
class Thing: ...
class _Private: ...
'''
    assert api_table.public_api(ast.parse(src)) == ["REGISTRY", "CLAIMS", "visible()", "Thing"]
    assert api_table.public_api(ast.parse(src + '__all__ = ["Thing", "visible"]\n')) == ["Thing", "visible"]


def test_first_sentence_keeps_abbreviations_and_escapes_pipes():
    assert api_table.first_sentence("Anchored experts (FlexOlmo, Shi et al. 2025): a copy. More.") == (
        "Anchored experts (FlexOlmo, Shi et al. 2025): a copy")
    assert api_table.first_sentence("Pick a or b, e.g. a | b.\n\nLater.") == "Pick a or b, e.g. a \\| b"
    assert api_table.first_sentence(None) == ""


def test_write_replaces_only_the_block(tmp_path):
    doc = tmp_path / "A.md"
    doc.write_text(f"head\n{api_table.START}\nSTALE ROW\n{api_table.END}\ntail\n", encoding="utf-8")
    api_table.main(["--write", str(doc)])
    text = doc.read_text(encoding="utf-8")
    assert text.startswith(f"head\n{api_table.START}\n### core") and text.endswith(f"{api_table.END}\ntail\n")
    assert "STALE ROW" not in text
    doc.write_text("no markers\n", encoding="utf-8")
    with pytest.raises(ElmError, match="markers"):
        api_table.main(["--write", str(doc)])
