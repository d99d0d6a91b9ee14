"""recipes/paper-125m.yaml: the paper's 125M setup validates, and its model builds, trains and evaluates.

The full recipe needs a GPU (README, "The 125M recipe"); here it runs 2 steps on CPU with a
reduced budget through `--set`, on a synthetic corpus with the demo corpus's domain names, with
the 125M architecture itself (12 layers, width 768) at a 16-token context.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from elmforest.cli import main
from elmforest.study.recipe import load_recipe
from elmforest.models.factory import build_model, flops_per_token, non_embedding_params, resolve_spec
from elmforest.train.budget import plan_budget
from paperdata import make_paper_corpus

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "paper-125m.yaml"
DEMO_DOMAINS = {"news", "legal", "code", "health_tweets", "drama", "speeches", "reviews", "factbook", "dialogue"}


def test_recipe_is_the_papers_125m_setup():
    r = load_recipe(RECIPE)
    spec = resolve_spec(r.model, r.tokenizer.vocab_size)
    assert (spec.family, spec.layers, spec.width, spec.heads, spec.context) == ("gpt2", 12, 768, 12, 1024)
    model = build_model(spec, 0)
    assert 84_000_000 < non_embedding_params(model) < 86_000_000  # GPT-3 small's ~85M
    o = r.optim
    assert (o.lr, tuple(o.betas), o.weight_decay, o.grad_clip) == (5e-4, (0.9, 0.95), 0.1, 0.1)
    assert (o.warmup_fraction, o.final_lr_fraction, r.budget.seed_fraction) == (0.08, 0.0, 0.5)
    assert len(r.train_domains) == 8 and set(r.train_domains) < DEMO_DOMAINS
    assert Path(r.corpus).name == "demo"
    b = plan_budget(r, spec.context)
    assert b.total_steps == 512 and b.seed_steps == 256 and b.warmup_steps == 41
    assert b.expert_batch_tokens * 8 == b.batch_tokens == 262_144  # experts at 1/8 of the dense batch
    assert b.dense_blocks_per_domain * 8 * 1024 * b.dense_micro_batches == b.batch_tokens  # balanced
    # README's compute figure for one arm (the dense arm = the forest arm): (6N + 6*L*s*d) x T
    assert abs(flops_per_token(model.config, 1024) * r.budget.total_tokens / 7.61e16 - 1) < 1e-3


@pytest.mark.slow
def test_recipe_runs_two_steps_on_cpu(tmp_path):
    corpus = make_paper_corpus(tmp_path / "corpus", docs=80)
    out = tmp_path / "run"
    overrides = [
        f"corpus={corpus}",
        # Two experts keep the test short: at 125M every expert writes ~1.3 GB of checkpoint
        # (weights + AdamW state), and writing, not computing, is what a CPU run waits on.
        "train_domains=[news, legal]",
        "tokenizer.vocab_size=512",
        "tokenizer.sample_bytes_per_domain=20000",
        "model.context=16",
        "budget.total_tokens=64",  # 2 steps of 32 tokens: one for the seed, one for dense / experts
        "budget.batch_tokens=32",
        "optim.micro_batch_tokens=32",
        "optim.device=cpu",
        "optim.bf16=false",
        "optim.threads=1",
        "arms.dense=false",
        "arms.random_split=false",
        "eval.max_tokens_per_domain=33",
        "eval.prior_sequences=2",
        "eval.prior_batch=1",
        "eval.batch_size=2",
        "eval.valid_windows_per_domain=1",
        f"out={out}",
    ]
    main(["run", str(RECIPE), "--no-progress", *[a for o in overrides for a in ("--set", o)]])
    results = json.loads((out / "results.json").read_text())
    seed = json.loads((out / "seed" / "seed.json").read_text())
    assert seed["step"] == 1
    config = json.loads((out / "forest" / "news" / "config.json").read_text())
    assert (config["n_layer"], config["n_embd"], config["n_head"]) == (12, 768, 12)
    expert = json.loads((out / "forest" / "news" / "expert.json").read_text())
    assert expert["steps"] == 1 and expert["tokens"] == 16  # 1/2 of the dense batch
    for method in ("seed", "btm_ensemble_cached", "btm_average_posterior"):
        assert set(results[method]["train"]) == {"news", "legal"} and results[method]["novel"] == {}  # none
        assert all(v > 1.0 for v in results[method]["train"].values())
    assert "btm_ensemble_cached" in (out / "report.md").read_text()
