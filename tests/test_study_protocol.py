"""The study's evaluation protocol, checked against numbers worked out in the test: the cached prior
comes from the valid split with the recipe's alpha, the posterior average is the prior-weighted
mean, the tuned mixing never reads test windows, the CLI's names mean what the study's mean,
dense models at k x the compute, and several training seeds."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from cli_runner import run_cli
from elmforest.cli import main
from elmforest.study.recipe import load_recipe
from elmforest.data.corpus import Corpus
from elmforest.combine.mixing import tune_mixing
from elmforest.models.factory import load_model
from elmforest.combine.scoring import split_windows
from tinydata import _WORDS, _document, make_corpus, tiny_recipe, write_recipe

ALPHA = 0.9  # not the default 0.3: a study that ignored eval.prior_alpha would get another prior


def _rewrite_valid_as_code(corpus_dir):
    """The novel domain's valid split holds `code`-like text while its test split stays `numbers`:
    a prior estimated on the wrong split would point elsewhere."""
    import random

    rng = random.Random(7)
    lines = [json.dumps({"text": _document(rng, _WORDS["code"], rng.randint(3, 8))}) for _ in range(30)]
    (corpus_dir / "numbers" / "valid.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("protocol")
    corpus = make_corpus(root / "corpus")
    _rewrite_valid_as_code(corpus)
    out = root / "run"
    data = tiny_recipe(corpus, out)
    data["eval"].update(prior_alpha=ALPHA, window_seed=3, batch_size=5)  # not the CLI's defaults (0, 8)
    data["arms"] = {"random_split": False, "dense_multiples": [2]}
    path = write_recipe(root / "recipe.yaml", data)
    main(["run", str(path), "--no-progress"])
    return load_recipe(path), out


def _expert_lp(models, windows: torch.Tensor) -> torch.Tensor:
    """log p(x_t | x_<t) of every model by hand: [n, N, T] float64."""
    rows = []
    with torch.no_grad():
        for m in models:
            logits = m(windows[:, :-1]).logits.double()
            rows.append(torch.log_softmax(logits, -1).gather(-1, windows[:, 1:, None])[..., 0])
    return torch.stack(rows)


def _ema_one_step(lp: torch.Tensor, batch: int, alpha: float) -> torch.Tensor:
    """The reference code's cached prior, written out: start uniform; per batch, the mean one-step
    posterior under the current prior; prior <- (1 - alpha) prior + alpha mean."""
    n = lp.shape[0]
    prior = torch.full((n,), 1.0 / n, dtype=torch.float64)
    for s in range(0, lp.shape[1], batch):
        b = lp[:, s : s + batch]
        evidence = torch.cat([torch.zeros_like(b[..., :1]), b[..., :-1]], -1)
        w = torch.softmax(prior.log()[:, None, None] + evidence, dim=0)
        prior = (1 - alpha) * prior + alpha * w.mean(dim=(1, 2))
    return prior


def _setup(study):
    recipe, out = study
    names = json.loads((out / "forest" / "forest.json").read_text())["experts"]
    models = [load_model(out / "forest" / e["path"]).eval() for e in names]
    corpus = Corpus(recipe.corpus)
    ctx = models[0].config.n_positions
    e = recipe.eval
    valid = split_windows(corpus, out / "tokenizer", "numbers", "valid", ctx, e.prior_sequences * ctx, e.window_seed).tokens
    test = split_windows(corpus, out / "tokenizer", "numbers", "test", ctx, e.max_tokens_per_domain, e.window_seed)
    return recipe, out, [x["name"] for x in names], models, valid, test


def test_cached_prior_comes_from_the_valid_split_with_the_recipes_alpha(study):
    recipe, out, names, models, valid, test = _setup(study)
    results = json.loads((out / "results.json").read_text())
    got = torch.tensor([results["priors"]["btm"]["numbers"][n] for n in names], dtype=torch.float64)
    want = _ema_one_step(_expert_lp(models, valid), recipe.eval.prior_batch, ALPHA)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    # the test is able to tell: the test split and the default alpha give clearly other priors
    on_test = _ema_one_step(_expert_lp(models, test.tokens), recipe.eval.prior_batch, ALPHA)
    default_alpha = _ema_one_step(_expert_lp(models, valid), recipe.eval.prior_batch, 0.3)
    assert float((on_test - want).abs().sum()) > 0.05
    assert float((default_alpha - want).abs().sum()) > 0.05


def test_posterior_average_is_the_prior_weighted_mean_of_the_experts(study):
    recipe, out, names, models, valid, test = _setup(study)
    results = json.loads((out / "results.json").read_text())
    prior = [results["priors"]["btm"]["numbers"][n] for n in names]
    assert max(prior) - min(prior) > 0.05  # not uniform, so a uniform average would differ
    states = [m.state_dict() for m in models]
    avg = load_model(out / "forest" / names[0])
    avg.load_state_dict({k: sum(w * s[k].double() for w, s in zip(prior, states)).float() for k in states[0]})
    nll = -float(_expert_lp([avg.eval()], test.tokens).mean())
    cache = json.loads((out / "eval" / "numbers.json").read_text())
    assert cache["nll"]["btm_average_posterior"] == pytest.approx(nll, abs=2e-5)
    uniform = -float(_expert_lp([load_model(out / "forest" / names[0])], test.tokens).mean())  # sanity: differs
    assert abs(cache["nll"]["btm_average_posterior"] - uniform) > 1e-3


def test_tuned_mixing_is_chosen_on_valid_windows_only(study):
    recipe, out, names, models, valid, test = _setup(study)
    results = json.loads((out / "results.json").read_text())
    seed = load_model(out / "seed").eval()
    e = recipe.eval
    on_valid = tune_mixing(names, _expert_lp(models, valid), _expert_lp([seed], valid)[0], e.prior_batch, e.prior_alpha)
    on_test = tune_mixing(names, _expert_lp(models, test.tokens), _expert_lp([seed], test.tokens)[0],
                          e.prior_batch, e.prior_alpha)
    chosen = results["mixing"]["btm_tuned"]["numbers"]["mixing"]
    prior = results["priors"]["btm_tuned"]["numbers"]
    assert chosen == on_valid.mixing.to_json()
    assert list(prior) == on_valid.members
    assert list(prior.values()) == pytest.approx(on_valid.prior.tolist(), abs=1e-6)
    # tuning on the test windows would have given another prior (so this test can tell)
    assert on_test.members != on_valid.members or on_test.prior.tolist() != pytest.approx(on_valid.prior.tolist(), abs=1e-3)


def test_cli_names_mean_what_the_study_names_mean(study, tmp_path, capsys):
    recipe, out, *_ = study
    cache = json.loads((out / "eval" / "numbers.json").read_text())
    common = ["--domain", "numbers", "--max-tokens", recipe.eval.max_tokens_per_domain,
              "--prior-sequences", recipe.eval.prior_sequences, "--prior-batch", recipe.eval.prior_batch,
              "--alpha", ALPHA, "--window-seed", recipe.eval.window_seed]
    code, _, err = run_cli(["ensemble", out / "forest", *common, "--prior", "uniform", "--json", tmp_path / "u.json"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "u.json").read_text())["nll"] == pytest.approx(cache["nll"]["btm_ensemble_uniform"], abs=1e-5)
    code, _, err = run_cli(["ensemble", out / "forest", *common, "--json", tmp_path / "c.json"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "c.json").read_text())["nll"] == pytest.approx(cache["nll"]["btm_ensemble_cached"], abs=1e-5)
    code, _, err = run_cli(["ensemble", out / "forest", *common, "--mix", "auto", "--save-prior", tmp_path / "t.json",
                            "--json", tmp_path / "t_scores.json"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "t_scores.json").read_text())["nll"] == pytest.approx(cache["nll"]["btm_ensemble_tuned"], abs=1e-5)
    saved = json.loads((tmp_path / "t.json").read_text())
    assert saved["mixing"] == cache["priors"]["btm_tuned"]["mixing"]


def test_cli_ensemble_and_eval_give_the_studys_numbers(study, tmp_path, capsys):
    """`elmforest eval` / `ensemble` on the study's forest with its eval settings (read from its recipe
    with --recipe, or given as flags) give results.json's btm_ensemble_cached perplexity and cached
    prior of every domain, to the last digit."""
    recipe, out = study
    results = json.loads((out / "results.json").read_text())
    e = recipe.eval
    row = results["btm_ensemble_cached"]
    want = {**row["train"], **row["novel"]}
    assert sorted(want) == ["animals", "code", "numbers"]
    code, _, err = run_cli(["eval", out / "forest", "--recipe", out / "recipe.yaml", "--json", tmp_path / "e.json"], capsys)
    assert code == 0, err
    got = json.loads((tmp_path / "e.json").read_text())
    assert sorted(got["domains"]) == sorted(Corpus(recipe.corpus).domains) == sorted(want)
    for d, ppl in want.items():
        assert got["domains"][d]["ppl"] == ppl, d
        assert got["prior"][d]["experts"] == results["priors"]["btm"][d], d
    flags = ["--max-tokens", e.max_tokens_per_domain, "--window-seed", e.window_seed, "--prior-sequences",
             e.prior_sequences, "--prior-batch", e.prior_batch, "--alpha", e.prior_alpha, "--posterior", e.posterior,
             "--batch-size", e.batch_size]
    for d in ("code", "numbers"):
        code, _, err = run_cli(["ensemble", out / "forest", "--domain", d, *flags, "--json", tmp_path / "c.json"], capsys)
        assert code == 0, err
        ens = json.loads((tmp_path / "c.json").read_text())
        assert ens["ppl"] == want[d] and ens["prior"]["experts"] == results["priors"]["btm"][d], d
    # a flag given wins over the recipe (here the CLI's default window seed, not the study's 3): other
    # windows give other numbers, so the equalities above can tell
    code, _, err = run_cli(["ensemble", out / "forest", "--domain", "numbers", "--recipe", out / "recipe.yaml",
                            "--window-seed", 0, "--json", tmp_path / "d.json"], capsys)
    assert code == 0, err
    other = json.loads((tmp_path / "d.json").read_text())
    assert other["window_seed"] == 0 and other["max_tokens"] == e.max_tokens_per_domain
    assert other["ppl"] != want["numbers"] and other["prior"]["experts"] != results["priors"]["btm"]["numbers"]


def test_growth_prior_is_the_studys_cached_prior(study):
    """Growth branches a new domain's expert from the same cached prior the study reports for that domain."""
    from elmforest.btm.growth import forest_prior
    from elmforest.btm.seed import model_context

    recipe, out = study
    results = json.loads((out / "results.json").read_text())
    tok = out / "tokenizer"
    got = forest_prior(out / "forest", Corpus(recipe.corpus), tok, "numbers", model_context(recipe, tok), recipe)
    assert got == results["priors"]["btm"]["numbers"]


def test_dense_at_twice_the_compute(study):
    recipe, out = study
    results = json.loads((out / "results.json").read_text())
    arms = results["budget"]["arms"]
    assert arms["dense_x2"]["flops"] == pytest.approx(2 * arms["dense"]["flops"], rel=0.01)
    steps = json.loads((out / "dense_x2" / "train.json").read_text())
    assert steps["step"] == 2 * results["budget"]["total_steps"] == steps["spec"]["total_steps"]
    assert results["dense_x2"]["train_mean"] < results["dense"]["train_mean"]  # more compute helps
    ctm = results["compute_to_match"]["train"]
    assert set(ctm["points"]) == {"1", "2"}
    assert ctm["points"]["2"] == pytest.approx(results["dense_x2"]["train_mean"])
    assert isinstance(ctm["multiple"], str) or 1.0 <= ctm["multiple"] <= 2.0


def test_compute_to_match_of_each_part_comes_from_that_parts_perplexities(study):
    """results.json's novel figure reads novel perplexities (not the train part's), and both
    cross where dense's own means say."""
    from elmforest.combine.bootstrap import crossing

    _, out = study
    results = json.loads((out / "results.json").read_text())
    assert set(results["compute_to_match"]) == {"train", "novel"}
    for part in ("train", "novel"):
        ctm = results["compute_to_match"][part]
        dense = [results["dense"][f"{part}_mean"], results["dense_x2"][f"{part}_mean"]]
        assert ctm["points"] == pytest.approx({"1": dense[0], "2": dense[1]})
        want = crossing([1.0, 2.0], [math.log(p) for p in dense], math.log(results["btm_ensemble_cached"][f"{part}_mean"]))
        assert ctm["multiple"] == (want if isinstance(want, str) else pytest.approx(want))
    assert results["dense"]["novel_mean"] != pytest.approx(results["dense"]["train_mean"], rel=1e-3)


def test_a_method_missing_from_the_cache_is_rescored_and_an_unscorable_one_is_named(study, tmp_path):
    recipe, out = study
    path = out / "eval" / "animals.json"
    cache = json.loads(path.read_text())
    value = cache["nll"].pop("btm_average_posterior")
    cache["doc_nll"].pop("btm_average_posterior")
    path.write_text(json.dumps(cache))
    main(["run", str(out / "recipe.yaml"), "--no-progress"])
    assert json.loads(path.read_text())["nll"]["btm_average_posterior"] == pytest.approx(value, abs=1e-7)

    from elmforest.errors import ElmError
    from elmforest.study.arms import provide_models, study_methods
    from elmforest.study.results import evaluate_study

    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "eval")
    shutil.rmtree(copy / "dense_x2")
    with pytest.raises(ElmError, match="dense_x2.*animals"):
        evaluate_study(recipe, copy, copy / "tokenizer", 32, study_methods(recipe), provide_models(recipe), log=lambda _: None)


def test_results_carry_intervals_and_verdicts(study):
    _, out = study
    results = json.loads((out / "results.json").read_text())
    for method in ("dense", "btm_ensemble_cached", "btm_ensemble_tuned"):
        row = results[method]
        lo, hi = row["train_mean_ci"]
        assert lo <= row["train_mean"] <= hi
        for d, (dlo, dhi) in row["train_ci"].items():
            assert dlo <= row["train"][d] <= dhi
    claims = {(c["a"], c["b"], c["part"]): c for c in results["comparisons"]}
    c = claims[("btm_ensemble_cached", "dense", "train")]
    assert c["ratio"] == pytest.approx(results["btm_ensemble_cached"]["train_mean"] / results["dense"]["train_mean"])
    want = "holds" if c["ci"][1] < 1 else "does not hold" if c["ci"][0] > 1 else "not distinguishable"
    assert c["verdict"] == want
    budget = results["budget"]
    assert all(budget["eval_documents_per_domain"][d] >= 1 for d in ("animals", "code", "numbers"))
    report = (out / "report.md").read_text()
    assert f"**{c['verdict']}**" in report and "test documents scored" in report


@pytest.fixture(scope="module")
def seeds_study(tmp_path_factory):
    root = tmp_path_factory.mktemp("seeds")
    corpus = make_corpus(root / "corpus")
    out = root / "run"
    data = tiny_recipe(corpus, out)
    data["seeds"] = [0, 1]
    data["arms"] = {"random_split": False}
    main(["run", str(write_recipe(root / "recipe.yaml", data)), "--no-progress"])
    return out


def test_several_seeds_train_separately_and_combine(seeds_study):
    out = seeds_study
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == [0, 1]
    per = [json.loads((out / f"seed-{s}" / "results.json").read_text()) for s in (0, 1)]
    # each seed changes the initialisation: the seeds' dense models differ
    w0, w1 = (load_model(out / f"seed-{s}" / "dense").transformer.wte.weight for s in (0, 1))
    assert not torch.equal(w0, w1)
    for m in ("dense", "btm_ensemble_cached"):
        means = [p[m]["train_mean"] for p in per]
        assert results["per_seed"]["0"][m]["train_mean"] == pytest.approx(means[0])
        assert results[m]["train_mean"] == pytest.approx(math.exp((math.log(means[0]) + math.log(means[1])) / 2))
        import statistics

        assert results[m]["train_mean_sd"] == pytest.approx(statistics.stdev(means))
    assert "Across training seeds" in (out / "report.md").read_text()


def test_seed_fraction_sweep_branches_from_snapshots_of_one_dense_run(tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    out = tmp_path / "run"
    data = tiny_recipe(corpus, out)
    data["arms"] = {"random_split": False, "seed_fractions": [0.25, 0.75]}
    main(["run", str(write_recipe(tmp_path / "recipe.yaml", data)), "--no-progress"])
    results = json.loads((out / "results.json").read_text())
    total = results["budget"]["total_steps"]
    for f in (0.25, 0.75):
        seed = json.loads((out / "sweep" / f"seed{f:g}" / "seed" / "seed.json").read_text())
        assert seed["step"] == round(f * total) and seed["seed_fraction"] == f
        expert = json.loads((out / "sweep" / f"seed{f:g}" / "experts" / "animals" / "expert.json").read_text())
        assert expert["steps"] == total - seed["step"]  # the rest of the budget, at 1/n of the batch
        row = results[f"btm_ensemble_cached_seed{f:g}"]
        # compute-matched on its own: the same training FLOPs as dense (and as the main forest)
        assert row["train_flops"] == pytest.approx(results["dense"]["train_flops"], rel=0.01)
        assert row["valid_train_mean"] > 1 and row["valid_novel_mean"] > 1
    # the snapshot at 0.25 is the dense run at that step: its weights equal a dense run stopped there
    main_seed = json.loads((out / "seed" / "seed.json").read_text())
    assert main_seed["step"] == round(0.5 * total)
    assert results["btm_ensemble_cached"]["valid_train_mean"] > 1


def test_check_passes_on_a_several_seed_run(seeds_study, capsys):
    code, out, err = run_cli(["check", seeds_study], capsys)
    assert code == 0, out + err
