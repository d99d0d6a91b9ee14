"""What an arm declares: the `Arm` class every entry of the registry (`elmforest.study.arms`) is.

An arm is one kind of trained thing the study compares (the dense LM, the BTM forest, DEMix, ...).
It says, in one place:

    fields     its recipe keys under `arms:` (a pydantic model; the registry composes the section)
    instances  the arms a recipe trains from this entry: [name] or [] for a plain arm, one per
               value for a family (arms.dense_multiples -> dense_x2, dense_x4)
    train      the stage that trains it (resumable, skipped when done; the training code lives in
               btm/ and mixtures/, the arm only calls it)
    folder     RUN/<folder>, which holds its models and its budget record arm.json
    provide    the models it lends the evaluation (`results.StudyModels`)
    methods    the study methods it feeds (default: STUDY_METHODS entries whose arm is its name)
    derive     its budget record (`record.ArmRecord`), read from the files its training wrote
    notes      sentences for the report (e.g. why it is not compute-matched)
    summarize  a section of results.json of its own (once per entry, e.g. a family's sweep table)
    report     that section's part of report.md (text and plots)

Every method has a do-nothing default, so an arm overrides only what applies to it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from elmforest.data.corpus import Corpus
from elmforest.study.arms.record import ArmRecord
from elmforest.study.methods import STUDY_METHODS, StudyMethod


class ArmFields(BaseModel):
    """Base of an arm's recipe keys (strict: an unknown or mistyped key is an error naming it)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


@dataclass(frozen=True)
class StageContext:
    """What a training stage gets: the (one training seed's) recipe and run folder, and the shared setup."""

    recipe: Any
    out: Path
    corpus: Corpus
    tokenizer: Path
    context: int
    procs: int
    progress: bool
    log: Callable[[str], None]


class Arm:
    """One registry entry; subclass it, set `name` (and `fields`), override what applies."""

    name: str = ""
    fields: type[ArmFields] | None = None
    switch: str | None = None
    """The boolean key under `arms:` that turns it on (None: always on)."""
    after_evaluation: bool = False
    """Its stage runs after the evaluation (it reads trained arms, e.g. opting a domain out)."""
    records: bool = True
    """Whether it writes a budget record (False for entries that train nothing of their own)."""

    def instances(self, recipe: Any) -> list[str]:
        """The arms of this entry a recipe trains ([] when switched off; a family: one per value)."""
        return [self.name] if self.switch is None or getattr(recipe.arms, self.switch) else []

    def folder(self, run_dir: Path, name: str) -> Path:
        """The folder holding the arm's models and its arm.json."""
        return Path(run_dir) / name

    def stage(self, name: str) -> str:
        """Its key in timing.json."""
        return name

    def announce(self, recipe: Any, name: str) -> str | None:
        """The log line before its stage runs (None: nothing to say, e.g. no stage)."""
        return None

    def train(self, ctx: StageContext, name: str) -> None:
        """Train it into its folder: resumable, and skipped when done."""

    def preflight(self, recipe: Any, source: str) -> None:
        """Refuse, before anything trains, settings it cannot run (ElmError)."""

    def validate(self, recipe: Any) -> None:
        """Check its keys against the rest of the recipe when it loads (ValueError)."""

    def provide(self, models: Any, name: str) -> None:
        """Load the models it lends the evaluation into `models` (a `results.StudyModels`):
        `singles[name]` (one model), `forests[name]` ((names, experts)) or `demix`."""

    def methods(self, recipe: Any, name: str) -> list[StudyMethod]:
        """The study methods it feeds (rows of results.json), in the order they are listed."""
        return [m for m in STUDY_METHODS.values() if m.arm == name]

    def derive(self, recipe: Any, run_dir: Path, name: str, earlier: dict[str, ArmRecord]) -> ArmRecord | None:
        """Its budget record from the files its training wrote, or None when it is not trained.
        `earlier`: the records of the arms before it in the registry (BTX adds to BTM's)."""
        return None

    def notes(self, record: ArmRecord, run_dir: Path, records: dict[str, ArmRecord]) -> list[str]:
        """Sentences for results.json's notes (and the report)."""
        return []

    def summarize(self, recipe: Any, run_dir: Path, boot: Any, results: dict[str, Any]) -> dict[str, Any]:
        """Sections of results.json of its own ({key: value}; called once per registry entry that
        trains something, after every method's row is in `results`; `boot`: the study's
        `combine.bootstrap.Bootstrap`). Keys must be listed in `report.RESERVED_KEYS`."""
        return {}

    def report(self, results: dict[str, Any], plots: Path) -> list[str]:
        """Lines of report.md for its own results.json sections (plots written under `plots`)."""
        return []
