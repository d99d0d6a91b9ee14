"""DEMix: domain-expert MLPs inside one GPT-2 / Llama model, on tiny random models."""

import copy
import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from elmforest.models import checkpoint
from elmforest.mixtures.demix import (
    DomainMLP,
    demix_cached_prior,
    demix_logprobs,
    demix_posterior,
    domain_logprobs,
    domain_mlps,
    load_demix,
    save_demix,
    set_domains,
    set_mixture,
    to_demix,
)
from elmforest.errors import ElmError

torch.set_num_threads(1)
V = 64


def gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=V, n_positions=32, n_embd=32, n_layer=2, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg).eval()


def llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )
    return LlamaForCausalLM(cfg).eval()


FAMILIES = [gpt2, llama]


def tokens(B: int = 4, T: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def diversify(model, seed: int = 5) -> None:
    """Make the domain experts differ (they start as exact copies)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mlp in domain_mlps(model):
            for expert in mlp.experts:
                for p in expert.parameters():
                    p.add_(0.2 * torch.randn(p.shape, generator=g))


def logits_of(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


@pytest.mark.parametrize("make", FAMILIES)
def test_one_domain_equals_plain_model(make):
    plain = make()
    x = tokens()
    demix = to_demix(copy.deepcopy(plain), 1)
    assert all(isinstance(m, DomainMLP) for m in domain_mlps(demix)) and len(domain_mlps(demix)) == 2
    set_domains(demix, torch.zeros(4, dtype=torch.long))
    assert torch.equal(logits_of(demix, x), logits_of(plain, x))
    set_mixture(demix, torch.ones(1))
    assert torch.equal(logits_of(demix, x), logits_of(plain, x))


@pytest.mark.parametrize("make", FAMILIES)
def test_training_routes_each_sequence_to_its_domain_only(make):
    model = to_demix(make(), 3)
    diversify(model)
    model.train()
    x = tokens()
    ids = torch.tensor([2, 0, 2, 0])
    set_domains(model, ids)
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    for mlp in domain_mlps(model):
        assert all(p.grad is None for p in mlp.experts[1].parameters())  # no sequence of domain 1
        for d in (0, 2):
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mlp.experts[d].parameters())
    # Grouped rows give each row exactly what a batch of that domain alone gives it.
    model.eval()
    mixed = logits_of(model, x)
    for d in (0, 2):
        set_domains(model, torch.full((2,), d))
        alone = logits_of(model, x[ids == d])
        torch.testing.assert_close(mixed[ids == d], alone, atol=1e-5, rtol=0)
    set_domains(model, torch.full((4,), 0))
    assert not torch.allclose(logits_of(model, x), mixed, atol=1e-3)  # the experts really differ


@pytest.mark.parametrize("make", FAMILIES)
def test_one_hot_mixture_equals_routing(make):
    model = to_demix(make(), 3)
    diversify(model)
    x = tokens()
    set_domains(model, torch.full((4,), 1))
    routed = logits_of(model, x)
    set_mixture(model, torch.tensor([0.0, 1.0, 0.0]))
    torch.testing.assert_close(logits_of(model, x), routed, atol=1e-6, rtol=0)
    set_mixture(model, torch.nn.functional.one_hot(torch.full((4, 12), 1), 3).float())  # [B, T, n]
    torch.testing.assert_close(logits_of(model, x), routed, atol=1e-6, rtol=0)


def test_mixture_skips_zero_weight_experts_and_mixes_linearly():
    model = to_demix(llama(), 3)
    diversify(model)
    calls = [0, 0, 0]
    for mlp in domain_mlps(model):
        for j, expert in enumerate(mlp.experts):
            expert.register_forward_hook(lambda _m, _i, _o, j=j: calls.__setitem__(j, calls[j] + 1))
    h = torch.randn(2, 5, 32)
    block = domain_mlps(model)[0]
    block.weights = torch.tensor([0.25, 0.0, 0.75])
    out = block(h)
    assert calls == [1, 0, 1]  # top-2 costs 2 expert MLPs
    with torch.no_grad():
        expected = 0.25 * block.experts[0](h) + 0.75 * block.experts[2](h)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    # Per-position weights: expert 1 only runs on the positions that use it.
    w = torch.zeros(2, 5, 3)
    w[..., 0] = 1.0
    w[1, 3] = torch.tensor([0.0, 1.0, 0.0])
    block.weights = w
    out = block(h)
    torch.testing.assert_close(out[1, 3], block.experts[1](h[1:2, 3:4])[0, 0], atol=1e-6, rtol=0)
    torch.testing.assert_close(out[0], block.experts[0](h[:1])[0], atol=1e-6, rtol=0)


def test_posterior_numbers_from_single_domain_passes():
    model = to_demix(gpt2(), 2)
    diversify(model)
    batch = tokens(2, 6)
    lp = domain_logprobs(model, batch, [0, 1]).permute(1, 2, 0).double()  # [B, T, 2]
    prior = torch.tensor([0.2, 0.8], dtype=torch.float64)
    one = demix_posterior(model, batch, [0.2, 0.8], "one_step").double()
    full = demix_posterior(model, batch, [1.0, 4.0], "full_prefix").double()  # normalised to 0.2, 0.8
    assert one.shape == (2, 5, 2)
    torch.testing.assert_close(one[:, 0], prior.expand(2, 2), atol=1e-6, rtol=0)  # no evidence yet
    torch.testing.assert_close(full[:, 0], prior.expand(2, 2), atol=1e-6, rtol=0)
    t = 3
    a = prior * lp[:, t - 1].exp()  # one step: the previous token's probability only
    torch.testing.assert_close(one[:, t], a / a.sum(-1, keepdim=True), atol=1e-6, rtol=0)
    a = prior * lp[:, :t].sum(1).exp()  # full prefix: the product over all previous tokens
    torch.testing.assert_close(full[:, t], a / a.sum(-1, keepdim=True), atol=1e-6, rtol=0)
    assert not torch.allclose(one[:, t], full[:, t], atol=1e-4)
    top1 = demix_posterior(model, batch, [0.0, 1.0], "full_prefix")
    assert torch.equal(top1[..., 0], torch.zeros(2, 5)) and torch.equal(top1[..., 1], torch.ones(2, 5))
    with pytest.raises(ElmError, match="posterior"):
        demix_posterior(model, batch, [0.5, 0.5], "bogus")


@pytest.mark.parametrize("posterior", ["one_step", "full_prefix"])
def test_demix_logprobs_identical_domains_equal_plain_model(posterior):
    plain = gpt2()
    model = to_demix(copy.deepcopy(plain), 3)
    batch = tokens(3, 13)
    lp = demix_logprobs(model, batch, torch.tensor([0.5, 0.3, 0.2]), posterior)
    assert lp.shape == (3, 12)
    ref = torch.log_softmax(logits_of(plain, batch[:, :-1]), -1).gather(-1, batch[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(lp, ref, atol=1e-5, rtol=0)
    assert all(m.domain_ids is None and m.weights is None for m in domain_mlps(model))  # routing cleared


def test_demix_logprobs_distinct_domains():
    model = to_demix(llama(), 3)
    diversify(model)
    batch = tokens(2, 11)
    for posterior in ("one_step", "full_prefix"):
        lp = demix_logprobs(model, batch, torch.tensor([1 / 3, 1 / 3, 1 / 3]), posterior)
        assert lp.shape == (2, 10) and torch.isfinite(lp).all() and (lp < 0).all()
    # A one-hot prior keeps the posterior one-hot: exactly domain 2's own log-probs.
    lp = demix_logprobs(model, batch, torch.tensor([0.0, 0.0, 1.0]))
    per_domain = domain_logprobs(model, batch, [0, 1, 2])  # [3, B, T]
    torch.testing.assert_close(lp, per_domain[2], atol=1e-5, rtol=0)
    assert not torch.allclose(per_domain[0], per_domain[2], atol=1e-3)
    with pytest.raises(ElmError, match="prior"):
        demix_logprobs(model, batch, torch.tensor([0.5, 0.5]))


def test_cached_prior_is_the_ema_of_batch_mean_posteriors():
    model = to_demix(gpt2(), 2)
    diversify(model)
    windows = tokens(6, 9, seed=3)
    prior = demix_cached_prior(model, windows, batch_size=4, alpha=0.3, posterior="full_prefix")
    expected = torch.full((2,), 0.5, dtype=torch.float64)
    for batch in (windows[:4], windows[4:]):
        lp = domain_logprobs(model, batch, [0, 1]).double()  # [2, b, 8]
        evidence = torch.cat([torch.zeros(2, lp.shape[1], 1, dtype=torch.float64), lp[..., :-1].cumsum(-1)], -1)
        w = torch.softmax(expected.log()[:, None, None] + evidence, dim=0)  # full-prefix posterior
        expected = 0.7 * expected + 0.3 * w.mean(dim=(1, 2))
    assert prior.dtype == torch.float64
    torch.testing.assert_close(prior, expected, atol=1e-6, rtol=0)
    assert abs(float(prior.sum()) - 1.0) < 1e-6 and not torch.allclose(prior, torch.full((2,), 0.5, dtype=torch.float64))
    # Identical experts: every posterior equals the prior, which stays uniform.
    same = to_demix(gpt2(), 2)
    torch.testing.assert_close(demix_cached_prior(same, windows.numpy()), torch.full((2,), 0.5, dtype=torch.float64))


@pytest.mark.parametrize("make", FAMILIES)
def test_save_load_round_trip(make, tmp_path):
    model = to_demix(make(), 2)
    diversify(model)
    x = tokens()
    set_domains(model, torch.tensor([0, 1, 1, 0]))
    before = logits_of(model, x)
    save_demix(model, tmp_path / "dm", domains=["legal", "code"])
    meta = json.loads((tmp_path / "dm" / "demix.json").read_text())
    assert meta["n_domains"] == 2 and meta["domains"] == ["legal", "code"]
    assert checkpoint.verify_weights(tmp_path / "dm") is not None  # sha256 stored and matching
    assert not list((tmp_path / "dm").glob(".*.tmp"))
    loaded, names = load_demix(tmp_path / "dm")
    assert names == ["legal", "code"] and type(loaded) is type(model) and not loaded.training
    set_domains(loaded, torch.tensor([0, 1, 1, 0]))
    assert torch.equal(logits_of(loaded, x), before)
    with pytest.raises(ElmError, match="domain names"):
        save_demix(model, tmp_path / "bad", domains=["only-one"])


def test_load_errors_and_misuse(tmp_path):
    model = to_demix(gpt2(), 2)
    with pytest.raises(ElmError, match="demix.json"):
        load_demix(tmp_path)
    save_demix(model, tmp_path / "dm")
    meta = json.loads((tmp_path / "dm" / "demix.json").read_text())
    (tmp_path / "dm" / "demix.json").write_text(json.dumps({**meta, "n_domains": 3, "domains": ["a", "b", "c"]}))
    with pytest.raises(ElmError, match="model.safetensors.*do not match"):
        load_demix(tmp_path / "dm")
    (tmp_path / "dm" / "demix.json").write_text(json.dumps(meta))
    blob = bytearray((tmp_path / "dm" / "model.safetensors").read_bytes())
    blob[-5] ^= 0xFF  # one flipped bit in the last tensor
    (tmp_path / "dm" / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(ElmError, match="checksum"):
        load_demix(tmp_path / "dm")
    with pytest.raises(ElmError, match="already"):
        to_demix(model, 2)
    with pytest.raises(ElmError, match="not a DEMix"):
        set_domains(gpt2(), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="no routing"):
        model(input_ids=tokens())
    with pytest.raises(ValueError, match="domain ids"):
        set_domains(model, torch.tensor([0, 2]))
