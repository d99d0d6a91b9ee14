"""GPU checks (marker `gpu`; skipped without CUDA). scripts/gpu-check.sh runs them on a GPU machine.

    pytest -m gpu tests/test_gpu.py

ELMFOREST_GPU_TEST_DEVICE=cpu runs the same code on the CPU (to check the tests themselves on a
machine without a GPU; the CUDA-only kernels are then the CPU ones).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from _resume_child import PatternSampler
from elmforest.combine.ensemble import Ensemble
from elmforest.combine.logprobs import expert_logprobs
from elmforest.combine.prior import cached_prior
from elmforest.combine.evaluate import perplexity, token_logprobs
from elmforest.models.factory import ModelSpec, build_model, measured_flops_per_token
from elmforest.train.spec import TrainSpec
from elmforest.train.loop import make_optimizer, train

DEVICE = os.environ.get("ELMFOREST_GPU_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(), reason="needs a CUDA device"),
]
# The fused attention kernels a GPU run should use (the CPU has its own flash kernel only).
FUSED_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION] if DEVICE.startswith("cuda") else [SDPBackend.FLASH_ATTENTION]


def _losses(metrics_path) -> list[float]:
    import json

    return [json.loads(line)["loss"] for line in metrics_path.read_text().splitlines()]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_training_loop_on_the_device_in_bf16(family, tmp_path):
    """elmforest's own loop on the device: bf16 autocast, SDPA attention; the loss falls."""
    model = build_model(ModelSpec(family, 2, 64, 2, 16, 32), 0)
    assert model.config._attn_implementation == "sdpa"
    spec = TrainSpec(lr=3e-3, total_steps=40, warmup_steps=4, bf16=True, device=DEVICE, log_every=5,
                     checkpoint_every=40)
    result = train(model, PatternSampler(0, rows=8), spec, tmp_path / "run", progress=False)
    losses = _losses(tmp_path / "run" / "metrics.jsonl")
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.6 * losses[0], losses
    assert next(model.parameters()).device.type == torch.device(DEVICE).type
    assert result["steps"] == 40
    fused = make_optimizer(model, spec).defaults.get("fused")
    print(f"training.make_optimizer on {DEVICE}: fused={fused}")  # reported, not required


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_fused_adamw_bf16_and_fused_attention_kernels(family):
    """The building blocks a fast GPU step uses, on our models: fused AdamW, bf16 autocast, and
    SDPA restricted to the fused kernels (an error if the model's attention cannot use them)."""
    torch.manual_seed(0)
    model = build_model(ModelSpec(family, 2, 64, 2, 16, 32), 0).to(DEVICE).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    sampler = PatternSampler(1, rows=8)
    losses = []
    for _ in range(40):
        batch = sampler.next_batch().to(DEVICE)
        with sdpa_kernel(FUSED_SDPA), torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
            logits = model(input_ids=batch[:, :-1], use_cache=False).logits
        assert logits.dtype == torch.bfloat16
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5, losses


def test_ensemble_scoring_on_the_device_equals_the_cpu():
    """Cached-prior ensemble perplexity and per-token log-probs: device vs CPU, float32."""
    models = [build_model(ModelSpec("gpt2", 2, 64, 2, 32, 300), s).eval() for s in range(3)]
    gen = torch.Generator().manual_seed(0)
    valid = torch.randint(0, 300, (8, 33), generator=gen)
    test = torch.randint(0, 300, (12, 33), generator=gen)
    prior_cpu = cached_prior(expert_logprobs(models, valid, 4), batch_size=4)
    cpu = perplexity(Ensemble(models, prior_cpu), test, batch_size=4)
    single_cpu = token_logprobs(models[0], test)
    # the study's path: CPU-resident models, each moved to the device for its pass and back after it
    moved = expert_logprobs(models, test, 4, device=DEVICE)
    assert moved.device.type == "cpu" and all(next(m.parameters()).device.type == "cpu" for m in models)
    assert torch.allclose(moved[0], single_cpu, atol=1e-4)

    on_device = [m.to(DEVICE) for m in models]
    prior_dev = cached_prior(expert_logprobs(on_device, valid, 4), batch_size=4)
    dev = perplexity(Ensemble(on_device, prior_dev), test, batch_size=4)
    single_dev = token_logprobs(on_device[0], test)
    assert single_dev.device.type == "cpu"  # returned on the tokens' device
    assert torch.allclose(prior_dev, prior_cpu, atol=1e-5)
    assert abs(dev["nll"] - cpu["nll"]) < 1e-4 and dev["tokens"] == cpu["tokens"]
    assert torch.allclose(single_dev, single_cpu, atol=1e-4)


def test_flop_count_is_the_same_on_the_device():
    model = build_model(ModelSpec("llama", 2, 64, 2, 32, 300), 0)
    on_cpu = measured_flops_per_token(model, 32)
    assert measured_flops_per_token(model.to(DEVICE), 32) == on_cpu
