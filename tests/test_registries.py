"""Contract tests over every registry entry: posteriors, study methods (averaging methods and
launchers have theirs in test_averaging / test_launchers), and the lists generated from them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from elmforest.study.recipe import recipe_from_dict
from elmforest.combine.ensemble import POSTERIORS, Ensemble, Mixing, posterior_log_weights
from elmforest.errors import ElmError
from elmforest.study.arms import study_methods
from elmforest.study.methods import STUDY_METHODS, Sizes, method_names_help

README = Path(__file__).resolve().parents[1] / "README.md"


def _lp(shape=(3, 2, 7)) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return -torch.rand(shape, generator=g, dtype=torch.float64) * 4


@pytest.mark.parametrize("name", list(POSTERIORS))
@pytest.mark.parametrize("mixing", [Mixing(), Mixing(temperature=2.0, floor=0.1, decay=0.5)])
def test_posterior_contract(name, mixing):
    rule = POSTERIORS[name]
    lp = _lp()
    prior = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    w = posterior_log_weights(lp, prior.log(), name, mixing).exp()
    torch.testing.assert_close(w.sum(0), torch.ones_like(w[0]), atol=1e-12, rtol=0)  # a distribution everywhere
    first = w[:, 0, 0]  # position 1 sees no scored token: the prior (or uniform), floored
    start = prior if rule.uses_prior else torch.full_like(prior, 1 / 3)
    torch.testing.assert_close(first, (1 - mixing.floor) * start + mixing.floor / 3, atol=1e-12, rtol=0)
    assert rule.updates == (rule.evidence is not None)
    if rule.evidence is not None:
        assert torch.equal(rule.evidence(lp, mixing)[..., 0], torch.zeros_like(lp[..., 0]))
    else:  # no evidence: the weights never move
        assert torch.allclose(w, w[..., :1].expand_as(w))
    assert rule.help


@pytest.mark.parametrize("name", list(POSTERIORS))
def test_identical_experts_mix_to_that_expert(name):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=40, n_positions=16)).eval()
    tokens = torch.randint(0, 40, (2, 9))
    mixed = Ensemble([model, model, model], [0.5, 0.3, 0.2], name, Mixing(decay=0.5)).logprobs(tokens)
    single = Ensemble([model], None, "one_step").logprobs(tokens)
    torch.testing.assert_close(mixed, single, atol=1e-5, rtol=0)


def test_recipes_validate_the_posterior_against_the_registry(tmp_path):
    base = {"corpus": str(tmp_path), "train_domains": ["a", "b"], "budget": {"batch_tokens": 128}}
    assert recipe_from_dict({**base, "eval": {"posterior": "decayed"}}).eval.posterior == "decayed"
    with pytest.raises(ElmError, match=r"eval.posterior: .*unknown posterior 'prior'.*one_step, full_prefix, decayed"):
        recipe_from_dict({**base, "eval": {"posterior": "prior"}})


@pytest.mark.parametrize("name", list(STUDY_METHODS))
def test_study_method_contract(name):
    m = STUDY_METHODS[name]
    assert m.name == name and m.arm and m.help and callable(m.score)
    sizes = Sizes(model=1000, n_experts=6, arms={"demix": 5000, "btx": 7000, "anchored": 8000, "anchored_router_tuned": 8000})
    params = m.params(sizes)
    assert isinstance(params, int) and params >= 1000
    if name.startswith("btm_ensemble") and "top" not in name and "tuned" not in name:
        assert params == 6000  # every expert runs


def test_enabled_methods_follow_the_recipe(tmp_path):
    base = {"corpus": str(tmp_path), "train_domains": ["a", "b"], "budget": {"batch_tokens": 128}}
    plain = [m.name for m in study_methods(recipe_from_dict(base))]
    assert "btm_ensemble_cached_full_prefix" in plain and "btm_ensemble_cached_one_step" not in plain
    assert "demix_cached" not in plain and "random_ensemble_cached" in plain
    full = recipe_from_dict({**base, "eval": {"posterior": "full_prefix"},
                             "arms": {"demix": True, "dense_multiples": [2], "seed_fractions": [0.7]}})
    names = [m.name for m in study_methods(full)]
    assert "btm_ensemble_cached_one_step" in names and "btm_ensemble_cached_full_prefix" not in names
    assert names.index("dense_x2") == names.index("dense") + 1
    assert "btm_ensemble_cached_seed0.7" in names and "demix_cached" in names


def test_readme_lists_every_study_method_as_the_registry_prints_it():
    text = README.read_text(encoding="utf-8")
    block = re.search(r"<!-- study-methods:start -->\n(.*?)\n<!-- study-methods:end -->", text, re.S)
    assert block, "README.md lacks the generated list of study methods"
    assert block.group(1) == method_names_help(), "regenerate it with: python -m elmforest.study.methods"
