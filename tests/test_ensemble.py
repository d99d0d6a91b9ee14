"""Ensembles (posterior weights, mixture log-probs, priors, top-k) and evaluation windows."""

import math

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from elmforest.combine.ensemble import (
    POSTERIORS,
    Ensemble,
    posterior_log_weights,
    top_k_prior,
)
from elmforest.combine.logprobs import expert_logprobs
from elmforest.combine.prior import cached_prior, updating_logprobs
from elmforest.errors import ElmError
from elmforest.combine.evaluate import eval_windows, perplexity, token_logprobs

VOCAB = 64


def tiny_model(seed: int, init: float = 0.5) -> GPT2LMHeadModel:
    """A 2-layer GPT-2; a large init range makes random experts clearly different."""
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=64,
        bos_token_id=0, eos_token_id=0, initializer_range=init,
    )
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def experts():
    torch.set_num_threads(1)
    return [tiny_model(s) for s in (1, 2, 3)]


@pytest.fixture(scope="module")
def tokens():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, VOCAB, (3, 11), generator=g)


def brute_force(models, prior, tokens, mode):
    """The mixture log-prob recomputed from scratch with Python floats (float64)."""
    with torch.no_grad():
        lps = [torch.log_softmax(m(tokens[:, :-1]).logits.double(), -1) for m in models]
    B, T = tokens.shape[0], tokens.shape[1] - 1
    out = [[0.0] * T for _ in range(B)]
    for b in range(B):
        for t in range(T):
            def lp(j, s):
                return float(lps[j][b, s, tokens[b, s + 1]])
            logw = []
            for j in range(len(models)):
                if mode == "full_prefix":
                    evidence = sum(lp(j, s) for s in range(t))
                else:  # one_step
                    evidence = lp(j, t - 1) if t > 0 else 0.0
                logw.append(math.log(prior[j]) + evidence)
            top = max(logw)
            z = sum(math.exp(x - top) for x in logw)
            p = sum(math.exp(logw[j] - top) / z * math.exp(lp(j, t)) for j in range(len(models)))
            out[b][t] = math.log(p)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("mode", ["full_prefix", "one_step"])
def test_matches_brute_force(experts, tokens, mode):
    prior = [0.5, 0.3, 0.2]
    got = Ensemble(experts, prior, mode).logprobs(tokens)
    want = brute_force(experts, prior, tokens, mode)
    assert got.shape == (3, 10)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)


def test_modes_differ(experts, tokens):
    """The posterior modes are really different functions on different experts."""
    full = Ensemble(experts, None, "full_prefix").logprobs(tokens)
    one = Ensemble(experts, None, "one_step").logprobs(tokens)
    prior = Ensemble(experts, None, "prior").logprobs(tokens)
    assert (full - one).abs().max() > 1e-3
    assert (one - prior).abs().max() > 1e-3
    # position 1 uses the prior alone in every mode
    torch.testing.assert_close(full[:, 0], prior[:, 0])
    torch.testing.assert_close(one[:, 0], prior[:, 0])


@pytest.mark.parametrize("mode", POSTERIORS)
def test_weights_sum_to_one(experts, tokens, mode):
    w = Ensemble(experts, [0.6, 0.3, 0.1], mode).weights(tokens)
    assert w.shape == (3, 3, 10)
    assert (w >= 0).all()
    torch.testing.assert_close(w.sum(0), torch.ones(3, 10, dtype=torch.float64), atol=1e-12, rtol=0)
    # position 1 is the prior (uniform for "uniform")
    first = torch.full((3,), 1 / 3, dtype=torch.float64) if mode == "uniform" else torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    torch.testing.assert_close(w[:, 0, 0], first)


def test_weights_prior_mode_is_constant(experts, tokens):
    w = Ensemble(experts, [0.6, 0.3, 0.1], "prior").weights(tokens)
    torch.testing.assert_close(w, torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)[:, None, None].expand(3, 3, 10))


def test_uniform_mode_is_mean_of_probabilities(experts, tokens):
    lp = expert_logprobs(experts, tokens).double()
    want = lp.exp().mean(0).log()
    torch.testing.assert_close(Ensemble(experts, [0.9, 0.05, 0.05], "uniform").logprobs(tokens).double(), want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", POSTERIORS)
def test_identical_experts_equal_single(experts, tokens, mode):
    single = token_logprobs(experts[0], tokens)
    got = Ensemble([experts[0]] * 3, [0.2, 0.5, 0.3], mode).logprobs(tokens)
    torch.testing.assert_close(got, single, atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", POSTERIORS)
def test_one_expert_forest_equals_expert(experts, tokens, mode):
    torch.testing.assert_close(Ensemble([experts[1]], None, mode).logprobs(tokens), token_logprobs(experts[1], tokens), atol=1e-6, rtol=0)


def test_top1_runs_only_that_expert(experts, tokens):
    calls = [0, 0, 0]
    hooks = [m.register_forward_hook(lambda *_a, i=i: calls.__setitem__(i, calls[i] + 1)) for i, m in enumerate(experts)]
    try:
        prior = top_k_prior([0.2, 0.7, 0.1], 1)
        ens = Ensemble(experts, prior, "full_prefix")
        got = ens.logprobs(tokens)
        w = ens.weights(tokens)
    finally:
        for h in hooks:
            h.remove()
    assert calls == [0, 2, 0]  # the zero-prior experts never ran
    torch.testing.assert_close(got, token_logprobs(experts[1], tokens), atol=1e-6, rtol=0)
    assert w.shape == (3, 3, 10) and (w[1] == 1).all() and (w[0] == 0).all() and (w[2] == 0).all()


def test_expert_logprobs_batches_loads_lazily_and_runs_only_experts_with_prior(experts):
    g = torch.Generator().manual_seed(3)
    windows = torch.randint(0, VOCAB, (7, 9), generator=g)  # 7 windows: batches of 3, 3, 1
    with torch.no_grad():  # by hand: log_softmax at the targets, float64
        want = torch.stack([torch.log_softmax(m(windows[:, :-1]).logits.double(), -1).gather(-1, windows[:, 1:, None])[..., 0]
                            for m in experts])  # [3, 7, 8]
    torch.testing.assert_close(expert_logprobs(experts, windows, batch_size=3).double(), want, atol=1e-5, rtol=0)
    loads, calls = [], [0, 0, 0]
    hooks = [m.register_forward_hook(lambda *_a, i=i: calls.__setitem__(i, calls[i] + 1)) for i, m in enumerate(experts)]
    try:
        loaders = [lambda i=i: loads.append(i) or experts[i] for i in range(3)]
        got = expert_logprobs(loaders, windows, batch_size=3, prior=[0.0, 0.7, 0.3])
    finally:
        for h in hooks:
            h.remove()
    assert loads == [1, 2] and calls == [0, 3, 3]  # expert 0 (prior 0) is never loaded nor run; 3 batches each
    torch.testing.assert_close(got.double(), want[1:], atol=1e-5, rtol=0)


def test_top_k_prior():
    p = top_k_prior(torch.tensor([0.1, 0.4, 0.2, 0.3]), 2)
    torch.testing.assert_close(p, torch.tensor([0.0, 4 / 7, 0.0, 3 / 7], dtype=torch.float64))
    torch.testing.assert_close(top_k_prior([0.25] * 4, 10), torch.full((4,), 0.25, dtype=torch.float64))
    with pytest.raises(ElmError, match="k >= 1"):
        top_k_prior([0.5, 0.5], 0)


def test_bad_arguments(experts):
    with pytest.raises(ElmError, match="unknown posterior"):
        Ensemble(experts, None, "full")
    with pytest.raises(ElmError, match="negative"):
        Ensemble(experts, [0.5, -0.1, 0.6])
    with pytest.raises(ElmError, match="3 experts"):
        Ensemble(experts, [0.5, 0.5])
    with pytest.raises(ElmError, match="all zeros"):
        Ensemble(experts, [0, 0, 0])


def test_posterior_log_weights_arithmetic():
    """Hand-checkable: two experts, one window, log-probs chosen by hand."""
    lp = torch.log(torch.tensor([[[0.5, 0.25, 0.5]], [[0.25, 0.5, 0.125]]]))  # [2, 1, 3]
    log_prior = torch.log(torch.tensor([0.5, 0.5]))
    full = posterior_log_weights(lp, log_prior, "full_prefix").exp()[:, 0]
    one = posterior_log_weights(lp, log_prior, "one_step").exp()[:, 0]
    # position 2: evidence 0.5 vs 0.25 -> 2/3; position 3: full 0.125 vs 0.125 -> 1/2, one-step 0.25 vs 0.5 -> 1/3
    torch.testing.assert_close(full[0], torch.tensor([0.5, 2 / 3, 0.5], dtype=torch.float64))
    torch.testing.assert_close(one[0], torch.tensor([0.5, 2 / 3, 1 / 3], dtype=torch.float64))


def test_cached_prior_ema_arithmetic():
    """prior <- 0.7 prior + 0.3 batch-mean posterior, from uniform, batches of 4 windows."""
    lp = torch.log(torch.tensor([0.5, 0.25])).view(2, 1, 1).expand(2, 10, 3)  # 10 windows: batches of 4, 4, 2
    prior, history = cached_prior(lp, batch_size=4, alpha=0.3, posterior="prior", return_history=True)
    assert len(history) == 4  # start + 3 batches
    torch.testing.assert_close(prior, torch.tensor([0.5, 0.5], dtype=torch.float64))  # "prior" mode never moves
    prior, history = cached_prior(lp, batch_size=4, alpha=0.3, posterior="one_step", return_history=True)
    want = torch.tensor([0.5, 0.5], dtype=torch.float64)
    for step in range(3):
        post_rest = want * torch.tensor([0.5, 0.25], dtype=torch.float64)
        post_rest = post_rest / post_rest.sum()
        batch_mean = (want + 2 * post_rest) / 3  # position 1 is the prior, positions 2-3 updated
        want = 0.7 * want + 0.3 * batch_mean
        torch.testing.assert_close(history[step + 1], want)
    torch.testing.assert_close(prior, want)


def test_updating_prior_scores_with_earlier_batches(experts):
    g = torch.Generator().manual_seed(1)
    windows = torch.randint(0, VOCAB, (6, 9), generator=g)
    got = updating_logprobs(expert_logprobs(experts, windows), batch_size=3, alpha=0.3, posterior="one_step")
    assert got.shape == (6, 8)
    first = Ensemble(experts, None, "one_step").logprobs(windows[:3])
    prior_after_first = cached_prior(expert_logprobs(experts, windows[:3]), batch_size=3, alpha=0.3, posterior="one_step")
    second = Ensemble(experts, prior_after_first, "one_step").logprobs(windows[3:])
    torch.testing.assert_close(got, torch.cat([first, second]), atol=1e-6, rtol=0)


def domain_batch(domain: str, n: int, length: int, g: torch.Generator) -> torch.Tensor:
    """Domain A: the cycle 0..31 from a random start; domain B: i.i.d. tokens from 32..63."""
    if domain == "A":
        start = torch.randint(0, 32, (n, 1), generator=g)
        return (start + torch.arange(length)) % 32
    return torch.randint(32, 64, (n, length), generator=g)


def train_expert(domain: str, seed: int) -> GPT2LMHeadModel:
    model = tiny_model(seed, init=0.02).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(60):
        batch = domain_batch(domain, 8, 17, g)
        loss = model(batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("mode", ["one_step", "full_prefix"])
def test_cached_prior_concentrates_on_matching_expert(mode):
    torch.set_num_threads(1)
    forest = [train_expert("A", 11), train_expert("B", 12)]
    g = torch.Generator().manual_seed(5)
    for domain, own in (("A", 0), ("B", 1)):
        valid = domain_batch(domain, 40, 17, g)
        prior, history = cached_prior(expert_logprobs(forest, valid), batch_size=4, alpha=0.3, posterior=mode, return_history=True)
        assert len(history) == 11
        assert prior[own] > 0.9, (domain, prior)
        assert abs(float(prior.sum()) - 1) < 1e-9
        # the ensemble under that prior is at least as good as the own expert alone, roughly
        test = domain_batch(domain, 8, 17, g)
        ens = perplexity(Ensemble(forest, prior, mode), test, batch_size=4)["ppl"]
        other = perplexity(forest[1 - own], test, batch_size=4)["ppl"]
        assert ens < other / 2


def test_eval_windows_cover_each_token_once():
    array = np.arange(1000, 1000 + 103, dtype=np.uint16)
    w = eval_windows(array, context=10, max_tokens=None)
    assert w.shape == (10, 11) and w.dtype == torch.long
    # consecutive windows overlap by exactly one token
    assert torch.equal(w[:-1, -1], w[1:, 0])
    # the predicted tokens are array[1 : 1 + N*context], each once, in order
    assert torch.equal(w[:, 1:].reshape(-1), torch.from_numpy(array[1:101].astype(np.int64)))
    capped = eval_windows(array, context=10, max_tokens=50)
    assert capped.shape == (4, 11) and int(capped.max()) == 1040
    with pytest.raises(ElmError, match="too few tokens"):
        eval_windows(array, context=10, max_tokens=10)


def test_perplexity_matches_manual_and_single_expert_ensemble(experts):
    array = np.random.default_rng(0).integers(0, VOCAB, 200)
    windows = eval_windows(array, context=16, max_tokens=150)
    result = perplexity(experts[0], windows, batch_size=3)
    lp = token_logprobs(experts[0], windows)
    assert result["tokens"] == lp.numel() == 9 * 16
    assert math.isclose(result["nll"], -float(lp.double().mean()), rel_tol=1e-9)
    assert math.isclose(result["ppl"], math.exp(result["nll"]), rel_tol=1e-12)
    ens = perplexity(Ensemble([experts[0]]), windows, batch_size=4)
    assert math.isclose(ens["ppl"], result["ppl"], rel_tol=1e-6)
