"""The anchored arms (arms.anchored, llama only; FlexOlmo): an FFN copy per train domain trained
beside the frozen seed, merged into one opt-out mixture in RUN/anchored_moe; with
arms.anchored_router_tokens, its router rows tuned in RUN/anchored_moe_router_tuned
(`mixtures.anchored`, `mixtures.anchored_moe`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from elmforest.combine.forest import read_json
from elmforest.errors import ElmError
from elmforest.mixtures import anchored, anchored_moe, stages
from elmforest.models.factory import load_model
from elmforest.study.arms.base import Arm, ArmFields, StageContext
from elmforest.study.arms.record import ArmRecord

MOE_DIR, TUNED_DIR = anchored_moe.MOE_DIR, anchored_moe.TUNED_DIR


class AnchoredFields(ArmFields):
    anchored: bool = Field(
        False, description="FlexOlmo-style anchored experts merged into one opt-out mixture-of-experts (llama only)."
    )
    anchored_router_tokens: int = Field(
        0, ge=0, description="Tokens of router tuning for the anchored mixture (0: none; reported separately)."
    )


class AnchoredArm(Arm):
    """The anchored opt-out mixture: FFN copies trained beside the frozen seed, merged without joint training."""

    name = "anchored"
    fields = AnchoredFields
    switch = "anchored"

    def preflight(self, recipe: Any, source: str) -> None:
        family = stages.model_family(recipe)
        if recipe.arms.anchored and family != "llama":
            raise ElmError(
                f"arms.anchored needs llama-family experts, but the model family is {family!r}; set model.family: llama",
                source,
            )
        if recipe.arms.anchored_router_tokens and not recipe.arms.anchored:
            raise ElmError("arms.anchored_router_tokens tunes the anchored mixture's router: set arms.anchored: true", source)

    def folder(self, run_dir: Path, name: str) -> Path:
        return Path(run_dir) / MOE_DIR

    def announce(self, recipe: Any, name: str) -> str:
        return "[7/9] anchored experts (FlexOlmo): FFN copies beside the frozen seed, merged into one opt-out mixture"

    def train(self, ctx: StageContext, name: str) -> None:
        anchored.train_anchored_experts(ctx.recipe, ctx.out, ctx.log)
        anchored_moe.build_anchored_moe(ctx.recipe, ctx.out, ctx.log)

    def provide(self, models: Any, name: str) -> None:
        if (models.run_dir / MOE_DIR / anchored_moe.MOE_JSON).is_file():  # a Mixtral folder (anchored_moe.json last)
            models.singles["anchored_moe"] = load_model(models.run_dir / MOE_DIR).eval()

    def derive(self, recipe: Any, run_dir: Path, name: str, earlier: dict[str, ArmRecord]) -> ArmRecord | None:
        path = Path(run_dir) / MOE_DIR / anchored_moe.MOE_JSON
        if not path.is_file():
            return None
        m = read_json(path, anchored_moe.MOE_JSON)
        return ArmRecord(arm=name, tokens=int(m["train"]["tokens"]), flops=float(m["train"]["flops"]),
                         params_at_inference=int(m["params"]), compute_matched=False)

    def notes(self, record: ArmRecord, run_dir: Path, records: dict[str, ArmRecord]) -> list[str]:
        m = read_json(Path(run_dir) / MOE_DIR / anchored_moe.MOE_JSON, anchored_moe.MOE_JSON)
        ratio = m["train"]["flops"] / records["btm"].flops if "btm" in records else None
        return [
            f"The anchored mixture (`anchored_moe`) is not compute-matched: each anchored expert's forward runs the "
            f"frozen seed FFN beside its trainable copy (and the backward flows through the frozen parts), so its "
            f"training FLOPs are {m['train']['flops']:.3e}"
            + (f", {ratio:.2f}x the BTM forest's" if ratio else "")
            + f" (counted per token from the formula checked against FlopCounterMode). {m['top_k']} of "
            f"{len(m['experts'])} FFN experts run per token; its parameters at inference count all of them."
        ]


class AnchoredRouterArm(Arm):
    """The anchored mixture with its router rows tuned on a small domain-balanced sample (arms.anchored_router_tokens)."""

    name = "anchored_router_tuned"

    def instances(self, recipe: Any) -> list[str]:
        return ["anchored_router_tuned"] if recipe.arms.anchored and recipe.arms.anchored_router_tokens > 0 else []

    def folder(self, run_dir: Path, name: str) -> Path:
        return Path(run_dir) / TUNED_DIR

    def announce(self, recipe: Any, name: str) -> str:
        return f"[7/9] anchored mixture: router rows tuned on {recipe.arms.anchored_router_tokens:,} tokens"

    def train(self, ctx: StageContext, name: str) -> None:
        anchored_moe.tune_router(ctx.recipe, ctx.out, ctx.recipe.arms.anchored_router_tokens, ctx.log)

    def provide(self, models: Any, name: str) -> None:
        if (models.run_dir / TUNED_DIR / anchored_moe.MOE_JSON).is_file():
            models.singles["anchored_moe_router_tuned"] = load_model(models.run_dir / TUNED_DIR).eval()

    def derive(self, recipe: Any, run_dir: Path, name: str, earlier: dict[str, ArmRecord]) -> ArmRecord | None:
        path = Path(run_dir) / TUNED_DIR / anchored_moe.MOE_JSON
        if not path.is_file() or "anchored" not in earlier:
            return None
        t, base = read_json(path, anchored_moe.MOE_JSON)["router_tuning"], earlier["anchored"]
        return ArmRecord(arm=name, tokens=base.tokens + int(t["tokens"]), flops=base.flops + float(t["flops"]),
                         params_at_inference=base.params_at_inference, extra_tokens=int(t["tokens"]),
                         compute_matched=False)

    def notes(self, record: ArmRecord, run_dir: Path, records: dict[str, ArmRecord]) -> list[str]:
        t = read_json(Path(run_dir) / TUNED_DIR / anchored_moe.MOE_JSON, anchored_moe.MOE_JSON)["router_tuning"]
        return [f"`anchored_moe_router_tuned` adds {t['tokens']:,} tokens ({t['flops']:.3e} FLOPs) of router "
                "tuning on a domain-balanced sample: only the router rows train."]
