"""`elmforest check RUN` on real studies with every arm on: healthy folders pass, and each kind of
folder is held to its own rules (a DEMix model, a BTX Mixtral, the seed, the dense run, the
forests, the evaluation caches and plots), so a broken part is reported, one line naming the file.

Two tiny studies (2 train domains, 1 novel, context 32, ~6 s each): GPT-2 with the dense,
random-split and DEMix arms (the `make demo` arms), and llama with those plus BTX.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cli_runner import run_cli
from elmforest.models.checkpoint import write_safetensors
from elmforest.cli import main
from tinydata import make_corpus, tiny_recipe, write_recipe

torch.set_num_threads(1)
ARMS = {"arms.dense": True, "arms.random_split": True, "arms.demix": True}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("check-studies")
    corpus = make_corpus(root / "corpus")
    out = {}
    for name, extra in (("gpt2", {}), ("llama", {"model.family": "llama", "arms.btx": True, "arms.btx_tokens": 512})):
        recipe = tiny_recipe(corpus, root / name, **ARMS, **extra)
        main(["run", str(write_recipe(root / f"{name}.yaml", recipe)), "--no-progress"])
        out[name] = root / name
    return out


def copy_run(runs: dict[str, Path], name: str, tmp_path: Path) -> Path:
    target = tmp_path / name
    shutil.copytree(runs[name], target, ignore=shutil.ignore_patterns(".run.lock"))
    return target


def edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def problems(run: Path, capsys) -> tuple[int, list[str]]:
    """`elmforest check RUN` -> (exit status, problem lines with the run folder's path removed)."""
    code, _, err = run_cli(["check", run], capsys)
    assert "Traceback" not in err
    prefix = "elmforest: problem: "
    return code, [line.removeprefix(prefix).replace(f"{run}/", "") for line in err.splitlines() if line.startswith(prefix)]


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_check_passes_on_a_fresh_study_with_every_arm(runs, name, capsys):
    run = runs[name]
    assert (run / "demix" / "demix.json").is_file() and (run / "random_forest" / "forest.json").is_file()
    code, out, err = run_cli(["check", run], capsys)
    assert (code, err) == (0, ""), err
    checked = {line.removeprefix("checked ") for line in out.splitlines() if line.startswith("checked ")}
    parts = {"DEMix model": "demix", "seed": "seed", "dense run": "dense", "forest": "random_forest",
             "tokenizer": "tokenizer", "expert": "random_experts/random1"}
    if name == "llama":
        parts["BTX model"] = "btx"
    for kind, folder in parts.items():
        assert f"{kind} {run / folder}" in checked
    assert out.strip().endswith(f"ok: run folder {run}")


def test_demix_weights_are_checked_as_a_demix_model(runs, tmp_path, capsys):
    run = copy_run(runs, "gpt2", tmp_path)
    weights = run / "demix" / "model.safetensors"
    tensors = load_file(weights)
    # The DEMix layout: every layer's MLP once per domain, named ...mlp.experts.<j>...
    assert "transformer.h.0.mlp.experts.1.c_fc.bias" in tensors and "transformer.h.0.mlp.c_fc.bias" not in tensors

    data = bytearray(weights.read_bytes())
    data[-8] ^= 0x10  # a flipped bit inside the last tensor
    weights.write_bytes(bytes(data))
    assert problems(run, capsys) == (2, ["demix/model.safetensors: checkpoint corrupt: checksum mismatch"])

    # A valid safetensors file (its checksum holds) without domain 1's MLPs: not a 2-domain DEMix model.
    write_safetensors({k: v for k, v in tensors.items() if ".mlp.experts.1." not in k}, weights)
    code, lines = problems(run, capsys)
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith("demix/model.safetensors: weights do not match config.json as a DEMix model of 2 "
                               "domains (missing tensor 'transformer.h.0.mlp.experts.1.")

    write_safetensors(tensors, weights)  # the original tensors again: healthy
    assert problems(run, capsys) == (0, [])
    edit_json(run / "demix" / "demix.json", lambda d: d.update(n_domains=3, domains=["animals", "code", "numbers"]))
    code, lines = problems(run, capsys)
    assert code == 2
    assert "demix/demix.json: domains ['animals', 'code', 'numbers'] differ from the recipe's train_domains " \
           "['animals', 'code']" in lines
    assert any(line.startswith("demix/model.safetensors: weights do not match config.json as a DEMix model of 3 "
                               "domains (missing tensor 'transformer.h.0.mlp.experts.2.") for line in lines)


def test_a_demix_run_mid_training_is_valid(runs, tmp_path, capsys):
    """Before demix.json is written the folder is a training run with DEMix weights: not a problem."""
    run = copy_run(runs, "gpt2", tmp_path)
    demix = run / "demix"
    (demix / "demix.json").unlink()
    (demix / "demix_run.json").unlink()
    edit_json(demix / "train.json", lambda d: d.update(status="running"))
    assert problems(run, capsys) == (0, [])
    code, out, _ = run_cli(["check", demix], capsys)
    assert code == 0 and f"ok: training run {demix}" in out


def test_demix_run_json_params_must_be_the_models(runs, tmp_path, capsys):
    run = copy_run(runs, "gpt2", tmp_path)
    recorded = json.loads((run / "demix" / "demix_run.json").read_text())["params"]
    # Independently: the dense seed's parameters plus one more GPT-2 MLP per layer for the second
    # domain (c_fc: H x 4H + 4H, c_proj: 4H x H + H).
    config = json.loads((run / "seed" / "config.json").read_text())
    seed = load_file(run / "seed" / "model.safetensors")
    h = config["n_embd"]
    assert recorded == sum(t.numel() for t in seed.values()) + config["n_layer"] * (8 * h * h + 5 * h)
    edit_json(run / "demix" / "demix_run.json", lambda d: d.update(params=recorded + 1))
    assert problems(run, capsys) == (2, [
        f"demix/demix_run.json: params {recorded + 1} differs from the {recorded} of a DEMix model of 2 domains",
        f"demix/arm.json: field 'params_at_inference' is {recorded}, but the arm's own files say {recorded + 1}",
    ])


def test_btx_folder_rules(runs, tmp_path, capsys):
    run = copy_run(runs, "llama", tmp_path)
    btx = run / "btx"
    edit_json(btx / "mix.json", lambda d: d.update(top_k=1, experts=["code", "animals"]))
    assert problems(run, capsys) == (2, [
        "btx/mix.json: experts ['code', 'animals'] differ from the forest's ['animals', 'code']",
        "btx/mix.json: top_k 1 differs from config.json's num_experts_per_tok 2",
    ])
    shutil.rmtree(btx)
    shutil.copytree(runs["llama"] / "btx", btx)
    tensors = load_file(btx / "model.safetensors")
    name = next(k for k in sorted(tensors) if ".mlp.experts." in k)  # an expert tensor, whatever the layout
    del tensors[name]
    save_file(tensors, str(btx / "model.safetensors"), metadata={"format": "pt"})
    code, lines = problems(run, capsys)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("btx/model.safetensors: ") and name in lines[0]
    (btx / "mix.json").unlink()  # a build killed before mix.json: a leftover the next run rebuilds
    code, out, err = run_cli(["check", run], capsys)
    assert (code, err) == (0, "") and f"leftover (harmless; remove with --clean): {btx}" in out


def test_seed_dense_forest_eval_and_plot_rules(runs, tmp_path, capsys):
    run = copy_run(runs, "gpt2", tmp_path)
    seed_step = json.loads((run / "seed" / "seed.json").read_text())["step"]
    tok = json.loads((run / "seed" / "seed.json").read_text())["tokenizer_hash"]
    edit_json(run / "seed" / "seed.json", lambda d: d.update(step=seed_step + 1))
    edit_json(run / "dense" / "dense.json", lambda d: d.update(tokenizer_hash="0" * 16))
    edit_json(run / "random_forest" / "forest.json", lambda d: d["experts"][0].update(name="random7"))
    edit_json(run / "eval" / "code.json", lambda d: d["nll"].update(dense=float("nan")))
    (run / "plots" / "prior_btm.png").write_bytes(b"GIF89a")
    code, lines = problems(run, capsys)
    assert code == 2
    assert sorted(lines) == sorted([
        f"seed/seed.json: step {seed_step + 1} differs from train_state.pt's {seed_step}",
        f"dense/dense.json: tokenizer_hash {'0' * 16} differs from the folder's own {tok}",
        f"dense/dense.json: tokenizer_hash {'0' * 16} differs from the run's tokenizer/ ({tok})",
        "random_forest/forest.json: experts[0] (random7, domain random0) is not one of random0..random1",
        "eval/code.json: field 'nll' must map each method to a finite number",
        "plots/prior_btm.png: not a PNG image",
    ])
