"""Mixing settings: the decayed evidence, temperature, floor, the seed as a member, and the choice
made on validation data."""

from __future__ import annotations

import math

import pytest
import torch

from elmforest.combine.ensemble import POSTERIORS, Ensemble, Mixing, posterior_log_weights
from elmforest.errors import ElmError
from elmforest.combine.mixing import SEED_MEMBER, grid_candidates, mixture_nll, tune_mixing


def _lp(seed: int, shape=(3, 4, 6)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return -torch.rand(shape, generator=g, dtype=torch.float64) * 5


def test_decayed_evidence_by_hand():
    lp = _lp(0)
    gamma = 0.5
    log_prior = torch.log(torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64))
    got = posterior_log_weights(lp, log_prior, "decayed", Mixing(decay=gamma))
    k, B, T = lp.shape
    want = torch.empty_like(lp)
    for b in range(B):
        for t in range(T):
            ev = [sum(gamma ** (t - 1 - s) * float(lp[j, b, s]) for s in range(t)) for j in range(k)]
            logw = [float(log_prior[j]) + ev[j] for j in range(k)]
            z = math.log(sum(math.exp(x) for x in logw))
            for j in range(k):
                want[j, b, t] = logw[j] - z
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_decay_zero_and_one_are_the_one_step_and_full_prefix_posteriors():
    lp = _lp(1)
    lpri = torch.log(torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64))
    torch.testing.assert_close(
        posterior_log_weights(lp, lpri, "decayed", Mixing(decay=0.0)), posterior_log_weights(lp, lpri, "one_step"),
        atol=1e-12, rtol=0,
    )
    torch.testing.assert_close(
        posterior_log_weights(lp, lpri, "decayed", Mixing(decay=1.0)), posterior_log_weights(lp, lpri, "full_prefix"),
        atol=1e-9, rtol=0,
    )


def test_temperature_and_floor_by_hand():
    lp = torch.tensor([[[-1.0, -2.0]], [[-3.0, -0.5]]], dtype=torch.float64)  # [2, 1, 2]
    prior = torch.tensor([0.6, 0.4], dtype=torch.float64)
    w = posterior_log_weights(lp, prior.log(), "one_step", Mixing(temperature=2.0, floor=0.1)).exp()
    # position 0: the prior alone; position 1: prior * exp(lp(0) / 2), normalised, then 0.9 w + 0.1 / 2
    a, b = 0.6 * math.exp(-1.0 / 2), 0.4 * math.exp(-3.0 / 2)
    want1 = [0.9 * a / (a + b) + 0.05, 0.9 * b / (a + b) + 0.05]
    want0 = [0.9 * 0.6 + 0.05, 0.9 * 0.4 + 0.05]
    assert w[:, 0, 0].tolist() == pytest.approx(want0)
    assert w[:, 0, 1].tolist() == pytest.approx(want1)
    assert float(w.sum(0).max()) == pytest.approx(1.0) and float(w.sum(0).min()) == pytest.approx(1.0)


def test_bad_mixing_values_are_refused():
    for kwargs in ({"temperature": 0}, {"floor": 1.5}, {"decay": -0.1}):
        with pytest.raises(ElmError):
            Mixing(**kwargs)


def test_registry_facts():
    assert POSTERIORS["one_step"].updates and POSTERIORS["full_prefix"].updates and POSTERIORS["decayed"].updates
    assert not POSTERIORS["prior"].updates and not POSTERIORS["uniform"].updates
    assert not POSTERIORS["uniform"].uses_prior


def test_plain_settings_equal_the_one_step_ensemble_exactly():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    models = [GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16,
                                         initializer_range=0.5)).eval() for _ in range(3)]
    tokens = torch.randint(0, 50, (4, 12))
    prior = [0.5, 0.3, 0.2]
    plain = Ensemble(models, prior, "decayed", Mixing()).logprobs(tokens)
    one_step = Ensemble(models, prior, "one_step").logprobs(tokens)
    assert torch.equal(plain, one_step)


def test_tuning_prefers_the_plain_ensemble_on_ties():
    lp = _lp(2, (1, 8, 6)).expand(3, 8, 6).clone()  # three identical experts: every setting scores the same
    tuned = tune_mixing(["a", "b", "c"], lp, None, batch=2, alpha=0.3)
    assert tuned.mixing == Mixing() and tuned.members == ["a", "b", "c"]
    assert tuned.candidates == len([c for c in grid_candidates() if not c.with_seed])  # no seed: skipped
    assert tuned.valid_nll == pytest.approx(tuned.baseline_valid_nll)


def test_tuning_lets_a_much_better_seed_join():
    experts = _lp(3, (2, 8, 6)) - 3.0  # both experts far worse than the seed
    seed = _lp(4, (8, 6)) * 0.1
    tuned = tune_mixing(["a", "b"], experts, seed, batch=2, alpha=0.3)
    assert tuned.mixing.with_seed and tuned.members == ["a", "b", SEED_MEMBER]
    assert float(tuned.prior[-1]) > 0.5
    assert tuned.valid_nll < tuned.baseline_valid_nll
    # and its NLL is the one recomputed from its own prior and settings
    lp = torch.cat([experts, seed.unsqueeze(0)])
    assert tuned.valid_nll == pytest.approx(mixture_nll(lp, tuned.prior, "decayed", tuned.mixing))
