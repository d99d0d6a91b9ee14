"""The adapter forest's dense baseline at equal tokens and FLOPs: one adapter on every train domain.

    dense_adapter  RUN/dense_adapter/adapter   with adapter experts (the recipe's `experts:`), one LoRA
                                               adapter of the same shape on the same frozen seed, trained
                                               on domain-balanced batches of the dense batch size (the
                                               rows the dense run sees) for the forest's steps
                                               (arms.dense_adapter)

The forest's n adapters each train B/n tokens per step and the dense adapter B, on the same base, so
both count the same tokens and the same frozen-base FLOPs (`models.adapters.adapter_flops_per_token`);
the `dense` arm (a full fine-tune of the same tokens) costs more per token. It trains as an expert
job (`btm.experts`): every launcher, resume and data-parallel training apply.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from elmforest.btm import seed as seeding
from elmforest.btm.experts import branch_expert, expert_job, train_pending
from elmforest.combine.forest import EXPERT_JSON, read_json
from elmforest.models.adapters import merged_adapter_model
from elmforest.study.arms.base import Arm, ArmFields, StageContext
from elmforest.study.arms.dense import model_params
from elmforest.study.arms.record import ArmRecord
from elmforest.train.budget import plan_budget, train_spec

ADAPTER = "adapter"  # the expert folder inside RUN/dense_adapter


class DenseAdapterFields(ArmFields):
    dense_adapter: bool = Field(
        True,
        description="With adapter experts (experts:): also train one adapter of the same shape on all train domains "
        "(domain-balanced, the dense batch) for the forest's steps: its tokens and FLOPs, as one model.",
    )


def dense_adapter_job(recipe: Any, run_dir: Path) -> Any:
    """The expert job of the dense adapter: every train domain in one part, rows dealt
    domain-balanced (`data.sampler.RandomSplitSampler`), the dense micro-batches of the dense run."""
    job = expert_job(recipe, run_dir, "dense_adapter",
                     {"kind": "random_split", "domains": list(recipe.train_domains), "part": 0, "parts": 1, "mix": "balanced"})
    budget = plan_budget(recipe, job.context)
    rows = budget.dense_blocks_per_domain * budget.n_experts
    return job.model_copy(update={"batch_blocks": rows, "spec": train_spec(recipe, budget, budget.dense_micro_batches)})


class DenseAdapterArm(Arm):
    """One adapter on all train domains, at the adapter forest's tokens and FLOPs."""

    name = "dense_adapter"
    fields = DenseAdapterFields
    switch = "dense_adapter"

    def instances(self, recipe: Any) -> list[str]:
        return super().instances(recipe) if recipe.experts is not None else []

    def adapter_dir(self, run_dir: Path) -> Path:
        return self.folder(run_dir, self.name) / ADAPTER

    def announce(self, recipe: Any, name: str) -> str:
        return "[3/9] dense adapter: one adapter on all train domains (the adapter forest's tokens and FLOPs)"

    def train(self, ctx: StageContext, name: str) -> None:
        seed = seeding.seed_dir(ctx.out)
        folder = branch_expert(self.adapter_dir(ctx.out), dense_adapter_job(ctx.recipe, ctx.out), from_seed=seed)
        train_pending(ctx.recipe, [folder], ctx.log)

    def provide(self, models: Any, name: str) -> None:
        folder = self.adapter_dir(models.run_dir)
        if (folder / EXPERT_JSON).is_file():
            meta = read_json(folder / EXPERT_JSON, "expert.json")
            models.singles[name] = merged_adapter_model(meta["base"], folder).eval()

    def derive(self, recipe: Any, run_dir: Path, name: str, earlier: dict[str, ArmRecord]) -> ArmRecord | None:
        folder = self.adapter_dir(run_dir)
        if not (folder / EXPERT_JSON).is_file():
            return None
        meta = read_json(folder / EXPERT_JSON, "expert.json")
        branched = read_json(seeding.seed_dir(run_dir) / seeding.SEED_JSON, seeding.SEED_JSON)  # like a forest: seed + adapter
        return ArmRecord(
            arm=name,
            tokens=int(branched["tokens"] + meta["tokens"]),
            flops=float(branched["flops"] + meta["flops"]),
            params_at_inference=model_params(Path(meta["base"])),  # merged into its base: the base's shape
            compute_matched=True,
        )
