"""`elmforest model import`: a GGUF file or a Hugging Face folder into a complete model folder.

The GGUF file is a tiny Llama written in the test (tests/ggufdata.py), so the imported folder can be
compared with the model it came from: same logits, same tokens, and a seed that is those weights.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file

from cli_runner import run_cli
from elmforest.data.tokenizer import load_tokenizer
from elmforest.models.factory import load_model
from ggufdata import TEXT, tiny_llama, tiny_tokenizer, write_gguf
from tinydata import make_corpus, tiny_recipe, write_recipe


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """(model, tokenizer, gguf path) of an untied tiny Llama."""
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok))
    path = write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", model, tok)
    return model, tok, path


@pytest.mark.parametrize("tied", [False, True])
def test_a_gguf_file_imports_to_the_same_model(tmp_path, capsys, tied):
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok), tied=tied, seed=1)
    gguf_path = write_gguf(tmp_path / "m.gguf", model, tok)
    out = tmp_path / "imported"
    code, stdout, err = run_cli(["model", "import", gguf_path, "--out", out], capsys)
    assert code == 0, err
    assert "LlamaForCausalLM" in stdout and f"{sum(p.numel() for p in model.parameters()):,} parameters" in stdout

    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "import.json"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert config["eos_token_id"] == tok.eos_token_id and config["tie_word_embeddings"] == tied
    record = json.loads((out / "import.json").read_text())
    assert record["source_sha256"] == hashlib.sha256(gguf_path.read_bytes()).hexdigest()
    assert record["kind"] == "gguf" and record["dtype"] == "float32"

    imported = load_model(out)  # plain from_pretrained of the folder (checksum verified)
    assert next(imported.parameters()).dtype == torch.float32
    ids = torch.tensor([tok(TEXT[0][:120])["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(imported(ids).logits, model(ids).logits, atol=1e-5, rtol=0)
    reloaded = load_tokenizer(out)
    for text in TEXT:
        assert reloaded(text)["input_ids"] == tok(text)["input_ids"]
    assert reloaded.eos_token == "<|endoftext|>"

    code, stdout, err = run_cli(["check", out], capsys)
    assert code == 0, stdout + err


def test_a_hugging_face_folder_imports_unchanged(tmp_path, capsys):
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok), seed=2)
    model.save_pretrained(str(tmp_path / "hf"))
    tok.save_pretrained(str(tmp_path / "hf"))
    code, _, err = run_cli(["model", "import", tmp_path / "hf", "--out", tmp_path / "out", "--dtype", "bfloat16"], capsys)
    assert code == 0, err
    weights = load_file(str(tmp_path / "out" / "model.safetensors"))
    for k, v in model.state_dict().items():
        assert weights[k].dtype == torch.bfloat16 and torch.equal(weights[k], v.to(torch.bfloat16)), k
    assert json.loads((tmp_path / "out" / "import.json").read_text())["kind"] == "folder"


def test_an_imported_gguf_is_a_seed(source, tmp_path, capsys):
    """model.path takes the folder: with seed_fraction 0 the seed is its weights, and experts train from it."""
    model, tok, gguf_path = source
    folder = tmp_path / "seedmodel"
    assert run_cli(["model", "import", gguf_path, "--out", folder], capsys)[0] == 0
    corpus = make_corpus(tmp_path / "corpus", docs=80)
    recipe = tiny_recipe(corpus, tmp_path / "run", **{
        "budget.total_tokens": 2048, "budget.seed_fraction": 0.0, "optim.eval_every": 0,
        "arms.dense": False, "arms.random_split": False})
    recipe["model"] = {"path": str(folder), "context": 32}
    code, _, err = run_cli(["run", write_recipe(tmp_path / "r.yaml", recipe), "--no-progress"], capsys)
    assert code == 0, err
    seed = load_file(str(tmp_path / "run" / "seed" / "model.safetensors"))
    for k, v in model.state_dict().items():
        assert torch.equal(seed[k], v), k
    expert = load_file(str(tmp_path / "run" / "forest" / "animals" / "model.safetensors"))
    assert not torch.equal(expert["model.embed_tokens.weight"], seed["model.embed_tokens.weight"])  # it trained


def test_bad_sources_are_one_line_errors(source, tmp_path, capsys, monkeypatch):
    _, _, gguf_path = source
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def fails(*argv) -> str:
        code, _, err = run_cli(["model", "import", *argv], capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, err
        return lines[0]

    msg = fails("HuggingFaceTB/SmolLM2-135M", "--out", tmp_path / "hub")
    assert "'HuggingFaceTB/SmolLM2-135M'" in msg and "offline" in msg and not (tmp_path / "hub").exists()
    (tmp_path / "notes.txt").write_text("hello")
    assert "not a GGUF file" in fails(tmp_path / "notes.txt", "--out", tmp_path / "o1")
    assert "not found" in fails(tmp_path / "missing.gguf", "--out", tmp_path / "o2")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    assert "not empty" in fails(gguf_path, "--out", busy)
    assert [p.name for p in busy.iterdir()] == ["keep.txt"] and (busy / "keep.txt").read_text() == "mine"
    assert "--dtype" in fails(gguf_path, "--out", tmp_path / "o3", "--dtype", "int8")
