"""Untrusted files: nothing elmforest reads can run code or write outside its folder.

Weights load only from safetensors; `torch.load` always has weights_only=True; remote code is
never trusted; YAML is only safe-loaded; domain and expert names never escape their folder.
The source checks grep the package, so a new call site that breaks a rule fails here.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from elmforest.data.corpus import check_domain_name
from elmforest.data.corpus_import import import_sources
from elmforest.errors import ElmError
from elmforest.combine.forest import Forest, read_expert
from elmforest.models.factory import ModelSpec, build_model, load_model, save_model

SRC = Path(__file__).resolve().parents[1] / "src" / "elmforest"


def sources() -> list[tuple[Path, str]]:
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 20  # the package is there
    return [(p, p.read_text(encoding="utf-8")) for p in files]


def calls(text: str, name: str) -> list[str]:
    """The argument text of every `name(` call, up to its matching parenthesis."""
    out = []
    for m in re.finditer(re.escape(name) + r"\(", text):
        depth, i = 1, m.end()
        while depth and i < len(text):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        out.append(text[m.end() : i - 1])
    return out


def test_torch_load_is_always_weights_only():
    found = 0
    for path, text in sources():
        for args in calls(text, "torch.load"):
            found += 1
            assert re.search(r"weights_only\s*=\s*True", args), f"{path}: torch.load({args}) without weights_only=True"
    assert found >= 1  # checkpoint.load_train_state


def test_remote_code_is_never_trusted():
    for path, text in sources():
        assert not re.search(r"trust_remote_code\s*=\s*(True|[a-z_]+\b(?<!False))", text), path


def test_yaml_is_only_safe_loaded():
    """safe_load, or load with a loader that builds only plain values (BaseLoader: strings only)."""
    for path, text in sources():
        for m in re.finditer(r"yaml\.(\w+)\(", text):
            if m.group(1) in ("load", "load_all"):
                args = calls(text[m.start():], f"yaml.{m.group(1)}")[0]
                assert re.search(r"Loader\s*=\s*yaml\.(BaseLoader|SafeLoader|CSafeLoader)\b", args), f"{path}: {args}"
            else:
                assert m.group(1) in ("safe_load", "safe_dump", "safe_load_all", "safe_dump_all"), f"{path}: yaml.{m.group(1)}"
        assert "pickle.load" not in text, path


def tiny_model(path: Path) -> Path:
    model = build_model(ModelSpec(family="gpt2", layers=2, width=32, heads=2, context=16, vocab_size=64), seed=0)
    save_model(model, path)
    return path


def test_a_pickle_checkpoint_is_refused(tmp_path):
    folder = tiny_model(tmp_path / "m")
    model = load_model(folder)  # the safetensors folder loads
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ElmError, match="model.safetensors"):
        load_model(folder)


@pytest.mark.parametrize("name", ["../x", "..", "a/b", "/etc", "", ".hidden", "a\\b", "x" * 65, "a..b"])
def test_unsafe_names_are_refused(name):
    with pytest.raises(ElmError, match="unsafe domain name"):
        check_domain_name(name)


def forest_with(tmp_path: Path, entry: dict) -> Path:
    forest = tmp_path / "forest"
    forest.mkdir()
    (forest / "forest.json").write_text(json.dumps(
        {"format": "elmforest-forest/1", "tokenizer_hash": "t", "arch_hash": "a", "experts": [entry]}
    ))
    return forest


def test_forest_entries_cannot_escape_the_forest(tmp_path):
    tiny_model(tmp_path / "x")  # a real model folder beside the forest, reachable via ../x
    forest = forest_with(tmp_path, {"name": "../x", "domain": "d", "path": "../x"})
    with pytest.raises(ElmError, match="unsafe domain name '../x'"):
        Forest(forest)
    forest_json = forest / "forest.json"
    forest_json.write_text(forest_json.read_text().replace('"name": "../x"', '"name": "x"'))
    with pytest.raises(ElmError, match="escapes the forest folder"):
        Forest(forest)
    forest_json.write_text(forest_json.read_text().replace('"path": "../x"', f'"path": "{tmp_path / "x"}"'))
    with pytest.raises(ElmError, match="escapes the forest folder"):
        Forest(forest)


def test_expert_json_name_cannot_escape(tmp_path):
    folder = tiny_model(tmp_path / "e")
    (folder / "expert.json").write_text(json.dumps(
        {"name": "../../evil", "domain": "d", "tokenizer_hash": "t", "arch_hash": "a"}
    ))
    with pytest.raises(ElmError, match="unsafe domain name"):
        read_expert(folder)


def test_remove_never_deletes_outside_the_forest(tmp_path):
    outside = tiny_model(tmp_path / "keep")
    forest = forest_with(tmp_path, {"name": "keep", "domain": "d", "path": "../keep"})
    with pytest.raises(ElmError):
        Forest(forest).remove("keep")
    assert (outside / "model.safetensors").is_file()


@pytest.mark.parametrize("filename", ["..jsonl", ".jsonl", "a b.jsonl", "-.jsonl"])
def test_import_refuses_unsafe_file_names(tmp_path, filename):
    src = tmp_path / filename
    src.write_text('{"text": "a document"}\n')
    with pytest.raises(ElmError, match="unsafe domain name"):
        import_sources([src], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_import_of_a_symlinked_folder_uses_the_link_target_name_safely(tmp_path):
    (tmp_path / "..weird").mkdir()
    (tmp_path / "..weird" / "a.txt").write_text("a document")
    with pytest.raises(ElmError, match="unsafe domain name"):
        import_sources([tmp_path / "..weird"], tmp_path / "out")
    shutil.rmtree(tmp_path / "..weird")
