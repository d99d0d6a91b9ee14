"""The BTX arm (arms.btx, llama only): the BTM forest's MLPs mixed into one Mixtral
mixture-of-experts in RUN/btx, its routers (or every parameter) fine-tuned (`mixtures.stages`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from elmforest.combine.forest import read_json
from elmforest.errors import ElmError
from elmforest.mixtures import stages
from elmforest.models.factory import load_model
from elmforest.study.arms.base import Arm, ArmFields, StageContext
from elmforest.study.arms.record import ArmRecord


class BtxFields(ArmFields):
    btx: bool = Field(False, description="Mix the BTM forest into one Mixtral mixture-of-experts (llama only).")
    btx_tokens: int = Field(0, ge=0, description="Extra fine-tuning tokens for BTX (reported separately).")
    btx_train_all: bool = Field(
        False, description="BTX fine-tunes every parameter (the paper's MoE fine-tuning), not only the routers."
    )


class BtxArm(Arm):
    """BTX: the forest's MLPs as one Mixtral MoE, the rest averaged, routers fine-tuned (not compute-matched)."""

    name = "btx"
    fields = BtxFields
    switch = "btx"

    def preflight(self, recipe: Any, source: str) -> None:
        family = stages.model_family(recipe)
        if recipe.arms.btx and family != "llama":
            raise ElmError(
                f"arms.btx needs llama-family experts, but the model family is {family!r}; "
                "set model.family: llama (a GPT-2 MLP has no Mixtral counterpart)",
                source,
            )

    def announce(self, recipe: Any, name: str) -> str:
        what = "every parameter" if recipe.arms.btx_train_all else "routers"
        return f"[7/9] BTX: the forest mixed into one Mixtral MoE, {what} fine-tuned on {recipe.arms.btx_tokens:,} tokens"

    def train(self, ctx: StageContext, name: str) -> None:
        a = ctx.recipe.arms
        stages.build_btx(ctx.recipe, ctx.out, a.btx_tokens, a.btx_train_all, log=ctx.log)

    def provide(self, models: Any, name: str) -> None:
        if (stages.btx_dir(models.run_dir) / stages.MIX_JSON).is_file():
            models.singles[name] = load_model(stages.btx_dir(models.run_dir)).eval()  # a Mixtral folder

    def derive(self, recipe: Any, run_dir: Path, name: str, earlier: dict[str, ArmRecord]) -> ArmRecord | None:
        path = stages.btx_dir(run_dir) / stages.MIX_JSON
        if not path.is_file() or "btm" not in earlier:
            return None
        m = read_json(path, stages.MIX_JSON)
        ft, btm = m["finetune"], earlier["btm"]
        return ArmRecord(arm=name, tokens=btm.tokens + int(ft["tokens"]), flops=btm.flops + float(ft["flops"]),
                         params_at_inference=int(m["params"]), extra_tokens=int(ft["tokens"]), compute_matched=False)

    def notes(self, record: ArmRecord, run_dir: Path, records: dict[str, ArmRecord]) -> list[str]:
        m = read_json(stages.btx_dir(run_dir) / stages.MIX_JSON, stages.MIX_JSON)
        ft = m["finetune"]
        return [
            f"BTX (`btx`) is not compute-matched: its training FLOPs are the BTM forest's ({records['btm'].flops:.3e}) "
            f"plus {ft['flops']:.3e} for fine-tuning on {ft['tokens']:,} tokens (arms.btx_tokens; each token runs "
            f"the top-{m['top_k']} MoE forward and backward). Its parameters at inference count every expert MLP "
            f"and router; {m['top_k']} of {len(m['experts'])} MLPs run per token."
        ]
