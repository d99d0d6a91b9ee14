"""Dense arms: the seed, the compute-matched dense LM, and dense LMs at k x the compute.

    seed        RUN/seed      the domain-balanced dense run at the seed step (budget.seed_fraction),
                              snapshotted with the extra seeds of arms.seed_fractions
    dense       RUN/dense     the same run continued to the full budget (arms.dense)
    dense_x<k>  RUN/dense_x<k> from scratch on k x the budget, one per arms.dense_multiples entry
                              (results.json compute_to_match reads them)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from elmforest.btm import seed as seeding
from elmforest.combine.forest import read_json
from elmforest.models.factory import load_model, param_count
from elmforest.study.arms.base import Arm, ArmFields, StageContext
from elmforest.study.arms.record import ArmRecord
from elmforest.study.methods import StudyMethod, dense_multiple_method
from elmforest.train import distributed


def model_params(folder: Path) -> int:
    """Parameters of the model saved in `folder` (tied tensors once)."""
    return param_count(load_model(folder))


def lend_model(models: Any, name: str, folder: Path) -> None:
    """Load the model in `folder` as `models.singles[name]`, when it is there (a method that needs
    it and finds none says so, naming itself and the domain)."""
    if (folder / "model.safetensors").is_file():
        models.singles[name] = load_model(folder).eval()


def run_record(name: str, folder: Path, meta: dict[str, Any], compute_matched: bool) -> ArmRecord:
    """The record of a one-model arm whose training JSON holds its cumulative tokens and FLOPs."""
    return ArmRecord(arm=name, tokens=int(meta["tokens"]), flops=float(meta["flops"]),
                     params_at_inference=model_params(folder), compute_matched=compute_matched)


def dense_run(ctx: StageContext, full: bool) -> None:
    """The domain-balanced dense run to the seed step (snapshotting the seeds of arms.seed_fractions
    on the way), or with `full` on to the whole budget; data-parallel over ctx.procs processes."""
    distributed.run_procs(seeding.train_seed, ctx.recipe, ctx.out, full=full, progress=ctx.progress,
                          seed_fractions=list(ctx.recipe.arms.seed_fractions), procs=ctx.procs)


class SeedArm(Arm):
    """The seed: the dense run at the seed step (every forest branches from it)."""

    name = "seed"

    def announce(self, recipe: Any, name: str) -> str:
        return "[2/9] seed (dense, domain-balanced)"

    def train(self, ctx: StageContext, name: str) -> None:
        dense_run(ctx, full=False)

    def provide(self, models: Any, name: str) -> None:
        lend_model(models, name, seeding.seed_dir(models.run_dir))

    def derive(self, recipe: Any, run_dir: Path, name: str, earlier: dict[str, ArmRecord]) -> ArmRecord | None:
        folder = seeding.seed_dir(run_dir)
        if not (folder / seeding.SEED_JSON).is_file():
            return None
        return run_record(name, folder, read_json(folder / seeding.SEED_JSON, seeding.SEED_JSON), compute_matched=False)


class DenseFields(ArmFields):
    dense: bool = Field(True, description="Train the compute-matched dense LM (the seed run continued to the full budget).")


class DenseArm(Arm):
    """The compute-matched dense LM: the seed run continued to the full budget."""

    name = "dense"
    fields = DenseFields
    switch = "dense"

    def announce(self, recipe: Any, name: str) -> str:
        return "[3/9] dense baseline (the seed run continued to the full budget)"

    def train(self, ctx: StageContext, name: str) -> None:
        dense_run(ctx, full=True)

    def provide(self, models: Any, name: str) -> None:
        lend_model(models, name, seeding.dense_dir(models.run_dir))

    def derive(self, recipe: Any, run_dir: Path, name: str, earlier: dict[str, ArmRecord]) -> ArmRecord | None:
        folder = seeding.dense_dir(run_dir)
        if not (folder / "dense.json").is_file():
            return None
        return run_record(name, folder, read_json(folder / "dense.json", "dense.json"), compute_matched=True)


class DenseMultipleFields(ArmFields):
    dense_multiples: list[float] = Field(
        default_factory=list,
        description="Compute multiples k > 1: dense LMs trained from scratch on k x the budget (each with its own "
        "full schedule), to measure how much compute dense needs to match the forest (results.json compute_to_match).",
    )

    @field_validator("dense_multiples")
    @classmethod
    def _multiples(cls, v: list[float]) -> list[float]:
        if any(k <= 1 for k in v):
            raise ValueError("each multiple must be > 1 (multiple 1 is the dense arm itself)")
        if len(set(v)) != len(v):
            raise ValueError("duplicate multiple")
        return sorted(v)


def dense_multiples(recipe: Any) -> dict[str, float]:
    """{arm name: k} of the dense LMs at k x the compute a recipe trains (none without arms.dense)."""
    return {seeding.dense_multiple_name(k): k for k in recipe.arms.dense_multiples} if recipe.arms.dense else {}


class DenseMultipleArm(Arm):
    """A family: one dense LM per arms.dense_multiples entry k, from scratch on k x the budget."""

    name = "dense_x<k>"
    fields = DenseMultipleFields

    def instances(self, recipe: Any) -> list[str]:
        return list(dense_multiples(recipe))

    def announce(self, recipe: Any, name: str) -> str:
        return f"[3/9] dense at {dense_multiples(recipe)[name]:g} x the compute, from scratch with its own schedule"

    def train(self, ctx: StageContext, name: str) -> None:
        distributed.run_procs(seeding.train_dense_multiple, ctx.recipe, ctx.out, dense_multiples(ctx.recipe)[name],
                              progress=ctx.progress, procs=ctx.procs)

    def provide(self, models: Any, name: str) -> None:
        lend_model(models, name, models.run_dir / name)

    def methods(self, recipe: Any, name: str) -> list[StudyMethod]:
        return [dense_multiple_method(dense_multiples(recipe)[name])]

    def derive(self, recipe: Any, run_dir: Path, name: str, earlier: dict[str, ArmRecord]) -> ArmRecord | None:
        folder = seeding.dense_multiple_dir(run_dir, dense_multiples(recipe)[name])
        if not (folder / seeding.DENSE_MULTIPLE_JSON).is_file():
            return None
        meta = read_json(folder / seeding.DENSE_MULTIPLE_JSON, seeding.DENSE_MULTIPLE_JSON)
        return run_record(name, folder, meta, compute_matched=False)
