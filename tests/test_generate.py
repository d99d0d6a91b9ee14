"""Ensemble generation with per-expert KV caches."""

from types import SimpleNamespace

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from elmforest.combine.ensemble import Ensemble
from elmforest.errors import ElmError
from elmforest.combine.generate import generate

VOCAB = 64
PROMPT = [5, 17, 42, 8]


def tiny_model(seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=48,
        bos_token_id=0, eos_token_id=0, initializer_range=0.5,
    )
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def experts():
    torch.set_num_threads(1)
    return [tiny_model(s) for s in (1, 2, 3)]


def test_single_model_greedy_matches_argmax_loop(experts):
    model = experts[0]
    ids = list(PROMPT)
    with torch.no_grad():
        for _ in range(12):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    want = ids[len(PROMPT):]
    assert generate(model, None, PROMPT, 12, greedy=True) == want
    assert generate([model], None, PROMPT, 12, greedy=True, use_cache=False) == want


@pytest.mark.parametrize("posterior", ["one_step", "full_prefix"])
def test_ensemble_greedy_cache_equals_no_cache(experts, posterior):
    prior = [0.5, 0.3, 0.2]
    cached = generate(experts, None, PROMPT, 20, greedy=True, prior=prior, posterior=posterior)
    full = generate(experts, None, PROMPT, 20, greedy=True, prior=prior, posterior=posterior, use_cache=False)
    assert len(cached) == 20
    assert cached == full
    assert len(set(cached)) > 1


@pytest.mark.parametrize("posterior", ["one_step", "full_prefix"])
def test_greedy_token_is_the_ensemble_argmax(experts, posterior):
    """Each greedy choice maximises the Ensemble's mixture probability of the next token,
    with the posterior computed over the prompt and the text generated so far."""
    prior = [0.2, 0.3, 0.5]
    new = generate(experts, None, PROMPT, 6, greedy=True, prior=prior, posterior=posterior)
    ens = Ensemble(experts, prior, posterior)
    ids = list(PROMPT)
    for token in new:
        candidates = torch.tensor([ids + [v] for v in range(VOCAB)])  # [V, len+1]
        last = ens.logprobs(candidates)[:, -1]  # log p(v | ids) under the mixture
        assert int(last.argmax()) == token
        ids.append(token)


def test_one_hot_prior_is_that_expert(experts):
    alone = generate(experts[1], None, PROMPT, 10, temperature=0.8, seed=3)
    chosen = generate(experts, None, PROMPT, 10, temperature=0.8, seed=3, prior=[0.0, 1.0, 0.0])
    assert alone == chosen


def test_sampling_is_seeded_and_top_p_narrows(experts):
    a = generate(experts, None, PROMPT, 15, seed=7)
    assert a == generate(experts, None, PROMPT, 15, seed=7)
    assert a != generate(experts, None, PROMPT, 15, seed=8)
    greedy = generate(experts, None, PROMPT, 15, greedy=True)
    assert generate(experts, None, PROMPT, 15, top_p=1e-6, seed=9) == greedy


def test_eos_stops_and_arguments_are_checked(experts):
    first = generate(experts, None, PROMPT, 5, greedy=True)[0]
    tokenizer = SimpleNamespace(eos_token_id=first)
    assert generate(experts, tokenizer, PROMPT, 5, greedy=True) == [first]
    assert generate(experts, None, [3], 4, greedy=True) == generate(experts, None, [3], 4, greedy=True, use_cache=False)
    assert generate(experts, None, PROMPT, 0) == []
    with pytest.raises(ElmError, match="at least one token"):
        generate(experts, None, [], 3)
    with pytest.raises(ElmError, match="exceeds the model's 48 positions"):
        generate(experts, None, PROMPT, 45)
    with pytest.raises(ElmError, match="unknown posterior"):
        generate(experts, None, PROMPT, 3, posterior="bayes")
