"""Forest arms: experts branched from a seed, each trained on its own data, merged into a forest.

    btm           RUN/experts/<domain> -> RUN/forest                 one expert per train domain
    btm_seed<f>   RUN/sweep/seed<f>/{seed,experts,forest}            the same, branched at fraction f
                                                                     (one per arms.seed_fractions entry)
    random        RUN/random_experts/random<i> -> RUN/random_forest  experts on random (domain-balanced)
                                                                     splits (arms.random_split)

A forest's budget record counts the seed it branched from plus every expert.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from elmforest.btm import seed as seeding
from elmforest.btm.experts import branch_expert, expert_job, merge_once, train_pending
from elmforest.combine.forest import Forest, read_expert, read_json
from elmforest.combine.adapters import arrow_model, cat_model
from elmforest.combine.scoring import load_experts
from elmforest.errors import ElmError
from elmforest.models.factory import param_count
from elmforest.study.arms.base import Arm, ArmFields, StageContext
from elmforest.study.arms.record import ArmRecord
from elmforest.study.methods import StudyMethod, seed_fraction_arm, seed_fraction_method


def train_forest(ctx: StageContext, recipe: Any, jobs: list[tuple[str, dict[str, Any]]], home: Path,
                 experts: str, forest: str, seed: Path | None = None) -> Forest:
    """Branch every expert of `jobs` from `seed` (default: home/seed, the run's seed when home is the
    run) into home/<experts>/<name>, train them with the recipe's launcher, merge them into home/<forest>."""
    out = ctx.out
    if seed is None:
        seed = home / "seed" if home != out else seeding.seed_dir(out)
    paths = []
    for name, data in jobs:
        job = expert_job(recipe, out, name, data, seed_from=seed)
        paths.append(branch_expert(home / experts / name, job, from_seed=seed))
    train_pending(recipe, paths, ctx.log)
    meta = read_expert(paths[0])
    base = seed if recipe.experts is not None else None  # adapter experts: the seed is their frozen base
    made = Forest.create(home / forest, out / "tokenizer", meta["tokenizer_hash"], meta["arch_hash"], base_dir=base)
    for p in paths:
        merge_once(made, p)
    return made


ARROW_TOP_K = 3  # PEFT's ArrowConfig default (capped at the forest's size)


def lend_adapter_peers(models: Any, forest: Forest) -> None:
    """PEFT's combinations of an adapter forest's adapters on its base, as single models:
    `btm_arrow` (the Arrow router, training-free, top-3 per token and layer, temperature 1) and
    `btm_cat` (the uniform cat merge: W0 + (1/n) sum_i scale_i B_i A_i)."""
    dirs = [forest.expert_dir(n) for n in forest.names]
    if read_json(forest.base_dir / "config.json", "model config").get("model_type") == "llama":  # Arrow: nn.Linear only
        models.singles["btm_arrow"] = arrow_model(forest.base_dir, dirs, top_k=min(ARROW_TOP_K, len(dirs)))
    models.singles["btm_cat"] = cat_model(forest.base_dir, dirs)


def domain_jobs(recipe: Any) -> list[tuple[str, dict[str, Any]]]:
    return [(d, {"kind": "domain", "domain": d}) for d in recipe.train_domains]


class ForestArm(Arm):
    """Base of the forest arms: lends its experts to the evaluation (an adapter forest's merged into
    its base, `scoring.load_experts`, and PEFT's Arrow router and cat merge of the BTM forest's
    adapters as `btm_arrow` / `btm_cat`), records seed + experts."""

    def provide(self, models: Any, name: str) -> None:
        folder = self.folder(models.run_dir, name)
        if (folder / "forest.json").is_file():
            f = Forest(folder)
            models.forests[name] = (f.names, load_experts(f))
            if f.base_dir is not None and name == "btm":
                lend_adapter_peers(models, f)

    def seed_folder(self, run_dir: Path, name: str) -> Path:
        """The seed snapshot its experts branched from (RUN/seed, RUN/sweep/seed<f>/seed)."""
        return self.folder(run_dir, name).parent / "seed"

    def derive(self, recipe: Any, run_dir: Path, name: str, earlier: dict[str, ArmRecord]) -> ArmRecord | None:
        folder = self.folder(run_dir, name)
        if not (folder / "forest.json").is_file():
            return None
        f = Forest(folder)
        # a forest's compute: its seed's (the snapshot it branched from) plus every expert's
        branched = read_json(self.seed_folder(Path(run_dir), name) / seeding.SEED_JSON, seeding.SEED_JSON)
        metas = [f.expert_meta(n) for n in f.names]
        return ArmRecord(
            arm=name,
            tokens=int(branched["tokens"] + sum(m["tokens"] for m in metas)),
            flops=float(branched["flops"] + sum(m["flops"] for m in metas)),
            params_at_inference=sum(param_count(m) for m in load_experts(f)),
            compute_matched=True,
        )


    def notes(self, record: ArmRecord, run_dir: Path, records: dict[str, ArmRecord]) -> list[str]:
        folder = self.folder(run_dir, record.arm)
        if not (folder / "forest.json").is_file() or Forest(folder).base_dir is None:
            return []
        dense = records.get("dense")
        return [
            f"`{record.arm}` is a forest of LoRA adapter experts on a frozen base: each trained token costs the "
            "frozen-base count (forward and activation gradients through the base, weight gradients for the adapters "
            f"only), so at the dense arm's tokens its training FLOPs are {record.flops:.3e}"
            + (f", {record.flops / dense.flops:.2f}x the dense arm's" if dense and dense.flops else "")
            + ". Its parameters at inference count each expert merged into the base."
        ]


class BtmArm(ForestArm):
    """The BTM forest: one expert per train domain, branched from the seed."""

    name = "btm"

    def folder(self, run_dir: Path, name: str) -> Path:
        return Path(run_dir) / "forest"

    def stage(self, name: str) -> str:
        return "btm_forest"

    def announce(self, recipe: Any, name: str) -> str:
        return "[4/9] BTM forest: one expert per train domain"

    def train(self, ctx: StageContext, name: str) -> None:
        train_forest(ctx, ctx.recipe, domain_jobs(ctx.recipe), ctx.out, "experts", "forest")

    def preflight(self, recipe: Any, source: str) -> None:
        if recipe.experts is None:
            return
        if getattr(recipe.arms, "btx", False):
            raise ElmError("arms.btx merges full experts' MLPs; adapter experts (experts:) cannot feed it: turn it off", source)
        if recipe.rounds:
            raise ElmError("rounds: a study that grows a forest of adapter experts round by round is not supported yet "
                           "(`elmforest grow` is); drop rounds or experts", source)


class SeedFractionFields(ArmFields):
    seed_fractions: list[float] = Field(
        default_factory=list,
        description="A seed-fraction sweep: extra BTM forests branched from snapshots of the same dense run at these "
        "fractions of the budget (each compute-matched on its own); budget.seed_fraction is the main forest's.",
    )

    @field_validator("seed_fractions")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        if any(not 0 < f < 1 for f in v):
            raise ValueError("each seed fraction must lie strictly between 0 and 1")
        if len(set(v)) != len(v):
            raise ValueError("duplicate seed fraction")
        return sorted(v)


def seed_fractions(recipe: Any) -> dict[str, float]:
    """{arm name: fraction} of the sweep's forests (btm_seed0.25: branched at 0.25 of the budget)."""
    return {seed_fraction_arm(f): f for f in recipe.arms.seed_fractions}


class SeedFractionArm(ForestArm):
    """A family: one BTM forest per arms.seed_fractions entry f, branched from the dense run's snapshot at f."""

    name = "btm_seed<f>"
    fields = SeedFractionFields

    def instances(self, recipe: Any) -> list[str]:
        return list(seed_fractions(recipe))

    def validate(self, recipe: Any) -> None:
        if recipe.budget.seed_fraction in recipe.arms.seed_fractions:
            raise ValueError(f"arms.seed_fractions repeats budget.seed_fraction={recipe.budget.seed_fraction} (the main forest)")

    def folder(self, run_dir: Path, name: str) -> Path:
        return seeding.sweep_dir(run_dir, float(name.removeprefix("btm_seed"))) / "forest"

    def announce(self, recipe: Any, name: str) -> str:
        return f"[4/9] BTM forest branched at {seed_fractions(recipe)[name]:g} of the budget (seed-fraction sweep)"

    def train(self, ctx: StageContext, name: str) -> None:
        f = seed_fractions(ctx.recipe)[name]
        train_forest(ctx, seeding.sweep_recipe(ctx.recipe, f), domain_jobs(ctx.recipe), seeding.sweep_dir(ctx.out, f),
                     "experts", "forest")

    def methods(self, recipe: Any, name: str) -> list[StudyMethod]:
        return [seed_fraction_method(seed_fractions(recipe)[name])]


class RandomFields(ArmFields):
    random_split: bool = Field(True, description="Train a forest on random (domain-balanced) splits of the train data.")


class RandomArm(ForestArm):
    """A forest of as many experts as train domains, each on a random domain-balanced part of the data."""

    name = "random"
    fields = RandomFields
    switch = "random_split"

    def folder(self, run_dir: Path, name: str) -> Path:
        return Path(run_dir) / "random_forest"

    def stage(self, name: str) -> str:
        return "random_forest"

    def announce(self, recipe: Any, name: str) -> str:
        return "[5/9] random-split forest"

    def train(self, ctx: StageContext, name: str) -> None:
        domains = list(ctx.recipe.train_domains)
        jobs = [(f"random{i}", {"kind": "random_split", "domains": domains, "part": i, "parts": len(domains),
                                "mix": "balanced"}) for i in range(len(domains))]
        train_forest(ctx, ctx.recipe, jobs, ctx.out, "random_experts", "random_forest")
