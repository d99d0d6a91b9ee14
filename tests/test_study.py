"""End to end: `elmforest run` on a tiny recipe, then a second run that trains nothing."""

from __future__ import annotations

import json
import math

import pytest

from elmforest.cli import main
from tinydata import make_corpus, tiny_recipe, write_recipe

METHODS = [
    "seed",
    "dense",
    "btm_ensemble_uniform",
    "btm_ensemble_cached",
    "btm_ensemble_cached_top1",
    "btm_ensemble_cached_top2",
    "btm_average_uniform",
    "btm_average_posterior",
    "random_ensemble_cached",
]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    corpus = make_corpus(root / "corpus")
    out = root / "run"
    recipe = write_recipe(root / "recipe.yaml", tiny_recipe(corpus, out))
    main(["run", str(recipe), "--no-progress"])
    return recipe, out


def test_results_have_every_method_and_domain(study):
    _, out = study
    results = json.loads((out / "results.json").read_text())
    from elmforest.study.recipe import load_recipe
    from elmforest.study.arms import study_methods

    enabled = [m.name for m in study_methods(load_recipe(out / "recipe.yaml"))]
    assert set(METHODS) <= set(enabled) and all(m in results for m in enabled)  # every enabled method is a row
    cache = {d: json.loads((out / "eval" / f"{d}.json").read_text()) for d in ("animals", "code", "numbers")}
    for m in METHODS:
        row = results[m]
        assert set(row["train"]) == {"animals", "code"} and set(row["novel"]) == {"numbers"}
        # each perplexity is exp of the mean NLL per token, the same as exp(sum of document sums / tokens)
        for d, ppl in [*row["train"].items(), *row["novel"].items()]:
            assert ppl == pytest.approx(math.exp(cache[d]["nll"][m]), rel=1e-9)
            assert ppl == pytest.approx(math.exp(sum(cache[d]["doc_nll"][m]) / sum(cache[d]["doc_tokens"])), rel=1e-6)
            assert sum(cache[d]["doc_tokens"]) == cache[d]["tokens"]
        assert row["train_mean"] == pytest.approx(math.sqrt(row["train"]["animals"] * row["train"]["code"]), rel=1e-9)
        assert row["novel_mean"] == pytest.approx(row["novel"]["numbers"], rel=1e-9)
        assert 1.0 < row["train_mean"] < results["unigram"]["train_mean"]
        assert row["train_flops"] > 0 and row["inference_params"] > 0
    # the models learn: dense is far below the unigram perplexity on the same tokens
    assert results["dense"]["train_mean"] < results["seed"]["train_mean"] < results["unigram"]["train_mean"]
    # a one-expert-per-domain top-1 ensemble runs one model; the full ensemble runs all
    assert results["btm_ensemble_cached_top1"]["inference_params"] == results["dense"]["inference_params"]
    assert results["btm_ensemble_cached"]["inference_params"] == 2 * results["dense"]["inference_params"]
    # cached priors are distributions over the experts
    for arm, priors in results["priors"].items():
        for domain, prior in priors.items():
            assert abs(sum(prior.values()) - 1.0) < 1e-9, (arm, domain)


def test_compute_is_matched(study):
    _, out = study
    budget = json.loads((out / "results.json").read_text())["budget"]
    dense, btm, rnd = (budget["arms"][a]["flops"] for a in ("dense", "btm", "random"))
    assert abs(btm - dense) / dense < 0.01
    assert abs(rnd - dense) / dense < 0.01
    assert budget["arms"]["btm"]["tokens"] == budget["arms"]["dense"]["tokens"]
    assert budget["arms"]["seed"]["tokens"] * 2 == budget["arms"]["dense"]["tokens"]
    # the random-split experts draw from the seed's domain-balanced mixture, with the BTM experts' steps and batch
    for i, domain in enumerate(("animals", "code")):
        job = json.loads((out / "random_experts" / f"random{i}" / "job.json").read_text())
        assert job["data"]["mix"] == "balanced" and job["data"]["domains"] == ["animals", "code"]
        rnd = json.loads((out / "random_experts" / f"random{i}" / "expert.json").read_text())
        btm = json.loads((out / "experts" / domain / "expert.json").read_text())
        assert (rnd["steps"], rnd["tokens"]) == (btm["steps"], btm["tokens"])


def test_report_and_plots_exist(study):
    _, out = study
    report = (out / "report.md").read_text()
    assert "| dense |" in report and "btm_ensemble_cached" in report
    for png in ("prior_btm.png", "ppl_vs_compute.png"):
        data = (out / "plots" / png).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 1000
        assert f"plots/{png}" in report


def test_forest_experts_load_with_transformers(study):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, out = study
    forest = json.loads((out / "forest" / "forest.json").read_text())
    assert [e["domain"] for e in forest["experts"]] == ["animals", "code"]
    folder = out / "forest" / forest["experts"][0]["path"]
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok("the cat sat", return_tensors="pt").input_ids
    assert model(ids).logits.shape[-1] == model.config.vocab_size
    meta = json.loads((folder / "expert.json").read_text())
    assert meta["parents"] == "seed" and meta["tokens"] > 0 and meta["final_valid_loss"] > 0


def test_second_run_trains_nothing(study, capsys):
    recipe, out = study
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("model.safetensors")}
    before = json.loads((out / "results.json").read_text())
    main(["run", str(recipe), "--no-progress"])
    after = json.loads((out / "results.json").read_text())
    assert {p: p.stat().st_mtime_ns for p in out.rglob("model.safetensors")} == stamps
    assert after["dense"] == before["dense"] and after["btm_ensemble_cached"] == before["btm_ensemble_cached"]
    assert "training" not in capsys.readouterr().out


def test_run_refuses_a_folder_of_another_recipe(study, tmp_path, capsys):
    import yaml

    recipe, out = study
    data = yaml.safe_load(recipe.read_text())
    data["budget"]["total_tokens"] = 12288
    other = write_recipe(tmp_path / "other.yaml", data)
    with pytest.raises(SystemExit) as e:
        main(["run", str(other), "--no-progress"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "budget" in err[0]


def test_changing_eval_settings_rescores_without_training(study, tmp_path):
    import yaml

    recipe, out = study
    data = yaml.safe_load(recipe.read_text())
    data["eval"]["max_tokens_per_domain"] = 500
    other = write_recipe(tmp_path / "eval.yaml", data)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("model.safetensors")}
    main(["run", str(other), "--no-progress"])
    results = json.loads((out / "results.json").read_text())
    assert {p: p.stat().st_mtime_ns for p in out.rglob("model.safetensors")} == stamps
    assert all(n <= 500 for n in results["budget"]["eval_tokens_per_domain"].values())
    main(["run", str(recipe), "--no-progress"])  # and back, for the other tests of this module


def test_a_second_run_on_a_busy_folder_is_refused(study, capsys):
    from filelock import FileLock

    recipe, out = study
    with FileLock(str(out / ".run.lock")):
        with pytest.raises(SystemExit) as e:
            main(["run", str(recipe), "--no-progress"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another elmforest process" in err[0]
