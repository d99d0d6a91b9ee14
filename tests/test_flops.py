"""FLOP counts: the analytic `flops_per_token` against torch's FlopCounterMode on real training steps.

What each counts, per trained token (L layers, width d, window s, vocabulary V):

    flops_per_token (Kaplan)   6*N + 6*L*s*d
    FlopCounterMode            6*N_mm + 12*L*s*d + 6*d*V

N counts every non-embedding parameter; N_mm only the linear layers' weights (biases and norm
gains cost elementwise work, which the counter does not count). Attention: the counter charges
QK^T and the weighted sum over the full s x s square (4*L*s*d forward, twice that backward), the
formula half of it (the causal average). The logits matmul (2*d*V forward, 4*d*V backward) is
outside the formula. So after adding 6*d*V + 6*L*s*d to the formula the two agree up to
6*(N - N_mm): exactly that here, under 2% of the formula at width 64 and 0.14% at 125M.

Every expected number below is worked out from the layer shapes in the test, not from the model.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import MixtralConfig, MixtralForCausalLM

from _resume_child import PatternSampler
from elmforest.config import ModelConfig
from elmforest.models.factory import ModelSpec, build_model, flops_per_token, measured_flops_per_token, resolve_spec
from elmforest.train.spec import TrainSpec
from elmforest.train.loop import train

L, D, HEADS, VOCAB = 2, 64, 2, 300


def _shapes(family: str, layers: int, d: int) -> tuple[int, int]:
    """(N_mm, N): linear weights, and all non-embedding parameters, from the block layout."""
    if family == "gpt2":
        # c_attn d x 3d, attn c_proj d x d, c_fc d x 4d, mlp c_proj 4d x d
        n_mm = layers * 12 * d * d
        # biases 3d + d + 4d + d, two LayerNorms (gain + bias) per block, and ln_f
        return n_mm, n_mm + layers * (9 * d + 4 * d) + 2 * d
    inner = 8 * math.ceil(d / 3)  # SwiGLU width: 8/3 d rounded up to a multiple of 8
    n_mm = layers * (4 * d * d + 3 * d * inner)  # q k v o, gate up down
    return n_mm, n_mm + layers * 2 * d + d  # two RMSNorm gains per block, and the final norm


def _counted(family: str, layers: int, d: int, s: int, vocab: int) -> int:
    n_mm, _ = _shapes(family, layers, d)
    return 6 * n_mm + 12 * layers * s * d + 6 * d * vocab


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_one_training_step_counted_against_the_formula(family, tmp_path):
    model = build_model(ModelSpec(family, L, D, HEADS, 32, VOCAB), 0)
    sampler = PatternSampler(0, rows=4, block=16)  # 4 windows of 16 tokens
    spec = TrainSpec(total_steps=1, micro_batches=2, log_every=1, checkpoint_every=1)
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):  # attention as plain bmm's the counter sees
        result = train(model, sampler, spec, tmp_path / "run", progress=False)
    tokens, s = 2 * 4 * 16, 16
    assert result["tokens"] == tokens
    n_mm, n = _shapes(family, L, D)
    formula = 6 * n + 6 * L * s * D
    assert result["flops"] == tokens * formula == tokens * flops_per_token(model.config, s)
    # What ran inside the model, forward and backward (the counter attributes both to it); the
    # optimizer step and clipping add no matmuls, and a one-time matmul outside the model (such
    # as a timed peak-FLOP/s measurement) is not the step's.
    counted = sum(counter.get_flop_counts()[type(model).__name__].values())
    assert counted == tokens * _counted(family, L, D, s, VOCAB)
    # after the known terms, formula and counter differ by the biases and norm gains only
    accounted = counted / tokens - 6 * D * VOCAB - 6 * L * s * D
    assert formula - accounted == 6 * (n - n_mm)
    assert abs(formula - accounted) / formula < 0.02


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_measured_flops_per_token_helper(family):
    model = build_model(ModelSpec(family, L, D, HEADS, 32, VOCAB), 0)
    for p in model.parameters():
        p.grad = torch.full_like(p, 3.0)
    assert measured_flops_per_token(model, 32) == _counted(family, L, D, 32, VOCAB)
    assert measured_flops_per_token(model, 8, batch=3) == _counted(family, L, D, 8, VOCAB)
    assert all(torch.equal(p.grad, torch.full_like(p, 3.0)) for p in model.parameters())  # caller's grads kept


def test_measured_flops_of_a_mixture_of_experts_count_the_routed_experts():
    """Mixtral with 4 experts, 2 per token: each token pays 2 expert MLPs, whatever the routing."""
    d, inner, experts, k, s = 64, 96, 4, 2, 32
    config = MixtralConfig(vocab_size=VOCAB, hidden_size=d, intermediate_size=inner, num_hidden_layers=L,
                           num_attention_heads=HEADS, num_key_value_heads=HEADS, num_local_experts=experts,
                           num_experts_per_tok=k, max_position_embeddings=s)
    torch.manual_seed(0)
    model = MixtralForCausalLM(config)
    before = model.config._experts_implementation
    per_layer = 4 * d * d + k * 3 * d * inner + d * experts  # attention, k routed SwiGLU experts, router
    assert measured_flops_per_token(model, s) == 6 * L * per_layer + 12 * L * s * d + 6 * d * VOCAB
    assert model.config._experts_implementation == before  # the grouped kernel is put back


def test_125m_counts():
    """GPT-3 small at vocabulary 50264, counted on a 64-token window (the formula is linear in s)."""
    spec = resolve_spec(ModelConfig(size="125m"), 50264)
    model = build_model(spec, 0)
    s = 64
    n_mm, n = _shapes("gpt2", 12, 768)
    assert n_mm == 84_934_656 and n == 85_056_000
    assert flops_per_token(model.config, 1024) == 6 * n + 6 * 12 * 1024 * 768 == 566_959_104
    assert measured_flops_per_token(model, s) == _counted("gpt2", 12, 768, s, 50264)
    assert 6 * (n - n_mm) / flops_per_token(model.config, s) < 0.0015
