"""Typed, validated configuration: one pydantic model per concept, assembled into a `Recipe`.

Recipes are YAML files loaded with the safe loader. Unknown keys and bad values are errors
that name the file and the dotted key (`budget.seed_fraction: must be < 1`). `--set a.b=v`
overrides are applied before validation and must name an existing key.
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from elmforest.errors import ElmError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TokenizerConfig(_Strict):
    """Which tokenizer the run uses."""

    vocab_size: int = Field(4096, ge=260, le=262144, description="BPE vocabulary size when training one.")
    path: str | None = Field(None, description="An existing HF tokenizer folder; trained on the corpus when unset.")
    sample_bytes_per_domain: int = Field(
        4_000_000, gt=0, description="Training text drawn evenly from each train domain's train split."
    )


class ModelConfig(_Strict):
    """Architecture of the seed and every expert."""

    size: str | None = Field("tiny", description="Named size (tiny, demo, 125m, 350m); fields below override it.")
    family: Literal["gpt2", "llama"] | None = Field(None, description="Hugging Face model family.")
    layers: int | None = Field(None, gt=0)
    width: int | None = Field(None, gt=0, description="Hidden size.")
    heads: int | None = Field(None, gt=0)
    context: int | None = Field(None, gt=1, description="Context length in tokens (block size).")
    path: str | None = Field(
        None,
        description="Start from this local HF causal-LM folder (a pretrained seed) instead of a fresh init; its "
        "config fixes the architecture, its tokenizer (saved beside it) is used unless tokenizer.path is set, "
        "and `context` may shorten its context length.",
    )

    @field_validator("path")
    @classmethod
    def _path_fixes_architecture(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v:  # `path` is the last field, so info.data holds the architecture fields
            for name in ("family", "layers", "width", "heads"):
                if info.data.get(name) is not None:
                    raise ValueError(f"cannot be combined with model.{name} (the folder's config.json fixes it)")
        return v


class BudgetConfig(_Strict):
    """Compute budget in tokens, shared by the dense baseline and the forest."""

    total_tokens: int = Field(200_000, gt=0, description="Tokens the dense run sees in all (T).")
    seed_fraction: float = Field(0.5, ge=0.0, lt=1.0, description="Seed checkpoint at this fraction of T.")
    batch_tokens: int = Field(4096, gt=0, description="Dense batch in tokens per optimizer step.")


class OptimConfig(_Strict):
    """AdamW with linear warm-up and linear decay (the paper's schedule)."""

    lr: float = Field(1e-3, gt=0)
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = Field(0.1, ge=0)
    warmup_fraction: float = Field(0.05, ge=0, lt=1)
    final_lr_fraction: float = Field(0.1, ge=0, le=1, description="LR at the end, as a fraction of the peak.")
    grad_clip: float = Field(1.0, gt=0)
    micro_batch_tokens: int | None = Field(
        None, gt=0, description="Tokens per forward pass; the step accumulates gradients to batch_tokens."
    )
    bf16: bool = Field(False, description="bf16 autocast (CPU and GPU).")
    compile: bool = Field(False, description="torch.compile the model.")
    threads: int | None = Field(None, gt=0, description="torch.set_num_threads; default: all cores for one job.")
    device: str = Field("auto", description="torch device: auto (cuda when available, else cpu), cpu, cuda, cuda:1, ...")
    seed: int = 0
    log_every: int = Field(10, gt=0)
    eval_every: int = Field(0, ge=0, description="Steps between valid-loss evaluations (0: only at the end).")
    checkpoint_every: int = Field(50, gt=0, description="Steps between resumable checkpoints.")


class EvalConfig(_Strict):
    """How perplexity, the cached prior and the intervals are computed."""

    max_tokens_per_domain: int = Field(
        20_000, gt=0, description="Test tokens scored per domain: windows drawn at random from the whole test split."
    )
    prior_sequences: int = Field(
        100, gt=0, description="Valid windows (drawn from the whole valid split) used to estimate the cached prior."
    )
    prior_batch: int = Field(4, gt=0, description="Windows per batch in the prior's moving average.")
    prior_alpha: float = Field(0.3, gt=0, le=1, description="EMA weight of each new batch mean.")
    posterior: str = Field(
        "one_step", description="Per-position posterior (ensemble.POSTERIORS, one that updates): one_step "
        "(the reference code), full_prefix (the paper's formula) or decayed."
    )
    window_seed: int = Field(0, description="Seed of the test and valid window draw (the same for every method and run).")
    bootstrap_resamples: int = Field(
        1000, ge=10, description="Paired bootstrap resamples (over test documents, and seeds) for the 95% intervals."
    )
    batch_size: int = Field(8, gt=0)
    valid_windows_per_domain: int = Field(
        16,
        gt=0,
        description="Valid windows per domain scored during training (the compute curves), drawn from the whole "
        "valid split (eval.window_seed).",
    )


class LauncherConfig(_Strict):
    """Where expert trainings run."""

    kind: str = Field("local", description="A launcher of elmforest.launch.launchers.LAUNCHERS: sequential, local, ray, slurm.")
    workers: int | None = Field(None, gt=0, description="Parallel expert trainings (local); default from cores.")
    threads_per_worker: int | None = Field(None, gt=0)
    retries: int = Field(2, ge=0, description="Retries of a failed expert training, resuming its checkpoint.")
    address: str | None = Field(None, description="Ray cluster address; unset starts a local Ray.")
    num_cpus: float = Field(1, gt=0)
    num_gpus: float = Field(0, ge=0)
    slurm: dict[str, Any] = Field(default_factory=dict, description="submitit executor parameters.")
    storage: str | None = Field(
        None,
        description="fsspec URL (s3://bucket/run, gs://..., file:///shared/run) holding the expert folders "
        "between trainings, for nodes without a shared filesystem; unset: the run folder itself.",
    )
    sync_seconds: float = Field(60.0, gt=0, description="How often a worker pushes its expert folder to storage.")
    procs_per_job: int = Field(
        1, ge=1, description="Processes training each model data-parallel (torch.distributed): every expert, "
        "and in `elmforest run` also the seed/dense and DEMix runs."
    )


class LoggingConfig(_Strict):
    """Experiment trackers that follow every training live (elmforest.train.trackers): one tracker
    run per trained model, grouped under the study, and the study's final table and claims."""

    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=list,
        description="Trackers streaming each run's metrics.jsonl fields (each an optional extra: pip install "
        "'elmforest[tensorboard]', '[wandb]', '[mlflow]'); none by default. One name or a list; `none` is [].",
    )
    project: str = Field(
        "elmforest", min_length=1, description="W&B project and MLflow experiment ($MLFLOW_EXPERIMENT_NAME wins)."
    )
    group: str | None = Field(
        None, min_length=1, description="W&B group / MLflow tag `elmforest.group` of the study's runs; default: "
        "the study folder's name."
    )
    dir: str | None = Field(
        None,
        description="Folder of the trackers' local files: DIR/tensorboard/<run>, DIR/wandb, DIR/mlruns (MLflow's "
        "file store, unless a tracking URI is set); default: the study folder.",
    )
    mlflow_tracking_uri: str | None = Field(
        None, description="MLflow tracking URI (http://server, sqlite:///mlflow.db, file:/path); default: "
        "$MLFLOW_TRACKING_URI, else a file store DIR/mlruns."
    )

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [] if v.strip().lower() == "none" else [v]
        return list(dict.fromkeys(v)) if isinstance(v, list) else v


# The attention and MLP projections of each family (PEFT matches a name against module-name suffixes:
# gpt2's "c_proj" is both the attention output and the MLP down projection).
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}


class AdapterConfig(_Strict):
    """A LoRA adapter per expert on the frozen base (PEFT's `LoraConfig`, under BTM's names)."""

    adapter: Literal["lora"] = Field("lora", description="The adapter kind (PEFT LoRA).")
    r: int = Field(16, gt=0, description="Rank of each update B @ A.")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha; the update is scaled by alpha / r.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapter's input (training only).")
    target_modules: list[str] | None = Field(
        None, min_length=1, description="Module-name suffixes to adapt; default the family's attention and MLP projections."
    )

    def targets_for(self, model_type: str) -> list[str]:
        """`target_modules`, or the family's default (an error for a family without one)."""
        if self.target_modules is not None:
            return list(self.target_modules)
        if model_type not in DEFAULT_TARGETS:
            raise ElmError(
                f"experts.target_modules: required for model type {model_type!r} "
                f"(defaults exist for {', '.join(DEFAULT_TARGETS)})"
            )
        return list(DEFAULT_TARGETS[model_type])


class RoundConfig(_Strict):
    """One round of incremental growth: these domains join the forest."""

    domains: list[str]


class Recipe(_Strict):
    """A whole BTM study."""

    corpus: str = Field(..., description="Corpus folder (see `elmforest corpus`).")
    train_domains: list[str] = Field(..., min_length=1)
    novel_domains: list[str] = Field(default_factory=list)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    launcher: LauncherConfig = Field(default_factory=LauncherConfig)
    experts: AdapterConfig | None = Field(
        None,
        description="Adapter experts: every BTM expert is a LoRA adapter (PEFT) on the frozen seed (with "
        "budget.seed_fraction 0 the `model.path` model itself) instead of a full copy of it; unset: full experts.",
    )
    arms: dict[str, Any] = Field(
        default_factory=dict,
        description="Which arms `elmforest run` trains: its keys come from the registry of arms "
        "(elmforest.study.arms), which `elmforest.study.recipe` composes into this section; layers below "
        "the study never read it.",
    )
    rounds: list[RoundConfig] = Field(default_factory=list)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    seeds: list[int] | None = Field(
        None,
        description="Training seeds: each changes every arm's initialisation and data order (optim.seed); with more "
        "than one, RUN/seed-<s>/ holds each seed's study and the intervals cover seeds too. Default: [optim.seed].",
    )
    out: str = Field("runs/study", description="Output folder of `elmforest run`.")

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or len(set(v)) != len(v)):
            raise ValueError("seeds must be a non-empty list without duplicates")
        return v

    @property
    def seed_list(self) -> list[int]:
        """The training seeds of the study (`seeds`, else the one optim.seed)."""
        return list(self.seeds) if self.seeds else [self.optim.seed]

    @field_validator("train_domains", "novel_domains")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        dup = sorted({d for d in v if v.count(d) > 1})
        if dup:
            raise ValueError(f"duplicate domain {dup[0]!r}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "Recipe":
        overlap = set(self.train_domains) & set(self.novel_domains)
        if overlap:
            raise ValueError(f"domain {sorted(overlap)[0]!r} is both a train and a novel domain")
        n = len(self.train_domains)
        if self.budget.batch_tokens % n:
            raise ValueError(
                f"budget.batch_tokens={self.budget.batch_tokens} must divide evenly among {n} train domains"
            )
        if self.rounds:
            grown = [d for r in self.rounds for d in r.domains]
            if sorted(grown) != sorted(self.train_domains):
                raise ValueError("rounds must list every train domain exactly once")
        return self


def _format_validation_error(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "recipe"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    return f"{loc}: {msg}"


def parse_override(text: str) -> tuple[list[str], Any]:
    """`budget.total_tokens=1e6` -> (["budget", "total_tokens"], 1000000.0); values parse as YAML."""
    if "=" not in text:
        raise ElmError(f"--set {text!r}: expected key.sub=value")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ElmError(f"--set {text!r}: empty key")
    value = yaml.safe_load(raw) if raw.strip() else ""
    return parts, value


def _known_keys(model: type[BaseModel]) -> dict[str, Any]:
    return model.model_fields


def apply_overrides(
    data: dict[str, Any], overrides: list[str] | None, recipe_type: type[Recipe] | None = None
) -> dict[str, Any]:
    """Apply `--set` overrides to raw recipe data; each must name a key the recipe schema
    (`recipe_type`, default `Recipe`) has."""
    for text in overrides or []:
        parts, value = parse_override(text)
        schema: type[BaseModel] | None = recipe_type or Recipe
        node = data
        for i, part in enumerate(parts):
            fields = _known_keys(schema) if schema is not None else {}
            if schema is not None and part not in fields:
                raise ElmError(f"--set {text!r}: no key {'.'.join(parts[: i + 1])!r} in the recipe")
            if i == len(parts) - 1:
                node[part] = value
                break
            ann = fields[part].annotation if schema is not None else None
            if isinstance(ann, types.UnionType):  # an optional section, `X | None`: its keys are X's
                ann = next(a for a in ann.__args__ if a is not type(None))
            schema = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
            if schema is None:
                raise ElmError(f"--set {text!r}: {'.'.join(parts[: i + 1])!r} has no sub-keys")
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ElmError("recipe not found", path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ElmError("recipe is not UTF-8 text", path) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ElmError(f"not valid YAML{where}", path) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ElmError("a recipe must be a mapping of keys to values", path)
    return data


def resolve_paths(recipe: Recipe) -> Recipe:
    """Make the recipe's input paths absolute (relative ones are relative to the working folder),
    so the copy a run folder keeps works from anywhere."""
    recipe.corpus = str(Path(recipe.corpus).resolve())
    if recipe.tokenizer.path:
        recipe.tokenizer.path = str(Path(recipe.tokenizer.path).resolve())
    if recipe.model.path:
        recipe.model.path = str(Path(recipe.model.path).resolve())
    if recipe.logging.dir:
        recipe.logging.dir = str(Path(recipe.logging.dir).resolve())
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None, recipe_type: type[Recipe] | None = None) -> Recipe:
    """Read, override and validate a recipe (as `recipe_type`, default `Recipe`: the study passes
    its subclass whose `arms` section is typed); relative input paths resolve against the CWD."""
    data = apply_overrides(read_yaml(path), overrides, recipe_type)
    try:
        return resolve_paths((recipe_type or Recipe).model_validate(data))
    except ValidationError as e:
        raise ElmError(_format_validation_error(e), path) from None


def recipe_from_dict(data: dict[str, Any], source: str = "recipe", recipe_type: type[Recipe] | None = None) -> Recipe:
    try:
        return (recipe_type or Recipe).model_validate(data)
    except ValidationError as e:
        raise ElmError(_format_validation_error(e), source) from None
