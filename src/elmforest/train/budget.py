"""The compute budget of a study: steps, batch shapes and the schedule every arm shares.

Compute matching (the paper's): with n experts, each expert's batch is 1/n of the dense batch
and it runs the same number of steps as the dense continuation, so

    dense tokens  = total_steps * B
    forest tokens = seed_steps * B + n * (total_steps - seed_steps) * B / n   (the same)

`plan_budget` checks that a recipe's budget divides into whole steps, domains and windows and
says which key when it does not; `train_spec` turns it into the one schedule every arm trains on.
"""

from __future__ import annotations

import dataclasses

import torch

from elmforest.config import Recipe
from elmforest.errors import ElmError
from elmforest.train.spec import TrainSpec



@dataclasses.dataclass(frozen=True)
class Budget:
    """Steps and batch shapes derived from a recipe's budget and the model's context length."""

    context: int
    n_experts: int
    batch_tokens: int  # dense tokens per optimizer step (B)
    total_steps: int  # T // B
    seed_steps: int  # round(seed_fraction * total_steps)
    warmup_steps: int
    dense_micro_batches: int  # forward passes per dense step
    dense_blocks_per_domain: int  # windows per domain in one dense micro-batch
    expert_micro_batches: int
    expert_blocks: int  # windows in one expert micro-batch

    @property
    def expert_batch_tokens(self) -> int:
        return self.batch_tokens // self.n_experts

    def tokens(self, arm: str) -> int:
        """Tokens each arm trains on in all (the seed's counted in the forest arms)."""
        if arm == "seed":
            return self.seed_steps * self.batch_tokens
        return self.total_steps * self.batch_tokens  # dense, and seed + n experts at B/n


def plan_budget(recipe: Recipe, context: int, source: str = "recipe") -> Budget:
    """Check that the budget divides into whole steps, domains and windows; say which key when not."""
    b, n = recipe.budget, len(recipe.train_domains)
    if b.batch_tokens % (context * n):
        raise ElmError(
            f"budget.batch_tokens={b.batch_tokens} must be a multiple of context x train domains = {context} x {n}",
            source,
        )
    total_steps = b.total_tokens // b.batch_tokens
    if total_steps < 2:
        raise ElmError(
            f"budget.total_tokens={b.total_tokens} gives {total_steps} steps of {b.batch_tokens} tokens; need >= 2",
            source,
        )
    seed_steps = round(b.seed_fraction * total_steps)
    if seed_steps >= total_steps:
        raise ElmError(f"budget.seed_fraction={b.seed_fraction} leaves no steps for the experts", source)
    micro = recipe.optim.micro_batch_tokens or b.batch_tokens
    if b.batch_tokens % micro or micro % (context * n):
        raise ElmError(
            f"optim.micro_batch_tokens={micro} must divide budget.batch_tokens={b.batch_tokens} "
            f"and be a multiple of {context * n} (context x train domains)",
            source,
        )
    expert_batch = b.batch_tokens // n
    expert_micro = min(micro, expert_batch)
    if expert_batch % expert_micro or expert_micro % context:
        raise ElmError(
            f"optim.micro_batch_tokens={micro}: an expert's batch of {expert_batch} tokens must split into "
            f"micro-batches of whole {context}-token windows",
            source,
        )
    warmup = min(round(recipe.optim.warmup_fraction * total_steps), total_steps - 1)
    return Budget(
        context=context,
        n_experts=n,
        batch_tokens=b.batch_tokens,
        total_steps=total_steps,
        seed_steps=seed_steps,
        warmup_steps=warmup,
        dense_micro_batches=b.batch_tokens // micro,
        dense_blocks_per_domain=micro // (context * n),
        expert_micro_batches=expert_batch // expert_micro,
        expert_blocks=expert_micro // context,
    )


def check_data_parallel(budget: Budget, procs: int, source: str = "recipe") -> None:
    """Refuse, before anything trains, a process count that cannot split the micro-batches: each
    of the G data-parallel processes takes 1/G of a micro-batch's windows (rows)."""
    rows = {"dense": budget.dense_blocks_per_domain * budget.n_experts, "expert": budget.expert_blocks}
    for arm, n in rows.items():
        if n % procs:
            raise ElmError(
                f"launcher.procs_per_job={procs} does not divide the {n} windows of a {arm} micro-batch "
                "(optim.micro_batch_tokens / model context)",
                source,
            )


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def train_spec(recipe: Recipe, budget: Budget, micro_batches: int, threads: int | None = None) -> TrainSpec:
    """The TrainSpec every arm shares: one schedule over `total_steps` (warm-up, linear decay)."""
    o = recipe.optim
    return TrainSpec(
        lr=o.lr,
        betas=tuple(o.betas),
        weight_decay=o.weight_decay,
        warmup_steps=budget.warmup_steps,
        total_steps=budget.total_steps,
        final_lr_fraction=o.final_lr_fraction,
        grad_clip=o.grad_clip,
        micro_batches=micro_batches,
        bf16=o.bf16,
        compile=o.compile,
        threads=threads if threads is not None else o.threads,
        log_every=o.log_every,
        checkpoint_every=o.checkpoint_every,
        eval_every=o.eval_every,
        seed=o.seed,
        device=resolve_device(o.device),
    )
