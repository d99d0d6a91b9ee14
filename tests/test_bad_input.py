"""Bad input across commands: exit status 2, one line on stderr naming the culprit, no traceback,
and nothing that existed before the command is modified.

Each row of `CASES` builds its bad input inside a fresh folder (from a shared tiny corpus,
tokenizer, expert and forest), runs the CLI in-process and checks the contract. One row also
runs as a real subprocess to check the exit status end to end.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from elmforest import cli
from elmforest.data.corpus import Corpus, DomainSource, write_corpus
from elmforest.errors import ElmError
from elmforest.combine.forest import Forest
from elmforest.models.factory import ModelSpec, arch_hash, build_model, save_model
from elmforest.data.tokenizer import load_tokenizer, tokenizer_hash, train_tokenizer, vocab_size

WORDS = {
    "alpha": "sun moon star sky cloud rain wind light dark night day".split(),
    "beta": "code line file loop test data type list call value error".split(),
}
RECIPE = {
    "train_domains": ["alpha", "beta"],
    "model": {"size": "tiny", "context": 32},
    "budget": {"total_tokens": 4096, "seed_fraction": 0.5, "batch_tokens": 128},
    "optim": {"threads": 1},
    "launcher": {"kind": "sequential"},
    "arms": {"random_split": False},
}


def documents(domain: str, n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS[domain]) for _ in range(rng.randint(20, 40))) + f" {i}" for i in range(n)]


def make_expert(folder: Path, tok: Path, name: str, width: int = 64) -> Path:
    """A tiny untrained expert folder: weights, config, tokenizer files and expert.json."""
    spec = ModelSpec(family="gpt2", layers=2, width=width, heads=2, context=32, vocab_size=vocab_size(load_tokenizer(tok)))
    model = build_model(spec, seed=0)
    save_model(model, folder, tokenizer_dir=tok)
    meta = {"name": name, "domain": name, "parents": "seed", "tokens": 0, "flops": 0, "steps": 0,
            "tokenizer_hash": tokenizer_hash(tok), "arch_hash": arch_hash(model.config)}
    (folder / "expert.json").write_text(json.dumps(meta))
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("world")
    write_corpus(root / "corpus", [DomainSource(d, documents(d, 200, i)) for i, d in enumerate(WORDS)])
    train_tokenizer(Corpus(root / "corpus"), list(WORDS), 300, root / "tok")
    make_expert(root / "alpha", root / "tok", "alpha")
    make_expert(root / "narrow", root / "tok", "narrow", width=32)
    forest = Forest.create(root / "forest", root / "tok", tokenizer_hash(root / "tok"), arch_hash_of(root / "alpha"))
    forest.merge(root / "alpha")
    return root


def arch_hash_of(expert: Path) -> str:
    return json.loads((expert / "expert.json").read_text())["arch_hash"]


# --- helpers building bad inputs ------------------------------------------------------------


def copy(world: Path, name: str, tmp: Path) -> Path:
    shutil.copytree(world / name, tmp / name)
    return tmp / name


def recipe(tmp: Path, corpus: Path, **sections) -> Path:
    data = json.loads(json.dumps(RECIPE))
    data["corpus"] = str(corpus)
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key].update(value)
        elif value is None:
            data.pop(key, None)
        else:
            data[key] = value
    import yaml

    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def corrupt_line(corpus: Path, domain: str, split: str, lineno: int, raw: bytes) -> Path:
    path = corpus / domain / f"{split}.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    lines[lineno - 1] = raw + b"\n"
    path.write_bytes(b"".join(lines))
    return path


def edit_json(path: Path, fn: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def shrink_split(corpus: Path, domain: str, split: str, text: str) -> None:
    """Make one split a single short document and record it in the manifest."""
    (corpus / domain / f"{split}.jsonl").write_text(json.dumps({"text": text}) + "\n")
    edit_json(corpus / "manifest.json", lambda m: m["domains"][domain]["splits"].update(
        {split: {"documents": 1, "bytes": len(text)}}))


# --- the table ------------------------------------------------------------------------------
# Each builder gets (world, tmp) and returns (argv, strings the error line must contain).

Case = Callable[[Path, Path], tuple[list[str], list[str]]]


def _import(tmp: Path, name: str, data: bytes) -> tuple[list[str], list[str]]:
    src = tmp / name
    src.write_bytes(data)
    return ["corpus", "import", str(src), "--out", str(tmp / "out")], [str(src)]


def case_import_missing(w, tmp):
    return ["corpus", "import", str(tmp / "nope.jsonl"), "--out", str(tmp / "out")], ["nope.jsonl", "not found"]


def case_import_bad_json(w, tmp):
    argv, needles = _import(tmp, "news.jsonl", b'{"text": "a"}\nnot json\n')
    return argv, needles + ["line 2: bad JSON", "--skip-bad-lines"]


def case_import_missing_field(w, tmp):
    argv, needles = _import(tmp, "news.jsonl", b'{"body": "a document"}\n')
    return argv, needles + ["line 1: no field 'text'"]


def case_import_not_utf8(w, tmp):
    argv, needles = _import(tmp, "news.jsonl", b'{"text": "caf\xe9"}\n')
    return argv, needles + ["line 1: not UTF-8"]


def case_import_binary(w, tmp):
    argv, needles = _import(tmp, "news.jsonl", b"\x7fELF\x00\x00\x01binary")
    return argv, needles + ["binary"]


def case_import_empty_domain(w, tmp):
    argv, needles = _import(tmp, "news.jsonl", b"")
    return argv, needles + ["zero usable documents"]


def case_import_dotdot_name(w, tmp):
    argv, needles = _import(tmp, "..jsonl", b'{"text": "x"}\n')
    return argv, needles + ["unsafe domain name"]


def case_import_hidden_empty_name(w, tmp):
    argv, needles = _import(tmp, ".jsonl", b'{"text": "x"}\n')
    return argv, needles + ["unsafe domain name"]


def case_import_space_in_name(w, tmp):
    argv, needles = _import(tmp, "my news.jsonl", b'{"text": "x"}\n')
    return argv, needles + ["unsafe domain name", "'my news'"]


def case_import_duplicate_domain(w, tmp):
    (tmp / "a").mkdir()
    (tmp / "b").mkdir()
    for d in ("a", "b"):
        (tmp / d / "news.jsonl").write_text('{"text": "x"}\n')
    argv = ["corpus", "import", str(tmp / "a" / "news.jsonl"), str(tmp / "b" / "news.jsonl"), "--out", str(tmp / "out")]
    return argv, [str(tmp / "b" / "news.jsonl"), "'news'"]


def case_import_into_existing(w, tmp):
    (tmp / "out").mkdir()
    (tmp / "out" / "keep.txt").write_text("mine")
    argv, needles = _import(tmp, "news.jsonl", b'{"text": "x"}\n')
    return argv, [str(tmp / "out"), "not empty"]


def _tokenizer_on(tmp: Path, corpus: Path) -> list[str]:
    return ["tokenizer", "train", str(corpus), "--vocab-size", "300", "--out", str(tmp / "tok")]


def case_tokenizer_bad_json_split(w, tmp):
    corpus = copy(w, "corpus", tmp)
    path = corrupt_line(corpus, "alpha", "train", 3, b'{"text": "unterminated')
    return _tokenizer_on(tmp, corpus), [str(path), "line 3", "not valid JSON"]


def case_tokenizer_missing_field_split(w, tmp):
    corpus = copy(w, "corpus", tmp)
    path = corrupt_line(corpus, "beta", "train", 2, b'{"content": "x"}')
    return _tokenizer_on(tmp, corpus), [str(path), "line 2", "'text'"]


def case_tokenizer_not_utf8_split(w, tmp):
    corpus = copy(w, "corpus", tmp)
    path = corrupt_line(corpus, "alpha", "train", 1, b'{"text": "\xff\xfe"}')
    return _tokenizer_on(tmp, corpus), [str(path), "line 1", "UTF-8"]


def case_tokenizer_binary_split(w, tmp):
    corpus = copy(w, "corpus", tmp)
    path = corpus / "alpha" / "train.jsonl"
    path.write_bytes(bytes(range(256)) * 4)
    return _tokenizer_on(tmp, corpus), [str(path), "line 1"]


def case_tokenizer_missing_corpus(w, tmp):
    return _tokenizer_on(tmp, tmp / "nowhere"), [str(tmp / "nowhere"), "not found"]


def case_tokenizer_malformed_manifest(w, tmp):
    corpus = copy(w, "corpus", tmp)
    (corpus / "manifest.json").write_text('{"domains": ')
    return _tokenizer_on(tmp, corpus), [str(corpus / "manifest.json"), "not valid JSON"]


def _run(tmp: Path, path: Path, *extra: str) -> list[str]:
    return ["run", str(path), "--out", str(tmp / "run"), "--no-progress", *extra]


def case_run_missing_recipe(w, tmp):
    return _run(tmp, tmp / "missing.yaml"), [str(tmp / "missing.yaml"), "not found"]


def case_run_recipe_not_yaml(w, tmp):
    path = tmp / "recipe.yaml"
    path.write_text("budget: [unclosed\n")
    return _run(tmp, path), [str(path), "YAML"]


def case_run_unknown_key(w, tmp):
    path = recipe(tmp, w / "corpus", budget={"total_tokenz": 10})
    return _run(tmp, path), [str(path), "budget.total_tokenz", "unknown key"]


def case_run_wrong_type(w, tmp):
    path = recipe(tmp, w / "corpus", budget={"total_tokens": "lots"})
    return _run(tmp, path), [str(path), "budget.total_tokens"]


def case_run_negative_budget(w, tmp):
    path = recipe(tmp, w / "corpus", budget={"total_tokens": -5})
    return _run(tmp, path), [str(path), "budget.total_tokens", "greater than 0"]


def case_run_zero_batch(w, tmp):
    path = recipe(tmp, w / "corpus", budget={"batch_tokens": 0})
    return _run(tmp, path), [str(path), "budget.batch_tokens"]


def case_run_seed_fraction_one(w, tmp):
    path = recipe(tmp, w / "corpus", budget={"seed_fraction": 1.0})
    return _run(tmp, path), [str(path), "budget.seed_fraction", "less than 1"]


def case_run_seed_fraction_negative(w, tmp):
    path = recipe(tmp, w / "corpus", budget={"seed_fraction": -0.1})
    return _run(tmp, path), [str(path), "budget.seed_fraction"]


def case_run_batch_not_dividing(w, tmp):
    path = recipe(tmp, w / "corpus", budget={"batch_tokens": 96})  # 96 = 3 x 32 tokens for 2 domains
    return _run(tmp, path), [str(path), "budget.batch_tokens=96", "context x train domains"]


def case_run_too_few_steps(w, tmp):
    path = recipe(tmp, w / "corpus", budget={"total_tokens": 128})
    return _run(tmp, path), [str(path), "budget.total_tokens=128", "need >= 2"]


def case_run_duplicate_domain(w, tmp):
    path = recipe(tmp, w / "corpus", train_domains=["alpha", "alpha"])
    return _run(tmp, path), [str(path), "train_domains", "duplicate domain 'alpha'"]


def case_run_unknown_domain(w, tmp):
    path = recipe(tmp, w / "corpus", train_domains=["alpha", "gamma"])
    return _run(tmp, path), ["'gamma'", "not in corpus"]


def case_run_unsafe_domain(w, tmp):
    path = recipe(tmp, w / "corpus", train_domains=["alpha", "../beta"])
    return _run(tmp, path), ["'../beta'"]


def case_run_set_unknown_key(w, tmp):
    path = recipe(tmp, w / "corpus")
    return _run(tmp, path, "--set", "budget.nope=1"), ["budget.nope", "no key"]


def case_run_set_no_subkeys(w, tmp):
    path = recipe(tmp, w / "corpus")
    return _run(tmp, path, "--set", "corpus.path=x"), ["corpus.path", "'corpus' has no sub-keys"]


def case_run_empty_valid_split(w, tmp):
    corpus = copy(w, "corpus", tmp)
    shrink_split(corpus, "alpha", "valid", "x")
    edit_json(corpus / "manifest.json", lambda m: m["domains"]["alpha"]["splits"]["valid"].update(documents=0))
    (corpus / "alpha" / "valid.jsonl").write_text("")
    return _run(tmp, recipe(tmp, corpus)), [str(corpus), "'alpha'", "no valid documents"]


def case_run_valid_split_too_short(w, tmp):
    corpus = copy(w, "corpus", tmp)
    shrink_split(corpus, "beta", "valid", "code line file loop test")  # ~10 tokens < context 32
    return _run(tmp, recipe(tmp, corpus, tokenizer={"path": str(w / "tok")})), [
        "domain 'beta' valid split", "13 tokens", "context 32"]


def case_run_tokenizer_missing_files(w, tmp):
    tok = copy(w, "tok", tmp)
    (tok / "tokenizer_config.json").unlink()
    return _run(tmp, recipe(tmp, w / "corpus", tokenizer={"path": str(tok)})), [str(tok), "tokenizer_config.json"]


def case_run_model_path_without_weights(w, tmp):
    model = copy(w, "alpha", tmp)
    (model / "model.safetensors").unlink()
    return _run(tmp, recipe(tmp, w / "corpus", model={"path": str(model), "size": None})), [str(model), "model.safetensors"]


def case_ls_malformed_forest(w, tmp):
    forest = copy(w, "forest", tmp)
    (forest / "forest.json").write_text('{"format": "elmforest-forest/1", "experts": [')
    return ["ls", str(forest)], [str(forest / "forest.json"), "not valid JSON"]


def case_ls_missing_expert(w, tmp):
    forest = copy(w, "forest", tmp)
    shutil.rmtree(forest / "alpha")
    return ["ls", str(forest)], [str(forest / "forest.json"), "missing expert folder 'alpha'"]


def case_ls_wrong_format(w, tmp):
    forest = copy(w, "forest", tmp)
    edit_json(forest / "forest.json", lambda d: d.update(format="something/9"))
    return ["ls", str(forest)], [str(forest / "forest.json"), "'format'"]


def case_ls_not_a_forest(w, tmp):
    return ["ls", str(tmp)], [str(tmp / "forest.json"), "missing"]


def case_remove_missing_expert_entry(w, tmp):
    forest = copy(w, "forest", tmp)
    shutil.rmtree(forest / "alpha")
    return ["remove", str(forest), "alpha"], [str(forest / "forest.json"), "missing expert folder"]


def case_remove_unknown_name(w, tmp):
    forest = copy(w, "forest", tmp)
    return ["remove", str(forest), "zeta"], [str(forest), "no expert 'zeta'"]


def case_merge_other_tokenizer(w, tmp):
    forest = copy(w, "forest", tmp)
    expert = copy(w, "alpha", tmp)
    edit_json(expert / "expert.json", lambda d: d.update(name="other", tokenizer_hash="0123456789abcdef"))
    return ["merge", str(forest), str(expert)], [str(expert / "expert.json"), "tokenizer 0123456789abcdef differs"]


def case_merge_other_architecture(w, tmp):
    forest = copy(w, "forest", tmp)
    return ["merge", str(forest), str(w / "narrow")], [str(w / "narrow" / "expert.json"), "architecture"]


def case_merge_without_weights(w, tmp):
    forest = copy(w, "forest", tmp)
    expert = copy(w, "alpha", tmp)
    (expert / "model.safetensors").unlink()
    return ["merge", str(forest), str(expert)], [str(expert), "no model.safetensors"]


def case_merge_truncated_weights(w, tmp):
    forest = copy(w, "forest", tmp)
    expert = copy(w, "alpha", tmp)
    edit_json(expert / "expert.json", lambda d: d.update(name="beta"))
    os.truncate(expert / "model.safetensors", 1000)
    return ["merge", str(forest), str(expert)], [str(expert / "model.safetensors"), "truncated"]


def case_merge_flipped_byte(w, tmp):
    expert = copy(w, "alpha", tmp)
    edit_json(expert / "expert.json", lambda d: d.update(name="beta"))
    weights = expert / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0x01
    weights.write_bytes(bytes(data))
    return ["merge", str(tmp / "newforest"), str(expert)], [str(weights), "checksum mismatch"]


def case_merge_bad_expert_json(w, tmp):
    forest = copy(w, "forest", tmp)
    expert = copy(w, "alpha", tmp)
    edit_json(expert / "expert.json", lambda d: d.pop("arch_hash"))
    return ["merge", str(forest), str(expert)], [str(expert / "expert.json"), "'arch_hash'"]


def case_merge_unsafe_name(w, tmp):
    forest = copy(w, "forest", tmp)
    return ["merge", str(forest), str(w / "alpha"), "--name", "../escape"], ["'../escape'", "unsafe"]


def case_check_missing(w, tmp):
    return ["check", str(tmp / "nothing")], [str(tmp / "nothing"), "not found"]


def case_check_unknown_folder(w, tmp):
    return ["check", str(tmp)], [str(tmp), "not an elmforest folder"]


CASES: dict[str, Case] = {name.removeprefix("case_"): fn for name, fn in globals().items() if name.startswith("case_")}


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file below `root`. Token caches (CORPUS/.cache) and the token counts a
    corpus manifest records are caches, not content, so they are left out."""
    out = {}
    for p in sorted(root.rglob("*")):
        if not p.is_file() or ".cache" in p.relative_to(root).parts or p.name.endswith(".lock"):
            continue
        data = p.read_bytes()
        if p.name == "manifest.json":
            try:
                manifest = json.loads(data)
                for dom in manifest.get("domains", {}).values():
                    for stats in dom.get("splits", {}).values():
                        stats.pop("tokens", None)
                data = json.dumps(manifest, sort_keys=True).encode()
            except (ValueError, AttributeError):
                pass
        out[str(p.relative_to(root))] = hashlib.sha256(data).hexdigest()
    return out


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """`elmforest ARGV` in-process -> (exit status, stderr); an escaping exception is a traceback."""
    capsys.readouterr()
    try:
        cli.main(argv)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        print(traceback.format_exc(), file=sys.stderr)
        code = 1
    return code, capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_clear_line_and_changes_nothing(name, world, tmp_path, capsys):
    argv, needles = CASES[name](world, tmp_path)
    before = {root: tree_digest(root) for root in (world, tmp_path)}
    code, err = run_cli(argv, capsys)
    assert "Traceback" not in err, err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("elmforest: error: ")
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    for root, digest in before.items():
        after = tree_digest(root)
        changed = sorted(k for k in digest if after.get(k) != digest[k])
        assert not changed, f"{name} modified {changed}"


def test_debug_shows_the_traceback(world, tmp_path, capsys):
    with pytest.raises(ElmError, match="not found"):
        cli.main(["--debug", "check", str(tmp_path / "nothing")])


def test_exit_status_end_to_end_in_a_real_process(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "elmforest.cli", "corpus", "import", str(tmp_path / "x.jsonl"), "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr == f"elmforest: error: {tmp_path / 'x.jsonl'}: source not found\n"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_source(tmp_path, capsys):
    src = tmp_path / "news.jsonl"
    src.write_text('{"text": "x"}\n')
    src.chmod(0)
    code, err = run_cli(["corpus", "import", str(src), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and str(src) in err and "Traceback" not in err


# --- averaging weights (the library; `elmforest average` maps the same ElmErrors to exit 2) -----


@pytest.mark.parametrize(
    "weights, needle",
    [
        ([-0.5, 1.5], "negative"),
        ([0.3, 0.3], "sum"),
        ({"alpha": 0.5, "zeta": 0.5}, "zeta"),
        ([1.0], "2"),
    ],
)
def test_bad_averaging_weights_are_refused_before_writing(world, tmp_path, weights, needle):
    from elmforest.combine.averaging import average_folders

    second = tmp_path / "beta"
    shutil.copytree(world / "alpha", second)
    with pytest.raises(ElmError, match=needle):
        average_folders([world / "alpha", second], weights, "weighted", tmp_path / "avg")
    assert not (tmp_path / "avg").exists()


# --- `elmforest check` reports every problem, one line each ---------------------------------


def test_check_passes_on_sound_folders_and_cleans_leftovers(world, tmp_path, capsys):
    forest = copy(world, "forest", tmp_path)
    leftover = forest / "alpha" / ".model.safetensors.abc123.tmp"
    leftover.write_bytes(b"half a file")
    for folder in (world / "corpus", world / "tok", world / "alpha", forest):
        code, err = run_cli(["check", str(folder)], capsys)
        assert (code, err) == (0, "")
    code, _ = run_cli(["check", str(forest), "--clean"], capsys)
    assert code == 0 and not leftover.exists()


def test_check_lists_every_problem_naming_the_file(world, tmp_path, capsys):
    forest = copy(world, "forest", tmp_path)
    shutil.copytree(forest / "alpha", forest / "beta")
    edit_json(forest / "beta" / "expert.json", lambda d: d.update(name="beta", arch_hash="0" * 16))
    edit_json(forest / "forest.json", lambda d: d["experts"].extend(
        [{"name": "beta", "domain": "beta", "path": "beta"}, {"name": "gone", "domain": "g", "path": "gone"}]))
    weights = forest / "alpha" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-4] ^= 0x10
    weights.write_bytes(bytes(data))
    code, err = run_cli(["check", str(forest)], capsys)
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert any(f"{weights}: checkpoint corrupt: checksum mismatch" in line for line in lines)
    assert any(f"{forest / 'beta' / 'expert.json'}: arch_hash 0000000000000000 differs" in line for line in lines)
    assert any(f"{forest / 'forest.json'}: experts[2] (gone) references a missing expert folder" in line for line in lines)
    assert len(lines) == 4  # beta's arch_hash differs from config.json's and from forest.json's


def test_check_corpus_counts_and_split_lines(world, tmp_path, capsys):
    corpus = copy(world, "corpus", tmp_path)
    edit_json(corpus / "manifest.json", lambda m: m["domains"]["alpha"]["splits"]["test"].update(documents=999))
    bad = corrupt_line(corpus, "beta", "valid", 2, b"{oops")
    code, err = run_cli(["check", str(corpus)], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 2
    assert f"{corpus / 'alpha' / 'test.jsonl'}: holds" in lines[0] and "manifest.json says 999" in lines[0]
    assert f"{bad}: line 2: not valid JSON" in lines[1]
