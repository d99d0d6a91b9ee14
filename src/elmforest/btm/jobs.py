"""Job records: `job.json`, everything one training job needs, in the folder it trains.

A job record is written once, atomically, when the folder is branched (`experts.branch_expert`,
`mixtures.anchored.branch_anchored`), and never changed afterwards: whatever a later stage learns
goes into a file of its own (`grow.json`, `expert.json`, `anchored.json`). It is read back through
the same typed models, validated (a missing or mistyped field is one `ElmError` line naming the
file and the field), by the job's runner and by `elmforest check`.

    ExpertJob     a BTM expert: domain experts, random-split experts, grown experts; a full model,
                  or (with `adapter` and `base`) a LoRA adapter on a frozen base
    AnchoredJob   an anchored (FlexOlmo) expert: an ExpertJob plus `kind` and `embed_windows`

`runner` names the function that trains the job, "module:function", and `elmforest train FOLDER`
dispatches on it. Records written before the field existed have none: anchored ones are told apart
by their anchored-only fields, the rest are BTM experts. Records that name a module from before
the package's move into layers (`elmforest.phases:train_expert`) resolve through `MOVED_MODULES`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from elmforest import storage
from elmforest.combine.forest import read_json
from elmforest.config import AdapterConfig
from elmforest.errors import ElmError
from elmforest.train.spec import TrainSpec

JOB_JSON = "job.json"
EXPERT_RUNNER = "elmforest.btm.experts:train_expert"
ANCHORED_RUNNER = "elmforest.mixtures.anchored:train_anchored_expert"
# Where a module recorded in an older job record lives now (the functions kept their names).
MOVED_MODULES = {
    "elmforest.phases": "elmforest.btm.experts",
    "elmforest.btm.phases": "elmforest.btm.experts",
    "elmforest.anchored": "elmforest.mixtures.anchored",
}
ANCHORED_ONLY = ("kind", "embed_windows")  # fields only an anchored job record has


def resolve_runner(runner: str) -> str:
    """Today's "module:function" for a runner recorded by any version (old module paths moved)."""
    module, sep, function = runner.partition(":")
    if not sep or not module or not function:
        raise ValueError(f"runner {runner!r} is not 'module:function'")
    return f"{MOVED_MODULES.get(module, module)}:{function}"


def recorded_runner(data: dict[str, Any]) -> str:
    """The runner of a job record as read from disk: its `runner` field resolved, or, for a
    record written before the field existed, inferred (anchored-only fields: the anchored runner)."""
    runner = data.get("runner")
    if runner is None:
        return ANCHORED_RUNNER if any(k in data for k in ANCHORED_ONLY) else EXPERT_RUNNER
    if not isinstance(runner, str):
        raise ValueError(f"runner must be a string, got {runner!r}")
    return resolve_runner(runner)


class DomainData(BaseModel):
    """Train on one domain's train split."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["domain"] = "domain"
    domain: str


class RandomSplitData(BaseModel):
    """Train on random part `part` of `parts` of the domains' train splits (`data.sampler.RandomSplitSampler`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["random_split"] = "random_split"
    domains: list[str]
    part: int = Field(ge=0)
    parts: int = Field(ge=1)
    partition_seed: int = 0
    """Absent from records written before it was: 0."""
    mix: Literal["pooled", "balanced"] = "pooled"
    """Absent from records written before it was: pooled."""


class Parent(BaseModel):
    """One expert a grown expert was averaged from, with its weight."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    weight: float


class ExpertJob(BaseModel):
    """`job.json` of a BTM expert: what `experts.train_expert` reads, nothing else."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    RUNNER: ClassVar[str] = EXPERT_RUNNER  # what records of this class name as their runner

    runner: str = EXPERT_RUNNER
    """The function that trains the job, "module:function" (`elmforest train` dispatches on it)."""
    name: str
    domain: str
    """The domain the expert is named for (a random-split expert's own name)."""
    corpus: str
    """The corpus folder, absolute."""
    tokenizer: str
    """The run's tokenizer folder, absolute."""
    data: Annotated[DomainData | RandomSplitData, Field(discriminator="kind")]
    context: int = Field(ge=1)
    batch_blocks: int = Field(ge=1)
    """Windows per sampler batch (the expert's 1/n of the dense batch, per micro-batch)."""
    sampler_seed: int
    spec: TrainSpec
    """The training run's hyper-parameters, its schedule over `spec.total_steps` included."""
    start_step: int = Field(ge=0)
    """The step the schedule starts at (the seed step when the seed's AdamW state continues)."""
    init_state: str | None
    """train_state.pt whose AdamW moments and step the run starts from (None: a fresh AdamW)."""
    parents: list[Parent] | Literal["seed"]
    seed_checkpoint: str
    valid_windows: int = Field(ge=1)
    eval_batch_size: int = Field(ge=1)
    train_domains: list[str]
    recipe: dict[str, Any]
    """The whole recipe it was made from (provenance; copied into expert.json)."""
    adapter: AdapterConfig | None = None
    """An adapter expert: the LoRA it trains on the frozen `base` (None, and absent from records written
    before adapter experts existed: a full expert, every weight trained)."""
    base: str | None = None
    """An adapter expert's frozen base model folder, absolute (the seed it branched from)."""

    @model_validator(mode="after")
    def _adapter_has_base(self) -> ExpertJob:
        if (self.adapter is None) != (self.base is None):
            raise ValueError("an adapter expert needs both 'adapter' and 'base' (a full expert neither)")
        return self

    @model_validator(mode="after")
    def _own_runner(self) -> ExpertJob:
        if self.runner != self.RUNNER:
            raise ValueError(f"runner {self.runner!r}: this record is trained by {self.RUNNER!r}")
        return self

    @property
    def window_seed(self) -> int:
        """The recipe's eval.window_seed, which the valid windows are drawn with (0 for records
        written before it existed)."""
        return int(self.recipe.get("eval", {}).get("window_seed", 0))

    def train_spec(self, threads: int | None = None) -> TrainSpec:
        """The run's TrainSpec, with `threads` torch threads when given."""
        return self.spec if threads is None else dataclasses.replace(self.spec, threads=threads)

    def record(self) -> dict[str, Any]:
        """The JSON object job.json holds (a full expert's without the adapter fields, as before they existed)."""
        return self.model_dump(mode="json", exclude={"adapter", "base"} if self.adapter is None else None)


class AnchoredJob(ExpertJob):
    """`job.json` of an anchored expert (`mixtures.anchored`): a BTM expert's record (its data,
    batch and sampler seed) with the anchored schedule in `spec`, plus:"""

    RUNNER: ClassVar[str] = ANCHORED_RUNNER
    runner: str = ANCHORED_RUNNER
    kind: Literal["anchored"] = "anchored"
    embed_windows: int = Field(ge=1)
    """Windows per domain the router rows' domain embeddings were averaged over."""


JOB_MODELS: dict[str, type[ExpertJob]] = {EXPERT_RUNNER: ExpertJob, ANCHORED_RUNNER: AnchoredJob}


def job_errors(data: dict[str, Any], model: type[ExpertJob] | None = None) -> tuple[ExpertJob | None, list[str]]:
    """Validate a job record -> (the job, []) or (None, one line per problem, naming the field).
    `model` None: the record's own, by its runner."""
    try:
        runner = recorded_runner(data)
        if runner not in JOB_MODELS:
            return None, [f"field 'runner': {runner!r} is not a job runner ({', '.join(JOB_MODELS)})"]
        if model is not None and runner != model.RUNNER:
            return None, [f"field 'runner': this job is trained by {runner} (run `elmforest train` on the folder)"]
        model, data = JOB_MODELS[runner], {**data, "runner": runner}  # an older record's runner, today's name
        # JSON mode: arrays are tuples where a tuple is wanted, and strict types everywhere else
        return model.model_validate_json(json.dumps(data), strict=True), []
    except ValidationError as e:
        first: dict[str, str] = {}  # one line per field (a union's members each report one)
        for err in e.errors():
            where, line = _one_error(err)
            first.setdefault(where, line)
        return None, list(first.values())
    except (ElmError, ValueError) as e:  # TrainSpec's own range checks; a runner that is not module:function
        detail = getattr(e, "detail", str(e))
        return None, [f"field 'spec': {detail}" if isinstance(e, ElmError) else f"field 'runner': {detail}"]


def _one_error(err: dict[str, Any]) -> tuple[str, str]:
    """(the field's dotted name, one line naming it) for one pydantic error."""
    loc = list(err["loc"])
    if loc[:1] == ["data"] and len(loc) > 2:
        del loc[1]  # the tag of the `data` union ("domain", "random_split"), not a field
    # loc parts such as "list[Parent]" or "function-after[...]" name a union member, not a field
    where = ".".join(str(p) for p in loc if not any(c in str(p) for c in "[-"))
    if err["type"] == "missing":
        return where, f"field {where!r} is missing"
    if err["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        return where, f"field {where!r} is not a job field"
    message = err["msg"].removeprefix("Value error, ")
    return where, f"field {where!r}: {message}" if where else message


def read_job(folder: str | Path, model: type[ExpertJob] | None = None) -> ExpertJob:
    """FOLDER/job.json, validated (by `model`, default the record's own by its runner)."""
    path = Path(folder) / JOB_JSON
    job, problems = job_errors(read_json(path, JOB_JSON), model)
    if job is None:
        raise ElmError(problems[0], path)
    return job


def write_job(folder: str | Path, job: ExpertJob) -> None:
    """Write FOLDER/job.json (atomically); the one place a job record is written."""
    storage.write_json(Path(folder) / JOB_JSON, job.record())
