"""The DEMix arm (arms.demix): RUN/seed -> RUN/demix, one MLP per train domain inside one model,
continued from the seed step on the dense run's batches (compute-matched; `mixtures.stages`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from elmforest.combine.forest import read_json
from elmforest.mixtures import stages
from elmforest.mixtures.demix import load_demix
from elmforest.study.arms.base import Arm, ArmFields, StageContext
from elmforest.study.arms.record import ArmRecord
from elmforest.train import distributed


class DemixFields(ArmFields):
    demix: bool = Field(False, description="Train DEMix: one MLP per train domain inside one model, from the seed.")


class DemixArm(Arm):
    """DEMix: the seed with every MLP split into one copy per train domain, trained compute-matched."""

    name = "demix"
    fields = DemixFields
    switch = "demix"

    def announce(self, recipe: Any, name: str) -> str:
        return "[6/9] DEMix: one MLP per train domain inside one model, from the seed, compute-matched"

    def train(self, ctx: StageContext, name: str) -> None:
        distributed.run_procs(stages.train_demix, ctx.recipe, ctx.out, progress=ctx.progress, procs=ctx.procs)

    def provide(self, models: Any, name: str) -> None:
        if (stages.demix_dir(models.run_dir) / stages.DEMIX_RUN_JSON).is_file():
            models.demix = load_demix(stages.demix_dir(models.run_dir))

    def derive(self, recipe: Any, run_dir: Path, name: str, earlier: dict[str, ArmRecord]) -> ArmRecord | None:
        path = stages.demix_dir(run_dir) / stages.DEMIX_RUN_JSON
        if not path.is_file():
            return None
        d = read_json(path, stages.DEMIX_RUN_JSON)
        return ArmRecord(arm=name, tokens=int(d["seed_tokens"] + d["tokens"]), flops=float(d["seed_flops"] + d["flops"]),
                         params_at_inference=int(d["params"]), compute_matched=True)

    def notes(self, record: ArmRecord, run_dir: Path, records: dict[str, ArmRecord]) -> list[str]:
        return [
            "DEMix (`demix_cached`) counts its shared weights plus all n domain MLPs as parameters at inference: "
            "the cached-prior mixture runs every domain's MLPs, after n single-domain passes for the posterior."
        ]
