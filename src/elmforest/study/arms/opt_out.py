"""Opting domains out after training (arms.opt_out): for each listed train domain, the BTM forest
without its expert (`study.removal`, RUN/forget_<d>.json) and, when trained, the anchored mixture
without its expert and router row (RUN/anchored_moe_optout_<d>.json): perplexity before and after,
no retraining. It trains nothing of its own, so it keeps no budget record; its stage runs after
the evaluation and results.json's "opt_out" holds its tables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from elmforest.combine.forest import read_json
from elmforest.study.arms.base import Arm, ArmFields, StageContext

PREFIX = "opt_out_"


class OptOutFields(ArmFields):
    opt_out: list[str] = Field(
        default_factory=list,
        description="Train domains to opt out after training: the anchored mixture without that expert and the "
        "BTM forest without it (`forget`), each domain's perplexity before and after.",
    )


def tables(run_dir: Path, domain: str) -> dict[str, Path]:
    """{method: the before/after table of opting `domain` out of it}."""
    return {"btm_ensemble_cached": Path(run_dir) / f"forget_{domain}.json",
            "anchored_moe": Path(run_dir) / f"anchored_moe_optout_{domain}.json"}


class OptOutArm(Arm):
    """Domains opted out of the trained forest and anchored mixture after training (before/after tables)."""

    name = "opt_out"
    fields = OptOutFields
    after_evaluation = True
    records = False

    def instances(self, recipe: Any) -> list[str]:
        return [PREFIX + d for d in recipe.arms.opt_out]

    def validate(self, recipe: Any) -> None:
        unknown = [d for d in recipe.arms.opt_out if d not in recipe.train_domains]
        if unknown:
            raise ValueError(f"arms.opt_out names {unknown[0]!r}, which is not a train domain")

    def train(self, ctx: StageContext, name: str) -> None:
        from elmforest.mixtures.anchored_moe import opt_out_study
        from elmforest.study.removal import removal_study

        domain, paths = name.removeprefix(PREFIX), tables(ctx.out, name.removeprefix(PREFIX))
        if not paths["btm_ensemble_cached"].is_file():
            removal_study(ctx.recipe, ctx.out, domain, log=ctx.log)
        if ctx.recipe.arms.anchored and not paths["anchored_moe"].is_file():
            opt_out_study(ctx.recipe, ctx.out, domain, log=ctx.log)


def opt_out_results(recipe: Any, run_dir: Path) -> dict[str, dict[str, Any]]:
    """results.json's "opt_out": {domain: {method: its before/after table}} of one run folder."""
    return {d: {m: read_json(f, f.name) for m, f in tables(run_dir, d).items() if f.is_file()}
            for d in recipe.arms.opt_out}
