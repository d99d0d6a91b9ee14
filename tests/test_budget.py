"""Compute matching in the plan itself (fast, nothing trains): every expert's step is 1/n of the
dense step, in the budget and in the job each expert is launched with."""

from __future__ import annotations

import pytest

from elmforest.btm import experts
from elmforest.config import Recipe
from elmforest.train.budget import plan_budget
from tinydata import tiny_recipe

CONTEXT = 32


def _recipe(tmp_path, n: int, batch: int, micro: int | None) -> Recipe:
    data = tiny_recipe(tmp_path / "corpus", tmp_path / "run")
    data["train_domains"] = [f"d{i}" for i in range(n)]
    data["budget"].update(batch_tokens=batch, total_tokens=batch * 10)
    data["optim"]["micro_batch_tokens"] = micro
    return Recipe.model_validate(data)


# (train domains, dense batch tokens, micro-batch tokens): the expert's batch in one, or several, micro-batches
CASES = [(2, 256, None), (3, 384, None), (4, 1024, 256), (2, 512, 128)]


@pytest.mark.parametrize("n, batch, micro", CASES)
def test_each_expert_step_is_one_nth_of_the_dense_step(tmp_path, n, batch, micro):
    budget = plan_budget(_recipe(tmp_path, n, batch, micro), CONTEXT)
    dense_step = budget.dense_micro_batches * budget.dense_blocks_per_domain * n * CONTEXT
    expert_step = budget.expert_micro_batches * budget.expert_blocks * CONTEXT
    assert dense_step == batch
    assert expert_step == batch // n == budget.expert_batch_tokens
    # so the seed plus n experts cost what the dense run costs
    forest = budget.seed_steps * dense_step + n * (budget.total_steps - budget.seed_steps) * expert_step
    assert forest == budget.total_steps * dense_step == budget.tokens("dense")


@pytest.mark.parametrize("n, batch, micro", CASES)
def test_an_expert_job_trains_one_nth_of_the_dense_batch(tmp_path, monkeypatch, n, batch, micro):
    recipe = _recipe(tmp_path, n, batch, micro)
    monkeypatch.setattr(experts, "model_context", lambda recipe, tok: CONTEXT)  # no tokenizer needed
    job = experts.expert_job(recipe, tmp_path / "run", "d0", {"kind": "domain", "domain": "d0"})
    # tokens per optimizer step = windows per micro-batch x micro-batches x window length
    assert job.batch_blocks * job.spec.micro_batches * job.context == batch // n
    assert job.spec.total_steps == 10 and job.start_step == round(0.5 * 10)
