"""The llama study with every mixture-of-experts arm: BTX, the anchored opt-out mixture (and its
tuned router), and opting a domain out of both the forest and the mixture."""

from __future__ import annotations

import json

import pytest

from cli_runner import run_cli
from elmforest.cli import main
from tinydata import make_corpus, tiny_recipe, write_recipe


@pytest.fixture(scope="module")
def moe_study(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    corpus = make_corpus(root / "corpus")
    out = root / "run"
    data = tiny_recipe(corpus, out)
    data["model"]["family"] = "llama"
    data["arms"] = {"random_split": False, "btx": True, "btx_tokens": 512, "anchored": True,
                    "anchored_router_tokens": 512, "opt_out": ["animals"]}
    main(["run", str(write_recipe(root / "recipe.yaml", data)), "--no-progress"])
    return out


def test_every_moe_arm_is_a_row_on_the_same_flops_axis(moe_study):
    results = json.loads((moe_study / "results.json").read_text())
    for m in ("dense", "btm_ensemble_cached", "btm_ensemble_tuned", "btm_average_posterior", "btx",
              "anchored_moe", "anchored_moe_router_tuned"):
        assert results[m]["train_mean"] > 1 and results[m]["train_mean_ci"][0] <= results[m]["train_mean"]
    arms = results["budget"]["arms"]
    moe = json.loads((moe_study / "anchored_moe" / "anchored_moe.json").read_text())
    assert arms["anchored"]["flops"] == moe["train"]["flops"] > arms["btm"]["flops"]  # not compute-matched: said
    tuning = json.loads((moe_study / "anchored_moe_router_tuned" / "anchored_moe.json").read_text())["router_tuning"]
    assert arms["anchored_router_tuned"]["flops"] == pytest.approx(arms["anchored"]["flops"] + tuning["flops"])
    assert results["anchored_moe"]["train_flops"] == arms["anchored"]["flops"]
    assert results["anchored_moe"]["inference_params"] == moe["params"]
    assert any("anchored_moe" in n and "not compute-matched" in n for n in results["notes"])
    claims = {(c["a"], c["b"], c["part"]) for c in results["comparisons"]}
    assert ("anchored_moe", "btm_ensemble_cached", "train") in claims and ("btx", "dense", "novel") in claims


def test_opting_a_domain_out_of_the_forest_and_the_mixture(moe_study):
    results = json.loads((moe_study / "results.json").read_text())
    table = results["opt_out"]["animals"]
    assert set(table) == {"btm_ensemble_cached", "anchored_moe"}
    # before = the study's own numbers on the same windows
    assert table["btm_ensemble_cached"]["ppl"]["before"]["animals"] == pytest.approx(
        results["btm_ensemble_cached"]["train"]["animals"], rel=1e-6)
    assert table["anchored_moe"]["ppl"]["before"]["animals"] == pytest.approx(results["anchored_moe"]["train"]["animals"], rel=1e-6)
    for m in table:  # the removed domain gets worse without its expert
        assert table[m]["ppl"]["after"]["animals"] > table[m]["ppl"]["before"]["animals"]
    after = json.loads((moe_study / "anchored_moe_optout_animals" / "anchored_moe.json").read_text())
    assert "animals" not in after["domains"]
    assert "## Opting animals out after training" in (moe_study / "report.md").read_text()


def test_check_passes_on_the_moe_study(moe_study, capsys):
    code, out, err = run_cli(["check", moe_study], capsys)
    assert code == 0, out + err
